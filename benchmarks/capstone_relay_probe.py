"""The capstone's relay probe: what the host path (the coordinator process and the client's
end of the streams) carries below its knee, measured on the host that runs the capstone,
before any worker starts (`--relay-probe`).

Why: the relay profile fitted on a run's saturated windows (capstone_relay.py) is the
path in overload, and it collapses there. On 4 x H100 a host that delivered ~10k token
messages and ~50 P/D set-ups a second whatever its backlog carried 15k and 65-77 a second
with none, and the max rate a setup holds is decided below the knee. A closed loop never
builds a backlog, so it measures that regime.

How: `pdserve bench coordinator`'s machinery (benchmarks/coordinator.py) with the
capstone's coordinator command, fake workers (no model: every token ready at once) in one
process per worker as the capstone's workers are, and as many client processes as the
capstone has load processes (`--load-procs`, capstone_load.py) holding `STREAMS` Generate
streams between them in a closed loop, one token a message. Since session 15 both sides
spread the client over processes: the path measured and the path the runs load is then the
coordinator's, not a client's (in session 14 the capstone's one load process was about as
busy in the runs that fell over as the probe's one client at its saturation). Cells: mode pd (one
prefill and `DECODE_WORKERS` decode workers) and both (`BOTH_WORKERS` colocated), each at
the output lengths `LENS` (8 tokens: mostly set-ups; 256: mostly token messages). The
path is busy all through each cell's window, so

    t_tok * messages/s + t_req_pd * P/D requests/s + t_req_local * local requests/s = 1 s

and the four cells fit the three costs (non-negative least squares). They go to
calibration.json as `relay_host`; the simulator uses them while no request has waited
`planner_relay.BACKLOG_S` to be set up. With `--plan-check-from`, the probe's costs
replace the calibration's `relay_host`: the relay is this host's, the GPU profiles the
calibration's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np

from pdserve.benchmarks import coordinator as bench
from pdserve.benchmarks.capstone_steps import nonneg_lstsq

LENS = (8, 256)
STREAMS = 192  # about what the 4-GPU decode-heavy runs held near their knees
DECODE_WORKERS = 3
BOTH_WORKERS = 4
MIN_S = 10.0


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--relay-probe", action="store_true",
                   help="before the setups start, measure the host path (coordinator and "
                        "client) below its knee with fake workers in a closed loop (`bench "
                        "coordinator`, 4 cells); the planner simulates the relay at these "
                        "costs until a backlog builds (calibration.json 'relay_host'; with "
                        "--plan-check-from they replace the calibration's)")
    g.add_argument("--relay-probe-s", type=float, default=5.0, metavar="S",
                   help="measured seconds per probe cell (default 5, after 1 s of warm-up)")


def check(args: argparse.Namespace) -> str | None:
    if args.relay_probe_s <= 0:
        return "--relay-probe-s must be > 0"
    return None


def fit(rows: list[dict]) -> dict[str, float]:
    """{t_tok, t_req_pd, t_req_local} in ms from probe cells (each busy all through)."""
    x = np.array([[r["client_msgs_per_s"], r["requests_per_s"] * (r["mode"] == "pd"),
                   r["requests_per_s"] * (r["mode"] == "both")] for r in rows], dtype=float)
    if len(rows) < 3 or not x[:, 1].any() or not x[:, 2].any():
        raise ValueError("the probe needs cells of both modes and at least 3 in all")
    c = nonneg_lstsq(x, np.full(len(rows), 1e3))
    return {"t_tok": float(c[0]), "t_req_pd": float(c[1]), "t_req_local": float(c[2])}


def _cells(mode: str, seconds: float, client_procs: int, log) -> list[dict]:
    """The probe's cells of one mode: a coordinator, its fake workers, `client_procs`
    client processes (as many as the capstone's load processes)."""
    roles = ([["--prefill", "1", "--decode", "0", "--kv-elsewhere"]]
             + [["--prefill", "0", "--decode", "1", "--kv-elsewhere"]] * DECODE_WORKERS
             if mode == "pd" else [["--prefill", "0", "--decode", "0", "--both", "1"]]
             * BOTH_WORKERS)
    with bench.fake_cluster(roles, 1, log) as (address, pids, _):
        rows = []
        for n in LENS:
            ns = argparse.Namespace(prompt_len=32, output_len=n, text=False,
                                    client_procs=client_procs, warmup=1.0, duration=seconds)
            rows.append({**bench.run_cell(address, pids, mode, STREAMS, 1, ns, log),
                         "output_len": n})
        return rows


def run_step(args: argparse.Namespace, budget: Any) -> dict | None:
    """The probe's record for results.json ("relay_probe": rows, fit, note), None when not
    asked; a failure is noted, never raised (the setups still run)."""
    if not getattr(args, "relay_probe", False):
        return None
    rec: dict[str, Any] = {"rows": [], "fit": {}, "note": "", "streams": STREAMS,
                           "lens": list(LENS), "decode_workers": DECODE_WORKERS,
                           "both_workers": BOTH_WORKERS,
                           "client_procs": getattr(args, "load_procs", 1)}
    need = 4 * (args.relay_probe_s + 1.0) + 2 * MIN_S
    if getattr(args, "coordinator", None) or getattr(args, "base_url", None):
        rec["note"] = "the run measured a server it did not launch: no probe"
    elif budget.limited and budget.total_s * 0.15 < need:
        rec["note"] = (f"skipped: 15% of the budget is {budget.total_s * 0.15:.0f} s, under "
                       f"the {need:.0f} s it needs")
    if rec["note"]:
        print(f"relay probe: {rec['note']}", flush=True)
        return rec
    print(f"relay probe: {STREAMS} closed-loop streams, pd and both, {LENS} output tokens",
          flush=True)
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile("w+", prefix="pdserve-relay-probe-", suffix=".log") as log:
        try:
            for mode in ("pd", "both"):
                rec["rows"] += _cells(mode, args.relay_probe_s, rec["client_procs"], log)
            rec["fit"] = fit(rec["rows"])
        except (RuntimeError, OSError, ValueError) as e:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])[-400:]
            rec["note"] = f"failed: {e}" + (f" ({tail})" if tail else "")
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    f = rec["fit"]
    print("relay probe: " + (rec["note"] or (
        f"{f['t_tok'] * 1e3:.3g} us a token message, {f['t_req_pd']:.3g} ms a P/D set-up, "
        f"{f['t_req_local']:.3g} ms a local one")) + f" ({rec['wall_s']} s)", flush=True)
    return rec


def probed_relay(cal, rec: dict | None) -> None:
    """cal.relay_host (and its source) from a probe's record (results.json "relay_probe"),
    when the probe fitted its costs; else cal unchanged."""
    if rec and rec.get("fit"):
        cal.relay_host = dict(rec["fit"])
        cal.source["relay_host"] = describe(rec)


def describe(rec: dict) -> str:
    """calibration.json's source line of `relay_host` (the note of a probe without one)."""
    f = rec.get("fit")
    if not f:
        return rec.get("note", "")
    cells = "; ".join(f"{r['mode']} {r['output_len']} tokens: {r['client_msgs_per_s']:,.0f} "
                      f"messages/s, {r['requests_per_s']:.0f} requests/s" for r in rec["rows"])
    return (f"probed on this host (capstone_relay_probe.py: {rec['streams']} closed-loop "
            f"streams, fake workers): {f['t_tok'] * 1e3:.3g} us a token message, "
            f"{f['t_req_pd']:.3g} ms a P/D set-up, {f['t_req_local']:.3g} ms a local one "
            f"({cells})")

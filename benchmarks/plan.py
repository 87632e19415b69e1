"""`pdserve plan`: predict goodput for every P:D split of N GPUs from calibrated profiles,
and recommend one; `--validate RUN_DIR` compares predictions with a capstone run.

    pdserve plan --calibration RUN_DIR/calibration.json --gpus 4,8 \
        --workload sharegpt-synth --goodput ttft:500 tpot:50
    pdserve plan --validate RUN_DIR

Goodput here is DistServe's: the highest arrival rate (req/s) at which at least `--target`
of the requests meet every SLO, found by the same bounded search as the capstone run
(benchmarks/capstone_search.py) over simulated runs (benchmarks/planner_sim.py).

Assumptions when extrapolating to 8, 16, 64 GPUs (printed with every plan): every worker is
one GPU running the calibrated model (no tensor parallelism); profiles measured on one
pair of GPUs hold for every pair (same GPU model, same interconnect: NVLink inside a node
versus RDMA across nodes is not modelled); KV moves as the installed engine's defaults
move it between workers of one host (a peer copy after the forward); KV transfers do not
contend for links; each replica has its own coordinator and client (the relay profile, where
the run measured one, says how many it needs); routing balances load as in the simulator (least
queued tokens / fewest sequences); no preemption, no prefix caching.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Sequence

from pdserve.benchmarks.capstone_calibration import Calibration, load_calibration, run_calibration
from pdserve.benchmarks.capstone_heartbeats import load_records, pool_blocks, routed_times
from pdserve.benchmarks.capstone_metrics import parse_goodput
from pdserve.benchmarks.capstone_relay_probe import probed_relay
from pdserve.benchmarks.capstone_rerender import run_key
from pdserve.benchmarks.capstone_search import SearchResult, find_max_rate
from pdserve.benchmarks.capstone_workloads import arrival_times, length_pairs, parse_workload
from pdserve.benchmarks.plan_report import SENSITIVITY, validation_lines
from pdserve.benchmarks.planner_cache import BLOCK_SIZE, PrefixCaches
from pdserve.benchmarks.planner_metrics import sim_means, sim_summary
from pdserve.benchmarks.planner_setups import LANDED_ORDER, KVPush, Setup, landed_fifo, parse_setup
from pdserve.benchmarks.planner_sim import SimRun, simulate_setup

ASSUMPTIONS = (__doc__ or "").split("Assumptions when extrapolating")[1].split("\n\n")[0]
ASSUMPTIONS = "Assumptions when extrapolating" + ASSUMPTIONS


def rough_capacity(cal: Calibration, lengths: Sequence[tuple[int, int]], setup: Setup) -> float:
    """A first guess of the sustainable rate (req/s), where the search starts."""
    n = max(1, len(lengths))
    mean_in = sum(i for i, _ in lengths) / n
    mean_out = sum(o for _, o in lengths) / n
    pre_s = cal.prefill_ms(mean_in, mean_in ** 2) / 1e3
    batch = min(cal.max_batch, 32)
    dec_s = cal.decode_step_ms(batch, batch * (mean_in + mean_out / 2)) / 1e3 * mean_out / batch
    if setup.prefill == 0:
        return max(1e-3, setup.both / (pre_s + dec_s))
    pd = min(setup.prefill / pre_s, setup.decode / dec_s)
    return max(1e-3, pd + setup.both / (pre_s + dec_s))


def predict(cal: Calibration, setup: Setup, lengths: Sequence[tuple[int, int]],
            slos: dict[str, float], target: float = 0.9, burstiness: float = 1.0,
            seed: int = 0, max_runs: int = 10, min_duration_s: float = 0.0,
            start_rate: float | None = None, rel_tol: float = 0.05,
            min_requests: int = 0, max_requests: int = 0, grace_s: float = 0.0,
            guess: float = 0.0, push: KVPush = KVPush(),
            landed_fifo: bool = False) -> SearchResult:
    """Predicted max rate at >= target attainment for one setup and a list of (in, out).
    With `min_duration_s`, a run at rate r simulates max(min_requests or len(lengths),
    r * min_duration_s) requests (the lengths in turn), so a high rate is a sustained load,
    not one burst. With `grace_s`, a run is cut that long after its last arrival (a
    budgeted capstone run's time limit). `push`: how the workers push KV, `landed_fifo`:
    whether landed requests wait in landing order (else newest first; planner_sim)."""

    def measure(rate: float) -> float:
        n = max(min_requests or len(lengths), math.ceil(rate * min_duration_s))
        n = min(n, max_requests) if max_requests else n
        ls = [lengths[i % len(lengths)] for i in range(n)]
        times = arrival_times(n, rate, burstiness, random.Random(seed + 7919))
        horizon = times[-1] + grace_s if grace_s else math.inf
        return sim_summary(simulate_setup(cal, setup, times, ls, horizon, push=push,
                                          landed_fifo=landed_fifo), slos, horizon_s=horizon)[0]

    start = start_rate or rough_capacity(cal, lengths, setup) / 2
    return find_max_rate(measure, start, target=target, max_runs=max_runs, rel_tol=rel_tol,
                         guess=guess)


def guess_max_rates(cal: Calibration, setups: Sequence[str],
                    workloads: Sequence[tuple[str, Sequence[tuple[int, int]]]],
                    slos: dict[str, float], target: float = 0.9, burstiness: float = 1.0,
                    seed: int = 0, duration_s: float = 10.0, min_requests: int = 16,
                    grace_s: float = 0.0, push: KVPush = KVPush(),
                    landed_fifo: bool = False, rel_tol: float = 0.1) -> dict[str, dict[str, float]]:
    """{setup: {workload: predicted max rate}}: what `pdserve bench capstone
    --start-rate-from` steers each search with (a finer search than the measured one, on
    runs of `duration_s` seconds of arrivals; `push`, `landed_fifo`: the run's workers)."""
    out: dict[str, dict[str, float]] = {}
    for name in setups:
        try:
            setup = parse_setup(name)
        except ValueError:
            continue
        for wname, lengths in workloads:
            res = predict(cal, setup, lengths, slos, target, burstiness, seed, max_runs=16,
                          min_duration_s=duration_s, rel_tol=rel_tol, min_requests=min_requests,
                          grace_s=grace_s, push=push, landed_fifo=landed_fifo)
            out.setdefault(name, {})[wname] = res.max_rate
    return out


def splits(gpus: int, colocated: bool = True) -> list[Setup]:
    """Every xPyD with x + y = gpus (about 12 evenly spread for more than 16 GPUs), and Nboth."""
    ps = list(range(1, gpus))
    if gpus > 16:
        ps = sorted({max(1, min(gpus - 1, round(gpus * f / 12))) for f in range(1, 12)})
    out = [Setup(p, gpus - p, 0) for p in ps]
    return out + ([Setup(0, 0, gpus)] if colocated else [])


def plan(cal: Calibration, gpus: int, lengths: Sequence[tuple[int, int]], slos: dict[str, float],
         target: float = 0.9, burstiness: float = 1.0, seed: int = 0,
         colocated: bool = True, min_duration_s: float = 0.0, max_runs: int = 10,
         max_requests: int = 0, push: KVPush = KVPush(),
         landed_fifo: bool = False) -> list[dict]:
    """One row per candidate setup, best predicted goodput first (`push`, `landed_fifo`:
    planner_sim)."""
    rows = []
    for s in splits(gpus, colocated):
        res = predict(cal, s, lengths, slos, target, burstiness, seed, max_runs=max_runs,
                      min_duration_s=min_duration_s, max_requests=max_requests, push=push,
                      landed_fifo=landed_fifo)
        rows.append({"gpus": gpus, "setup": s.name, "predicted_goodput_rps": res.max_rate,
                     "per_gpu_rps": res.max_rate / gpus, "search": res.describe()})
    return sorted(rows, key=lambda r: -r["predicted_goodput_rps"])


def run_time_limit_s(m: dict, lengths: Sequence[tuple[int, int]], slos: dict[str, float],
                     budgeted: bool) -> float:
    """A measured run's time limit (seconds after its clock 0), after which the capstone
    cut what was still running: recorded as `time_limit_s` by newer runs; else, under a
    budget, its send span plus the smallest grace capstone_budget.RunSizer gives
    (max(2 x estimated drain, 5 s), the drain estimated from the SLOs as
    capstone_sweep.drain_estimate_s); without a budget, none."""
    if m.get("time_limit_s"):
        return float(m["time_limit_s"])
    if not budgeted or not m.get("send_duration_s"):
        return math.inf
    return float(m["send_duration_s"]) + budget_grace_s(lengths, slos)


def budget_grace_s(lengths: Sequence[tuple[int, int]], slos: dict[str, float]) -> float:
    """The smallest grace capstone_budget.RunSizer.stop_at gives a run after its last send:
    max(2 x drain, 5 s), the drain estimated from the SLOs as capstone_sweep does."""
    mean_out = sum(o for _, o in lengths) / max(1, len(lengths))
    drain = min(slos.get("ttft", 1000.0) + mean_out * slos.get("tpot", 50.0),
                slos.get("e2el", math.inf)) / 1e3
    return max(2 * drain, 5.0)


def validation_error(predicted: float, measured: float) -> float:
    """Relative error of a prediction, (predicted - measured) / measured; NaN if measured is 0."""
    return (predicted - measured) / measured if measured > 0 else math.nan




def edge_note(good: float, band: tuple[float, float], tol: float = 0.15) -> str:
    """'edge' when a `SENSITIVITY` error of the profiles moves the predicted goodput by more
    than `tol`: the prediction sits on a knife edge (a queue near saturation, an SLO near
    the mean), and its error says little about the model."""
    lo, hi = band
    if not good > 0:
        return "edge" if hi > 0 else ""
    return "edge" if max(good - lo, hi - good) > tol * good else ""


def validate(run_dir: str, cal: Calibration | None = None,
             sensitivity: float = SENSITIVITY) -> tuple[list[dict], list[dict]]:
    """Predicted vs measured, for every (setup, workload) of a capstone run, on the run's
    own requests (same lengths, same arrival times, same window):
    - per run: goodput (req/s meeting every SLO) and attainment at each measured rate,
      with the band the predictions span when every profile's times are scaled by
      1 -+ `sensitivity` (`edge` when that moves the goodput by more than 15%), the means
      of TTFT, TPOT, prefill and KV transfer measured and simulated, and the largest decode
      batch the simulation ran when it exceeds the profiled range;
    - per search: the max rate at target attainment, found by the same search procedure
      (start rate, run budget, tolerance) on the simulator.
    The KV push and the order of landed requests are the ones the run recorded (`run_push`,
    `run_landed_fifo`: the old behaviour for a run that recorded none), whatever `cal`."""
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    cal = cal or run_calibration(run_dir, res)
    cal.meta["stream interval"] = res.get("meta", {}).get("stream interval", "1")  # the run's
    push, fifo = run_push(run_dir, res), run_landed_fifo(run_dir, res)
    slos, seed, burst = res["slos"], res["seed"], res["burstiness"]
    win = res.get("window", {})
    search = res.get("search", {})
    measured = {(r["setup"], r["workload"], r["request_rate"]): r for r in res["runs"]}
    beats = load_records(run_dir)  # {run key: heartbeats received}, where the run recorded them
    per_run, per_search = [], []
    for s in res["setups"]:
        try:
            setup = parse_setup(s["setup"])
        except ValueError:  # "external": nothing to simulate
            continue
        # the setup's workers keep their prefix caches from run to run; modelled only when
        # the prefill profile is a cold one (an older calibration was fitted with the hits)
        # (at most the KV pool each worker reported: a run's prompts that outgrow it leave
        # the next run, sending them in the same order, nothing to hit)
        pool = pool_blocks([beats.get(k) for k in beats if k.startswith(s["setup"] + "|")])
        caches = (PrefixCaches(pool * BLOCK_SIZE) if cal.meta.get("prefill_cold") == "1"
                  else None)
        for wname, w in s["by_workload"].items():
            lengths = [tuple(x) for x in w["lengths"]]
            if not lengths:
                continue
            for rate, _ in w.get("search_runs", []):
                m = measured.get((s["setup"], wname, rate))
                if m is None:
                    continue
                n = int(m.get("num_prompts") or len(lengths))  # the run's first n lengths
                ls = [lengths[i % len(lengths)] for i in range(n)]
                times = arrival_times(n, rate, burst, random.Random(seed + 7919))
                horizon = run_time_limit_s(m, ls, slos, bool(search.get("budget_s")))
                wu, cd = win.get("warmup", 0.1), win.get("cooldown", 0.1)
                info = SimRun()
                keys = [(wname, m.get("prompt_salt") or 0, i) for i in range(n)]  # salt 0: resent
                before = caches.copy() if caches else None
                # the routed workers' heartbeats as the coordinator received them (else
                # evenly spread phases), as the prefix caches replay what the run left
                hb = routed_times(beats.get(run_key(s["setup"], wname, float(rate), 0)),
                                  "both" if setup.both else "decode", setup.both or setup.decode)
                sim = simulate_setup(cal, setup, times, ls, horizon, info, keys, caches, hb,
                                     push, fifo)
                att, good = sim_summary(sim, slos, wu, cd, horizon)
                means = sim_means(sim, wu, cd)
                band = [sim_summary(simulate_setup(cal.scaled(f), setup, times, ls, horizon,
                                                   keys=keys, heartbeats=hb, push=push,
                                                   landed_fifo=fifo,
                                                   caches=before.copy() if before else None),
                                    slos, wu, cd, horizon) for f in
                        (1 - sensitivity, 1 + sensitivity)] if sensitivity else [(att, good)]
                g_band = (min(good, *(g for _, g in band)), max(good, *(g for _, g in band)))
                a_band = (min(att, *(a for a, _ in band)), max(att, *(a for a, _ in band)))
                got = m.get("steady_goodput", m["request_goodput"])
                notes = [edge_note(good, g_band)]
                if info.mean_decode_batch > cal.decode_max_batch:
                    notes.append(f"decode batch {info.mean_decode_batch:.0f} > profiled "
                                 f"{cal.decode_max_batch:.0f}")
                per_run.append({"setup": s["setup"], "workload": wname, "rate": rate,
                                "measured_goodput_rps": got,
                                "predicted_goodput_rps": good,
                                "error": validation_error(good, got),
                                f"band_{sensitivity:.0%}": f"{g_band[0]:.3g}-{g_band[1]:.3g}",
                                "measured_attainment": m["slo_attainment"],
                                "predicted_attainment": att,
                                f"attainment_band_{sensitivity:.0%}":
                                    f"{a_band[0]:.2f}-{a_band[1]:.2f}",
                                "ttft/tpot/prefill/transfer_ms": " / ".join(
                                    f"{m.get(f'mean_{k}_ms', math.nan):.3g} vs {means[k]:.3g}"
                                    for k in ("ttft", "tpot", "prefill", "transfer")),
                                "note": "; ".join(x for x in notes if x),
                                "heartbeats": "recorded" if hb else "staggered",
                                "band": g_band})
            if w.get("check_tol"):  # a plan check, not a search: capstone_check's section
                continue
            durs = [d for d in w.get("send_durations_s", []) if d]
            sized = bool(search.get("run_duration_s") or search.get("budget_s"))
            pred = predict(cal, setup, lengths, slos, res["target"], burst, seed,
                           guess=float(w.get("search_guess") or 0.0),
                           # as many runs as the measured search made (a budget may cut it)
                           max_runs=len(w.get("search_runs") or []) or search.get("max_runs", 6),
                           start_rate=search.get("start_rate"), rel_tol=search.get("rel_tol", 0.15),
                           min_duration_s=sum(durs) / len(durs) if sized and durs else 0.0,
                           min_requests=res["num_prompts"] if sized else 0,
                           grace_s=budget_grace_s(lengths, slos) if search.get("budget_s")
                           else 0.0, push=push, landed_fifo=fifo)
            per_search.append({"setup": s["setup"], "workload": wname,
                               "measured_max_rate": w["max_rate"],
                               "predicted_max_rate": pred.max_rate,
                               "error": validation_error(pred.max_rate, w["max_rate"]),
                               "note": "" if w.get("bracketed") else
                               "measured search not bracketed (a lower bound)"})
    return per_run, per_search


def _run_meta(run_dir: str, res: dict, key: str) -> dict[str, str]:
    """A run's results.json "meta", with its calibration.json's "meta" under it when the
    former lacks `key`."""
    meta = dict(res.get("meta") or {})
    path = os.path.join(run_dir, "calibration.json")
    if key not in meta and os.path.exists(path):
        with open(path) as f:
            meta = {**json.load(f).get("meta", {}), **meta}
    return meta


def run_push(run_dir: str, res: dict) -> KVPush:
    """How a capstone run's workers pushed KV: as its results.json "meta" records it (since
    branch plan6), else its calibration.json's "meta"; a run that recorded it in neither was
    made before 9df90d7: one host, peer copies during the forward (KVPush's defaults)."""
    return KVPush.from_meta(_run_meta(run_dir, res, "peer_copy_during_forward"))


def run_landed_fifo(run_dir: str, res: dict) -> bool:
    """Whether a capstone run's decode workers admitted landed requests in landing order
    ("landed_order", found as `run_push` finds the push); a run without it: newest first."""
    return landed_fifo(_run_meta(run_dir, res, "landed_order"))


def landed_describe(fifo: bool) -> str:
    return "in landing order (FIFO)" if fifo else "newest first"


def simulated_with(run_dir: str, cal: Calibration | None = None) -> str:
    """The capstone report's line on what `validate(run_dir, cal)` simulated with: the
    profiles (`cal`, else the run's, refitted as validate() refits them) and the KV push."""
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    used = cal or run_calibration(run_dir, res)
    return ("Profiles the simulator used: " + "; ".join(f"{k}: {v}" for k, v in used.source.items())
            + f"; KV push: {run_push(run_dir, res).describe()}; landed requests waiting "
            f"for a slot: {landed_describe(run_landed_fifo(run_dir, res))}.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", help="calibration.json, or a capstone run directory (its profiles refitted from its records as --validate refits them)")
    p.add_argument("--gpus", default="4", help="GPU counts, comma-separated (default 4)")
    p.add_argument("--workload", default="sharegpt-synth",
                   help="workload spec as in `pdserve bench capstone` (default sharegpt-synth)")
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:100"],
                   metavar="KEY:MS", help="SLOs (ttft, tpot, e2el), default ttft:1000 tpot:100")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment target (0.9)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1)")
    p.add_argument("--num-requests", type=int, default=400,
                   help="distinct simulated requests (lengths) per run (default 400)")
    p.add_argument("--duration", type=float, default=30.0,
                   help="simulated seconds of load at least, per run (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-colocated", action="store_true", help="only xPyD candidates")
    p.add_argument("--stream-interval", type=int, default=1, metavar="K",
                   help="the workers' --stream-interval: tokens a message through the "
                        "coordinator after a stream's first (default 1)")
    p.add_argument("--validate", metavar="RUN_DIR",
                   help="compare predictions with the measured goodput of a capstone run")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines")


def run(args: argparse.Namespace) -> int:
    from pdserve.benchmarks import plotting

    try:
        if args.validate:
            cal = load_calibration(args.calibration) if args.calibration else None
            with open(os.path.join(args.validate, "results.json")) as f:
                res = json.load(f)
            if cal is not None and not cal.relay_host:  # the validated run's host, probed
                probed_relay(cal, res.get("relay_probe"))
            push, fifo = run_push(args.validate, res), run_landed_fifo(args.validate, res)
            print(f"KV push simulated (recorded by the run, else the old one): {push.describe()}")
            print("landed requests waiting for a slot (recorded by the run, else newest first): "
                  + landed_describe(fifo))
            for line in validation_lines(*validate(args.validate, cal)):
                print(line)
            return 0
        cal = load_calibration(args.calibration)
        cal.meta["stream interval"] = str(max(1, args.stream_interval))
        slos = parse_goodput(args.goodput)
        wl = parse_workload(args.workload)
        gpu_counts = [int(x) for x in str(args.gpus).split(",") if x.strip()]
        if any(g < 2 for g in gpu_counts):
            raise ValueError("--gpus: each count must be >= 2 (one prefill + one decode)")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    push = KVPush.current()  # a new deployment: the installed engine's defaults
    fifo = LANDED_ORDER == "fifo"  # and its admit_remote
    print(f"calibration: {cal.source}; workload {wl.name}: {wl.describe}; SLOs {slos}; "
          f"target {args.target:.0%}; KV push: {push.describe()}; landed requests: "
          f"{landed_describe(fifo)}")
    for g in gpu_counts:
        rows = plan(cal, g, length_pairs(wl, args.num_requests, args.seed), slos, args.target,
                    args.burstiness, args.seed, not args.no_colocated, args.duration, push=push,
                    landed_fifo=fifo)
        plotting.print_rows(rows, ["gpus", "setup", "predicted_goodput_rps", "per_gpu_rps",
                                   "search"], args.json)
        best = rows[0]
        print(f"recommended for {g} GPUs: {best['setup']} "
              f"({best['predicted_goodput_rps']:.3g} req/s at >= {args.target:.0%} SLO attainment)\n")
    print(ASSUMPTIONS)
    return 0

"""`pdserve bench chaos`: faults injected into a local CPU cluster under load; does every
request end, and does the cluster recover?

    pdserve bench chaos            # short: SIGKILL and SIGSTOP of a decode worker
    pdserve bench chaos --full     # + prefill faults, a coordinator restart, gRPC fuzzing
    pdserve bench chaos --scenarios fuzz-secret   # fuzz behind the guard, with the secret

Starts a LocalCluster (tiny model on CPU over UCX, default 2 prefill + 2 decode) whose
children are supervised (pdserve/supervisor.py restarts what dies), runs one undisturbed
pass of the prompts for reference outputs, then per scenario: `--requests` greedy streams
of `--max-tokens` each; once half of them stream, the fault (SIGKILL of a role's worker 0,
SIGSTOP of it for `--stop-s` past the coordinator's timeouts then SIGCONT, SIGKILL of the
coordinator, or `--fuzz-calls` fuzz calls on every service: `fuzz` without credentials,
`fuzz-secret` with the cluster secret, so the calls reach the handlers' validation; a
call that ends UNKNOWN or INTERNAL counts as `fuzz_bad`, which must be 0). Per scenario:
  sent, succeeded, mismatched   streams that finished, and those whose tokens differ from
                                the undisturbed pass (migration must keep them equal)
  failed, failed_by_status      streams that ended with a status, by status
  hung                          streams still open 10 s past their deadline (must be 0)
  blocks_leaked                 KV blocks still held once the cluster is idle (must be 0)
  recovery_s                    fault -> first short probe request that succeeds
  restarts, crashes             children restarted by the supervisor; those not killed by
                                the scenario itself (must be 0)
  fuzz_bad                      fuzz calls that ended UNKNOWN/INTERNAL/DATA_LOSS (must be 0)
Results go to --out as chaos.md and chaos.csv with date, commit and machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from pdserve.benchmarks import plotting
from pdserve.benchmarks.chaos_load import BAD_STATUSES, Load, Probe, fuzz
from pdserve.child_process import signal_group
from pdserve.cluster import LocalCluster
from pdserve.coordinator.client import Client
from pdserve.supervisor import Supervisor

SHORT = ["kill9-decode", "sigstop-decode"]
FULL = ["kill9-decode", "sigstop-decode", "kill9-prefill", "sigstop-prefill",
        "coordinator-restart", "fuzz", "fuzz-secret"]
COLUMNS = ["scenario", "sent", "succeeded", "mismatched", "failed", "failed_by_status", "hung",
           "blocks_leaked", "recovery_s", "restarts", "crashes", "fuzz_bad"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="every scenario (default: the short set)")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated subset of {','.join(FULL)}")
    p.add_argument("--model", default="tiny")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--requests", type=int, default=None, help="streams per scenario "
                   "(default 16, 64 with --full)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per stream "
                   "(default 64, 128 with --full)")
    p.add_argument("--deadline", type=float, default=300.0, help="client deadline, s")
    p.add_argument("--stop-s", type=float, default=8.0, help="SIGSTOP duration, s")
    p.add_argument("--fuzz-calls", type=int, default=None, help="(default 300, 2000 with --full)")
    p.add_argument("--transfer-timeout", type=float, default=3.0)
    p.add_argument("--worker-timeout", type=float, default=5.0)
    p.add_argument("--stall-timeout", type=float, default=5.0)
    p.add_argument("--out", default=None, help="directory for chaos.md / chaos.csv")


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j + 1) % 250 for j in range(8 + (i * 5) % 40)] for i in range(n)]


class Chaos:
    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.args, self.say = args, say
        self.cluster = LocalCluster(
            args.model, prefill=args.prefill, decode=args.decode, devices="cpu", transfer="ucx",
            start_timeout_s=150, worker_args=["--transfer-timeout", str(args.transfer_timeout)],
            coordinator_args=["--worker-timeout", str(args.worker_timeout),
                              "--stall-timeout", str(args.stall_timeout)])
        self.sup = Supervisor(self.cluster, max_restarts=20, window_s=600, backoff_s=0.2,
                              say=lambda m: self.say("supervisor: " + m.splitlines()[-1]))
        self._stop = threading.Event()
        self._crash: str | None = None
        self.notes: list[str] = []
        self.fuzz_bad = 0  # fuzz calls of the current scenario that ended in BAD_STATUSES

    # -- cluster -------------------------------------------------------------------------
    def __enter__(self) -> Chaos:
        self.cluster.start()
        self.cluster.wait_ready(300)
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cluster.stop()

    def _supervise(self) -> None:
        while not self._stop.is_set() and self._crash is None:
            self._crash = self.sup.poll()
            time.sleep(0.1)

    def restarts(self) -> int:
        return sum(self.sup.restarts.values())

    def settle(self, timeout_s: float = 90.0) -> int:
        """Wait for a full, idle cluster; returns the KV blocks still held (leaked)."""
        want = self.args.prefill + self.args.decode
        end = time.monotonic() + timeout_s
        held = -1
        while time.monotonic() < end:
            try:
                with Client(self.cluster.address, timeout_s=5) as cl:
                    ws = cl.stats(live=True)["workers"]
                    held = sum(w["load"]["total_blocks"] - w["load"]["free_blocks"] for w in ws)
                    if len(ws) == want and held == 0 and all(w["last_seen_s"] < 2 for w in ws):
                        return 0
            except Exception:  # noqa: BLE001 - the coordinator may be restarting
                pass
            time.sleep(0.5)
        return max(held, 0)

    # -- scenarios -------------------------------------------------------------------------
    def _inject(self, name: str) -> None:
        c, a = self.cluster, self.args
        kind, _, role = name.partition("-")
        if kind == "kill9":
            signal_group(c.worker(role, 0), signal.SIGKILL)
        elif kind == "sigstop":
            proc = c.worker(role, 0)
            signal_group(proc, signal.SIGSTOP)
            time.sleep(a.stop_s)
            signal_group(proc, signal.SIGCONT)
        elif name == "coordinator-restart":
            assert c.coordinator is not None
            signal_group(c.coordinator, signal.SIGKILL)
        elif name in ("fuzz", "fuzz-secret"):
            targets = [("Coordinator", c.address)]
            with Client(c.address, timeout_s=5) as cl:
                targets += [("Worker", w["info"]["address"]) for w in cl.list_workers()]
            calls = a.fuzz_calls or (2000 if a.full else 300)
            secret = c.cluster_secret if name == "fuzz-secret" else None
            seen = fuzz(targets, calls, credential=secret)
            self.fuzz_bad = sum(n for k, n in seen.items() if k in BAD_STATUSES)
            self.say(f"{name}: {calls} calls -> {dict(seen)}")
            self.notes.append(f"- {name}: {calls} calls on {len(targets)} services (malformed "
                              f"bytes and odd values{', with the cluster secret' if secret else ''}"
                              "), statuses: "
                              + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
        else:
            raise ValueError(f"unknown scenario {name!r}")

    def scenario(self, name: str, prompts: list[list[int]], reference: list[list[int] | None] | None,
                 max_tokens: int) -> dict[str, object]:
        a = self.args
        self.settle()
        killed = 1 if name.startswith("kill9") or name == "coordinator-restart" else 0
        r0 = self.restarts()
        self.fuzz_bad = 0
        load = Load(self.cluster.address, prompts, max_tokens, a.deadline).start()
        end = time.monotonic() + 60
        while load.streaming() < len(prompts) // 2 and time.monotonic() < end:
            time.sleep(0.05)
        probe = Probe(self.cluster.address).start()
        self._inject(name)
        hung = load.join()
        recovery = probe.wait()
        leaked = self.settle()
        restarts = self.restarts() - r0
        row = {"scenario": name, **load.summary(reference), "hung": hung,
               "blocks_leaked": leaked, "recovery_s": recovery if recovery is not None else "never",
               "restarts": restarts, "crashes": max(0, restarts - killed),
               "fuzz_bad": self.fuzz_bad}
        self.say(" ".join(f"{k}={v}" for k, v in row.items()))
        return row


def run(args: argparse.Namespace) -> int:
    names = (args.scenarios.split(",") if args.scenarios else FULL if args.full else SHORT)
    n = args.requests or (64 if args.full else 16)
    max_tokens = args.max_tokens or (128 if args.full else 64)

    def say(msg: str) -> None:
        print(f"chaos: {msg}", file=sys.stderr, flush=True)

    prompts = _prompts(n)
    load_start = plotting.load_average()
    rows = []
    t0 = time.monotonic()
    with Chaos(args, say) as chaos:
        say(f"cluster ready ({args.prefill} prefill, {args.decode} decode); reference pass")
        ref = Load(chaos.cluster.address, prompts, max_tokens, args.deadline).start()
        ref.join()
        reference = [o.tokens if o.status == "OK" else None for o in ref.outcomes]
        for name in names:
            rows.append(chaos.scenario(name, prompts, reference, max_tokens))
        if chaos._crash is not None:
            say(f"supervisor gave up: {chaos._crash}")
    plotting.print_rows(rows, COLUMNS, as_json=False)
    if args.out:
        meta = plotting.run_metadata("cpu")
        meta["cluster"] = (f"{args.prefill} prefill + {args.decode} decode, model {args.model}, "
                           f"CPU, UCX; transfer timeout {args.transfer_timeout:g} s, worker "
                           f"timeout {args.worker_timeout:g} s, stall timeout "
                           f"{args.stall_timeout:g} s, SIGSTOP {args.stop_s:g} s")
        meta["load"] = f"{n} greedy streams x {max_tokens} tokens per scenario"
        meta["wall_s"] = f"{time.monotonic() - t0:.0f}"
        meta["load average (1, 5, 15 min)"] = f"{load_start} at the start, " \
            f"{plotting.load_average()} at the end (the machine is shared)"
        plotting.write_csv(os.path.join(args.out, "chaos.csv"), rows, COLUMNS)
        plotting.write_markdown(os.path.join(args.out, "chaos.md"), rows, COLUMNS,
                                title="pdserve bench chaos", meta=meta, notes=chaos.notes)
        say(f"wrote {args.out}/chaos.md and chaos.csv")
    bad = [r for r in rows if r["hung"] or r["blocks_leaked"] or r["crashes"] or r["mismatched"]
           or r["fuzz_bad"]]
    return 1 if bad or chaos._crash else 0

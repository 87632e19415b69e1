"""Start rates of the capstone's max-rate searches, from the planner's prediction; how the
workers a run starts push KV (`kv_push`), order landed requests and stream tokens
(`kv_push_meta`), recorded in the run's meta for the planner."""

from __future__ import annotations

import argparse
import time

from pdserve.benchmarks.planner_setups import LANDED_ORDER, KVPush, landed_fifo


def kv_push(args: argparse.Namespace) -> KVPush | None:
    """How the workers this run starts push KV: LocalCluster starts them on one host, with
    the --worker-arg flags, under the installed engine's defaults; None for a server the
    run did not start (--coordinator, --base-url)."""
    if getattr(args, "coordinator", None) or getattr(args, "base_url", None):
        return None
    return KVPush.current(getattr(args, "worker_arg", None) or [], one_host=True)


def kv_push_meta(args: argparse.Namespace) -> dict[str, str]:
    """`kv_push` as results.json and calibration.json record it, with the installed
    engine's order of landed requests (`landed_order`); {} when not known (a server the
    run did not start): the planner then assumes the old behaviour (KVPush's defaults,
    newest first)."""
    push = kv_push(args)
    if not push:
        return {}
    return {**push.meta(), "landed_order": LANDED_ORDER,
            "stream interval": str(stream_interval(args.worker_arg or []))}


def stream_interval(worker_args) -> int:
    """The tokens a message after a stream's first (`pdserve worker --stream-interval`) of
    workers started with `worker_args`: what the planner's relay counts messages by."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--stream-interval", type=int, default=1)
    return max(1, p.parse_known_args(list(worker_args))[0].stream_interval)


def start_guesses(args: argparse.Namespace, names: list[str], wls: list,
                  slos: dict[str, float]) -> dict[str, dict[str, float]]:
    """{setup: {workload: predicted max rate}} from `--plan-check-from` (to 2%: the
    predictions the run checks, capstone_check.py) or else `--start-rate-from` (to 10%:
    where each search steps to), none without either, printed; the simulated runs are as
    long as the measured ones will be at most."""
    check = getattr(args, "plan_check_from", None)
    path = check or getattr(args, "start_rate_from", None)
    if not path:
        return {}
    from pdserve.benchmarks import plan
    from pdserve.benchmarks.capstone_check import PREDICTED_RUN_S, check_run_s
    from pdserve.benchmarks.capstone_workloads import length_pairs

    cal = plan.load_calibration(path)
    # the message count is this run's workers', the profiles the calibration's
    cal.meta["stream interval"] = str(stream_interval(getattr(args, "worker_arg", None) or []))
    if getattr(args, "relay_host", None):  # probed on this host now (capstone_relay_probe)
        cal.relay_host = dict(args.relay_host)
        cal.source["relay_host"] = "probed on this host before the setups started"
    n = max(args.num_requests, 200)
    workloads = [(wl.name, [(len(ids), o) for ids, o in pool][:n] if pool
                  else length_pairs(wl, n, args.seed)) for wl, pool in wls]
    t0 = time.monotonic()
    out = plan.guess_max_rates(cal, names, workloads, slos, args.target, args.burstiness,
                               args.seed, duration_s=check_run_s(args.run_duration) if check
                               else min(args.run_duration or PREDICTED_RUN_S, PREDICTED_RUN_S),
                               rel_tol=0.02 if check else 0.1,
                               min_requests=args.num_requests, push=kv_push(args) or KVPush(),
                               landed_fifo=landed_fifo(kv_push_meta(args)))
    print(f"predicted max rates from {path} ({'to check' if check else 'steering the searches'}; "
          f"{time.monotonic() - t0:.1f} s): " + "; ".join(
              f"{s} {w} {r:.3g}" for s, ws in out.items() for w, r in ws.items()), flush=True)
    return out

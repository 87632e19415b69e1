"""One setup's measurements in `pdserve bench capstone`: every workload's rate search (or
its fixed-concurrency levels) against one running setup, each run sized by the time
budget (benchmarks/capstone_budget.py) when there is one. Every run sends prompts of its
own (`make_requests`' salt: the lengths and arrivals of one seed, another first token), so
it starts with none of its prompts in the workers' prefix caches, whatever ran before: the
planner predicts cold runs (earlier runs resent request i's prompt at every rate, and how
much of it the next run found cached depended on whether the earlier run's prompts fitted
in the KV pool).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time

from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks.capstone_budget import MIN_RUN_S, RunSizer, run_size
from pdserve.benchmarks.capstone_check import CHECK_TOL, add_run_lengths, check_run_s, run_check
from pdserve.benchmarks.capstone_load import LoadProcs
from pdserve.benchmarks.capstone_metrics import Window, summarize
from pdserve.benchmarks.capstone_search import SHORT_FRAC, SearchResult, find_max_rate
from pdserve.benchmarks.capstone_workloads import Request, Workload, length_pairs, make_requests
from pdserve.benchmarks.cpu_sample import CpuSample, cpu_usage


def drain_estimate_s(wl: Workload, pool: list | None, slos: dict[str, float], seed: int) -> float:
    """Before any run: how long a run's last requests take after the last send, if they
    meet the SLOs (TTFT + mean output x TPOT, or the E2E SLO), in seconds."""
    if pool:
        mean_out = sum(o for _, o in pool) / len(pool)
    else:
        pairs = length_pairs(wl, 64, seed)
        mean_out = sum(o for _, o in pairs) / len(pairs)
    est = slos.get("ttft", 1000.0) + mean_out * slos.get("tpot", 50.0)
    return min(est, slos.get("e2el", math.inf)) / 1e3


WARMUP_SHAPES = (255, 256, 1279, 1280)  # block tables 16 and 80 wide whatever the rounding,
# under and past the prefill attention's 1024-token tile switch (kernels/prefill_attention.py)


def warmup_requests(args: argparse.Namespace, info: dict, wls: list) -> list[list[Request]]:
    """What a setup runs before its measured runs, each list sent as one load: the
    sequential `--warmup-requests`, then with `--warmup-burst N`: one prompt of each of
    WARMUP_SHAPES alone (the engine's own warm-up gives no block table whose width is a
    multiple of 16, which Triton specialises on, so the first such step compiled a kernel
    inside the first measured run), and N requests of each workload sent at once (batched
    and chunked prefill steps, mixed steps, larger allocations)."""
    vocab = info["vocab"]
    warm = [[Request(0.0, [(7 * i + j) % (vocab - 1) + 1 for j in range(16)], 4)]
            for i in range(args.warmup_requests)]
    n = getattr(args, "warmup_burst", 0)
    if n > 0:
        cap = (info.get("max_len") or 4096) - 8
        warm += [[Request(0.0, [(5 * k + j) % (vocab - 1) + 1 for j in range(min(k, cap))], 2)]
                 for k in WARMUP_SHAPES]
        for wl, pool in wls:
            reqs = make_requests(wl, n, 1e9, args.seed + 104729, vocab, 1.0, info["max_len"],
                                 pool)
            warm.append([Request(0.0, r.prompt, min(r.output_len, 8)) for r in reqs])
    return warm


def run_bounds(run_duration_s: float, check: bool) -> tuple[float, float]:
    """(longest, shortest) seconds of arrivals for a budgeted run. A plan check's runs are
    as long as the simulated runs of its predictions (capstone_check.check_run_s) and none
    shorter than SHORT_FRAC of that, which could not decide (SearchResult.verdict)."""
    run_s = check_run_s(run_duration_s) if check else 0.0
    if run_s:
        return run_s, max(MIN_RUN_S, SHORT_FRAC * run_s)
    return run_duration_s, MIN_RUN_S


def measure_setup(target, info: dict, args: argparse.Namespace, wls: list, slos: dict,
                  window: Window, loop: asyncio.AbstractEventLoop, budget,
                  deadline_s: float = math.inf,
                  guesses: dict[str, float] | None = None,
                  load: LoadProcs | None = None) -> report.SetupResult:
    """Every workload on one setup, by `deadline_s` (monotonic; inf: no budget);
    `guesses`: {workload: predicted max rate} steering each search (capstone_search), or
    checked at two rates (--plan-check-from: capstone_check); `load`: the load processes
    (capstone_load.py; none: this process sends)."""
    from pdserve.benchmarks.capstone import concurrency_levels

    res = report.SetupResult(info["label"], info["workers"], info["pools"])
    check = bool(getattr(args, "plan_check_from", None))  # out of sample (capstone_check.py)
    load = load or LoadProcs(1)
    for batch in warmup_requests(args, info, wls):  # every load process connects too
        loop.run_until_complete(load.warm(target, batch, args.timeout) if len(batch) == 1
                                else load.run(target, batch, args.timeout))
    levels = concurrency_levels(args)
    # CPU per run (results.json "cpu_cores"): whether the host path, not the GPUs, was full;
    # the load generator is this process (GPU and heartbeat pollers) and the load processes
    cpu_groups = {"harness": [os.getpid(), *load.pids()]}
    if info.get("coordinator_pid"):
        cpu_groups["coordinator"] = [info["coordinator_pid"]]
    for k, (wl, pool) in enumerate(wls):
        wr = report.WorkloadRuns(wl.name, wl.describe)
        res.by_workload[wl.name] = wr
        share_end = (deadline_s if math.isinf(deadline_s) else
                     time.monotonic() + (deadline_s - time.monotonic()) / (len(wls) - k))
        sizer = RunSizer(share_end, len(levels) or args.max_runs,
                         drain_estimate_s(wl, pool, slos, args.seed),
                         *run_bounds(args.run_duration, check))
        if not sizer.can_run(2 if check else 1):  # a check decides with two runs
            budget.cut(f"{res.setup} / {wl.name}: not run (its share of the budget was spent)")
            continue

        def one(rate: float, conc: int = 0, wl: Workload = wl, pool: list | None = pool,
                wr: report.WorkloadRuns = wr, sizer: RunSizer = sizer) -> float:
            duration = sizer.duration_s() if not conc else 0.0
            n = run_size(rate, args.num_requests, duration)
            salt = len(wr.runs) + 1  # every run cold: no prompt an earlier run sent
            reqs = make_requests(wl, n, rate, args.seed, info["vocab"], args.burstiness,
                                 info["max_len"], pool, salt)
            desc = f"{res.setup} {wl.name} @ " + (f"c={conc}" if conc else f"{rate:.3g} req/s")
            t0 = time.monotonic()
            limit = sizer.stop_at(reqs[-1].at_s) - t0
            cpu0 = CpuSample.take(cpu_groups)
            results = loop.run_until_complete(load.run(target, reqs, args.timeout, conc, desc,
                                                       time_limit_s=limit))
            cores = cpu_usage(cpu0, CpuSample.take(cpu_groups))
            sizer.ran(time.monotonic() - t0, reqs[-1].at_s)
            summary = summarize(results, slos, window)
            summary["send_duration_s"] = reqs[-1].at_s
            summary["prompt_salt"] = salt  # its prompts' first token (capstone_steps.warm_counts)
            summary["cpu_cores"] = {g: round(c, 3) for g, c in cores.items()}
            if not math.isinf(limit):  # the planner's validation cuts its runs there too
                summary["time_limit_s"] = limit
            wr.runs.append(report.Run(rate, conc, results, summary))
            errors = [r.error for r in results if r.error]
            print(f"{desc}: {n} requests over {reqs[-1].at_s:.3g} s; "
                  f"{summary['steady_throughput']:.3g} req/s achieved, attainment "
                  f"{summary['slo_attainment']:.0%}, TTFT p90 {summary['p90_ttft_ms']:.4g} ms, "
                  f"ITL p99 {summary['p99_itl_ms']:.4g} ms; CPU cores: " + ", ".join(
                      f"{g} {c:.2f}" for g, c in cores.items())
                  + (f"; {len(errors)} failed, first: {errors[0]}" if errors else ""), flush=True)
            return summary["slo_attainment"]

        if levels:
            for i, c in enumerate(levels):
                if i and not sizer.can_run():
                    budget.cut(f"{res.setup} / {wl.name}: concurrency {levels[i:]} not run")
                    break
                one(math.inf, c)
            continue
        guess = (guesses or {}).get(wl.name, 0.0)
        if check:
            if not guess > 0:
                print(f"{res.setup} {wl.name}: no prediction to check (the planner found no "
                      "rate holding the target)", flush=True)
                wr.search = SearchResult(0.0, args.target, check_tol=CHECK_TOL)
                continue
            wr.search = run_check(one, guess, args.target, can_run=sizer.can_run)
            add_run_lengths(wr.search, wr.runs, args.run_duration)
        else:
            wr.search = find_max_rate(one, args.start_rate, args.target, args.max_runs,
                                      args.rel_tol, can_run=sizer.can_run, guess=guess)
        if wr.search.cut:
            budget.cut(f"{res.setup} / {wl.name}: search stopped after {len(wr.search.runs)} "
                       f"of {args.max_runs} runs")
        print(f"{res.setup} {wl.name}: {wr.search.describe()}", flush=True)
    return res

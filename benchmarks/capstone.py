"""`pdserve bench capstone`: when does disaggregation help? One sweep, one report directory.

For each setup of `--configs` (xPyD or Nboth, launched with LocalCluster on `--devices`;
or one running server: `--coordinator HOST:PORT`, or any OpenAI-compatible `--base-url`)
and each workload (`--workload SPEC`, repeatable; `--dataset sharegpt PATH`), it searches
for the highest arrival rate that holds `--target` SLO attainment (bisection with at most
`--max-runs` runs, starting at `--start-rate`, which every setup runs, so the CDFs and the
SLO map compare setups at the same rate), or runs each `--concurrency` level. It writes
`results.json` (vLLM field names), `calibration.json` (for `pdserve plan`), `report.md`
and PNGs into `--out`. See docs/capstone.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable

from pdserve.benchmarks import capstone_check as plan_check
from pdserve.benchmarks import capstone_plots as plots
from pdserve.benchmarks import capstone_relay_probe as relay_probe
from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks import capstone_transfer_step as transfer_step
from pdserve.benchmarks import plotting
from pdserve.benchmarks.capstone_budget import Budget
from pdserve.benchmarks.capstone_client import GpuSampler
from pdserve.benchmarks.capstone_findings import findings
from pdserve.benchmarks.capstone_guess import kv_push_meta, start_guesses
from pdserve.benchmarks.capstone_heartbeats import HeartbeatRecorder
from pdserve.benchmarks.capstone_load import LoadProcs, parse_procs
from pdserve.benchmarks.capstone_metrics import Window, parse_goodput
from pdserve.benchmarks.capstone_rerender import write_records
from pdserve.benchmarks.capstone_setup import open_setup
from pdserve.benchmarks.capstone_sweep import measure_setup
from pdserve.benchmarks.capstone_workloads import Workload, load_sharegpt, parse_workload
from pdserve.benchmarks.planner_setups import parse_setup

NAME = "capstone"
# kept of a --budget-s for the report (plots; the validation simulates each run: 30 took 36 s)
REPORT_RESERVE_S, REPORT_S_PER_RUN = 20.0, 1.0


def config_list(value: str) -> list[str]:
    """'1P1D,2both' -> ['1P1D', '2both'] (each checked)."""
    out = [s.strip() for s in value.split(",") if s.strip()]
    try:
        for s in out:
            parse_setup(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one setup, e.g. 1P1D,2both")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--configs", type=config_list, action="append",
                   help="setups to launch, e.g. 1P1D,2both or 1P3D,2P2D,3P1D,4both; "
                        "xPyD-condT (1P1D-cond512): conditional disaggregation, the "
                        "coordinator's --pd-threshold-tokens T: prompts under T tokens are "
                        "prefilled on their decode worker (repeatable; default 1P1D,2both)")
    g.add_argument("--model", default="tiny", help="preset name or HF directory (default tiny)")
    g.add_argument("--devices", default="auto", help="cpu, auto or GPUs '0,1,2,3'")
    g.add_argument("--transfer", choices=["nccl", "ucx"], help="default: nccl on GPUs, ucx on cpu")
    g.add_argument("--worker-arg", action="append", default=[], help="extra worker flag (repeatable)")
    g.add_argument("--start-timeout", type=float, default=600.0, help="seconds for workers to start")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="measure this running pdserve instead")
    g.add_argument("--base-url", metavar="URL",
                   help="measure any OpenAI-compatible server (/v1/completions, streaming)")
    g.add_argument("--served-model-name", default="", help="--base-url: the 'model' field")
    g.add_argument("--vocab", type=int, default=1000,
                   help="--base-url: random prompt ids are drawn from [1, VOCAB) (default 1000, "
                        "valid for any real tokenizer)")
    transfer_step.add_arguments(p.add_argument_group("dedicated transfer step"))
    relay_probe.add_arguments(p.add_argument_group("relay probe"))
    w = p.add_argument_group("workload")
    w.add_argument("--workload", action="append", metavar="SPEC",
                   help="fixed:in=N,out=N | uniform:in=LO-HI,out=LO-HI | sharegpt-synth | "
                        "shared-prefix:prefix=N,suffix=LO-HI,out=N | prefill-heavy | "
                        "decode-heavy (repeatable; default sharegpt-synth)")
    w.add_argument("--dataset", nargs=2, metavar=("sharegpt", "PATH"), action="append",
                   help="a ShareGPT JSON file, tokenized with --tokenizer")
    w.add_argument("--tokenizer", help="tokenizer for --dataset (default: --model)")
    w.add_argument("--num-requests", type=int, default=200,
                   help="requests per run (200); with --run-duration or --budget-s, the minimum")
    w.add_argument("--run-duration", type=float, default=0.0, metavar="S",
                   help="send for S seconds per run (rate x S requests, at least "
                        "--num-requests), so the achieved rate can reach the offered one; "
                        "with --budget-s, the longest run (default: none)")
    w.add_argument("--budget-s", type=float, default=0.0, metavar="S",
                   help="wall-clock budget of the whole sweep: divided among setups (start-up "
                        "included), workloads and runs; runs are sized to fit and searches "
                        "stop when their share is spent; the report says what was cut "
                        "(default: none)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps (1 = Poisson)")
    w.add_argument("--concurrency", type=str, default="",
                   help="fixed-concurrency mode: levels '1,4,16' instead of the rate search")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup-requests", type=int, default=2, help="sequential requests per setup")
    w.add_argument("--warmup-burst", type=int, default=0, metavar="N",
                   help="per setup, before measuring: a few prompts whose KV block tables "
                        "are 16 and 80 blocks wide, then N requests of each workload at once "
                        "(kernels that only batched steps use compile here, not in the "
                        "first measured run; default 0: none)")
    w.add_argument("--timeout", type=float, default=300.0, help="per-request deadline (s)")
    w.add_argument("--load-procs", type=parse_procs, default="auto", metavar="N|auto",
                   help="processes that send the load and receive the streams, so the client "
                        "is not what limits a run (default auto: one per 16 host cores, 1 to 4)")
    s = p.add_argument_group("SLOs and search")
    s.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:100"], metavar="KEY:MS",
                   help="SLOs as vLLM's --goodput: ttft:MS tpot:MS e2el:MS")
    s.add_argument("--target", type=float, default=0.9, help="SLO attainment target (0.9)")
    s.add_argument("--start-rate", type=float, default=2.0, help="first rate of every search")
    s.add_argument("--start-rate-from", metavar="CALIBRATION",
                   help="calibration.json (or a capstone run directory) of an earlier run "
                        "on the same model and GPUs: the planner predicts each setup and "
                        "workload's max rate from it, and each search's second run goes just "
                        "past (or under) that prediction, so three runs can bracket it")
    plan_check.add_argument(s)
    s.add_argument("--max-runs", type=int, default=6, help="runs per search (6)")
    s.add_argument("--rel-tol", type=float, default=0.15, help="stop when hi/lo <= 1 + this")
    s.add_argument("--window-warmup", type=float, default=0.1, help="fraction excluded at start")
    s.add_argument("--window-cooldown", type=float, default=0.1, help="fraction excluded at end")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help=f"report directory (default benchmarks/results/{NAME}; with "
                        "--report-from: that directory)")
    o.add_argument("--report-from", metavar="DIR",
                   help="no measurement: write the report again from DIR's results.json, "
                        "calibration.json and requests.json.gz (benchmarks/capstone_rerender.py)")
    o.add_argument("--meta", action="append", metavar="KEY=VALUE",
                   help="--report-from: set a line of the report's header (e.g. a commit the "
                        "run could not record)")
    o.add_argument("--label", default="", help="a line for the report")
    o.add_argument("--no-plan", action="store_true", help="skip the planner validation")
    o.add_argument("--extrapolate", default="8,16,64", type=lambda v: [int(x) for x in v.split(",")
                                                                      if x.strip()],
                   help="GPU counts the planner extrapolates to from this run's calibration "
                        "(default 8,16,64; '' = none)")


def check_args(args: argparse.Namespace) -> str | None:
    if args.coordinator and args.base_url:
        return "give at most one of --coordinator and --base-url"
    if args.num_requests < 2:
        return "--num-requests must be at least 2"
    if args.run_duration < 0 or args.budget_s < 0:
        return "--run-duration and --budget-s must be >= 0 (0 = none)"
    if not 0 < args.target <= 1 or args.start_rate <= 0 or args.max_runs < 1:
        return "need 0 < --target <= 1, --start-rate > 0, --max-runs >= 1"
    if not (0 <= args.window_warmup < 1 and 0 <= args.window_cooldown < 1
            and args.window_warmup + args.window_cooldown < 1):
        return "--window-warmup and --window-cooldown must be fractions summing to < 1"
    if getattr(args, "start_rate_from", None) and not os.path.exists(args.start_rate_from):
        return f"--start-rate-from {args.start_rate_from}: no such file or directory"
    if err := plan_check.check_args(args):
        return err
    if getattr(args, "warmup_burst", 0) < 0:
        return "--warmup-burst must be >= 0"
    if err := transfer_step.check(args) or relay_probe.check(args):
        return err
    for kind, _ in args.dataset or []:
        if kind != "sharegpt":
            return f"--dataset: only 'sharegpt' is supported, got {kind!r}"
    try:
        parse_goodput(args.goodput)
        concurrency_levels(args)
        for spec in args.workload or []:
            parse_workload(spec)
    except ValueError as e:
        return str(e)
    return None


def concurrency_levels(args: argparse.Namespace) -> list[int]:
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if any(c < 1 for c in levels):
        raise ValueError("--concurrency levels must be >= 1")
    return levels


def setups_of(args: argparse.Namespace) -> list[str]:
    if args.coordinator or args.base_url:
        return ["external"]
    return list(dict.fromkeys(s for group in (args.configs or [["1P1D", "2both"]]) for s in group))


def load_workloads(args: argparse.Namespace) -> list[tuple[Workload, list | None]]:
    out: list[tuple[Workload, list | None]] = [(parse_workload(s), None) for s in
                                               (args.workload or ([] if args.dataset else ["sharegpt-synth"]))]
    for _, path in args.dataset or []:
        from pdserve.engine.tokenizer import get_tokenizer

        tok = get_tokenizer(args.tokenizer or args.model)
        out.append(load_sharegpt(path, tok.encode))
    return out


def write_report(args: argparse.Namespace, setups: list[report.SetupResult],
                 ctx: report.Context, wls: list, rerendered: str = "") -> list[str]:
    """Everything of the report directory; `rerendered` (--report-from): results.json is
    kept, and calibration.json too unless per-request data lets it be fitted again."""
    out = plotting.ensure_dir(args.out)
    workloads = {wl.name: {"describe": wl.describe, "params": wl.params} for wl, _ in wls}
    have_requests = any(r.results for s in setups for w in s.by_workload.values() for r in w.runs)
    paths = [] if rerendered else write_records(out, setups, ctx, wls)
    if have_requests:
        paths.append(report.write_calibration(out, setups, ctx))
    if rerendered:
        ctx.meta["report"] = f"re-rendered with `--report-from` ({rerendered})"
    pngs: dict[str, str] = {}
    map_text: dict[str, str] = {}
    title = " vs ".join(s.setup for s in setups) + f" ({ctx.meta.get('device', '')})"
    try:
        p = plots.goodput_vs_rate(os.path.join(out, "goodput_vs_rate.png"), setups, title)
        if p:
            pngs["goodput vs achieved rate"] = p
        rate = ctx.start_rate if not concurrency_levels(args) else math.inf
        for i, (wl, _) in enumerate(wls if have_requests else []):
            # one folder per workload: at most 8 files per folder, whatever the workloads
            p = plots.latency_cdfs(os.path.join(out, f"w{i}", "cdf.png"), setups, wl.name, rate,
                                   ctx.window)
            if p:
                pngs[f"TTFT and ITL CDFs: {wl.name}"] = p
            p, text = plots.slo_map_png(os.path.join(out, f"w{i}", "slo_map.png"), setups,
                                        wl.name, rate, ctx.window)
            if p:
                pngs[f"SLO attainment map: {wl.name}"] = p
                map_text[wl.name] = text
        for key, fn in (("transfer time vs input length",  # the step's points first
                         lambda p, s: plots.transfer_vs_input(p, s, ctx.transfer_step)),
                        ("GPU utilization per pool", plots.gpu_util)):
            p = fn(os.path.join(out, key.split()[0].lower() + ".png"), setups)
            if p:
                pngs[key] = p
    except ImportError as e:
        print(f"note: no plots ({e}); pip install matplotlib", file=sys.stderr)
    if rerendered and not have_requests:  # the run's own PNGs, where they exist
        olds = {"transfer time vs input length": "transfer.png",
                "GPU utilization per pool": "gpu.png"}
        for i, (wl, _) in enumerate(wls):
            olds[f"TTFT and ITL CDFs: {wl.name}"] = os.path.join(f"w{i}", "cdf.png")
            olds[f"SLO attainment map: {wl.name}"] = os.path.join(f"w{i}", "slo_map.png")
        for key, rel in olds.items():
            if key not in pngs and os.path.exists(os.path.join(out, rel)):
                pngs[key + " (as the run drew it)"] = os.path.join(out, rel)
    plan_lines: list[str] = plan_check.report_lines(
        [(s.setup, w.workload, w.search) for s in setups for w in s.by_workload.values()
         if w.search and w.search.check_tol], ctx.meta.get("plan check from", "?"),
        host_path_busy(ctx, setups))
    if not args.no_plan and not concurrency_levels(args) and setups[0].setup != "external":
        from pdserve.benchmarks import plan, plan_report

        with open(os.path.join(out, "results.json")) as f:
            cal = plan.run_calibration(out, json.load(f))  # refitted once, used twice
        per_run, per_search = plan.validate(out, cal)
        plan_lines += ["", "### Planner validation", "", plan.simulated_with(out, cal), "",
                      *plan_report.validation_lines(per_run, per_search)]
        if args.extrapolate:
            plan_lines += ["", "### Extrapolation", "", *plan_report.extrapolation_lines(
                per_search, args.extrapolate, plan.ASSUMPTIONS, cal.relay_host or cal.relay,
                plan_report.mean_out_tokens(setups), int(cal.meta.get("stream interval", 1)))]
    answers = findings(setups, ctx) if setups[0].setup != "external" else []
    paths.append(report.write_markdown(out, setups, ctx, workloads, pngs, map_text, plan_lines,
                                       answers))
    return paths + list(pngs.values())

def host_path_busy(ctx: report.Context, setups) -> Callable[[str, str, float], float] | None:
    """(setup, workload, rate) -> the share of the host path's time that rate takes at the
    run's relay probe (`ctx.relay_probe`); None without a probe or lengths."""
    from pdserve.benchmarks import plan_report

    fit = (ctx.relay_probe or {}).get("fit")
    outs = plan_report.mean_out_tokens(setups)
    if not fit or not outs:
        return None
    every = int(ctx.meta.get("stream interval", 1))  # the workers' tokens a message
    return lambda setup, wname, rate: (plan_report.host_path_busy(
        rate, outs[wname], setup, fit, every) if wname in outs else math.nan)


def run(args: argparse.Namespace) -> int:
    from pdserve.benchmarks.serve import device_description
    from pdserve.proto.grpc_util import install_uvloop

    if args.report_from:
        from pdserve.benchmarks.capstone_rerender import rerender

        args.out_given = args.out is not None
        return rerender(args)
    args.out = args.out or f"benchmarks/results/{NAME}"
    err = check_args(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    install_uvloop()
    slos = parse_goodput(args.goodput)
    window = Window(args.window_warmup, args.window_cooldown)
    try:
        wls = load_workloads(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"device": device_description(args), "model": args.model,
            "commit": plotting.commit_id(), "load average at start": plotting.load_average(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **kv_push_meta(args)}  # how its workers push KV, for the planner (KVPush)
    if args.label:
        meta = {"run": args.label, **meta}
    if args.plan_check_from:  # two runs per setup and workload (capstone_check.py)
        args.max_runs = 2
        meta["plan check from"] = plan_check.source(args.plan_check_from)
    ctx = report.Context(slos, args.target, window, args.burstiness, args.seed,
                         args.start_rate, args.num_requests, meta, args.max_runs, args.rel_tol,
                         args.run_duration, args.budget_s)
    results: list[report.SetupResult] = []
    failed: list[str] = []
    budget = Budget(args.budget_s)
    names = setups_of(args)
    # before any worker starts: bench transfer on the first P/D setup's GPUs (its share)
    ctx.transfer_step = transfer_step.run_step(args, names, budget)
    # then the host path below its knee (its costs steer or are checked: start_guesses)
    ctx.relay_probe = relay_probe.run_step(args, budget)
    args.relay_host = (ctx.relay_probe or {}).get("fit") or {}
    if ctx.relay_probe is not None:
        meta["relay probe"] = relay_probe.describe(ctx.relay_probe)
    # one event loop for every setup: grpc.aio's poller stays bound to each loop that made
    # an aio object and calls into it; with a loop per setup, a closed one raised "Event
    # loop is closed" on later events (846 tracebacks in the log of a 4-GPU calibration)
    loop = asyncio.new_event_loop()
    procs = getattr(args, "load_procs", 1)
    meta["load processes"] = str(procs)
    try:
        with LoadProcs(procs) as load:
            measure_all(args, names, wls, slos, window, ctx, budget, loop, results, failed, load)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    if budget.limited:
        meta["time budget"] = (f"{args.budget_s:g} s; used {time.monotonic() - budget.start_s:.0f} s"
                               " before the report")
        meta["cut by the time budget"] = "; ".join(budget.cuts) or "nothing"
    meta["load average at end"] = plotting.load_average()
    if failed:
        meta["setups that failed"] = "; ".join(failed)
    if results:
        for path in write_report(args, results, ctx, wls):
            print("wrote", path)
    return 1 if failed else 0


def measure_all(args: argparse.Namespace, names: list[str], wls: list, slos: dict, window,
                ctx, budget: Budget, loop: asyncio.AbstractEventLoop,
                results: list, failed: list[str], load: LoadProcs | None = None) -> None:
    """Start, measure and stop each setup in turn on `loop`, appending to `results` (and
    to `failed` a setup that could not run); the records are written after every setup."""
    from pdserve.cluster import ClusterError

    for i, name in enumerate(names):
        # each setup not yet run: an equal share of what is left (start-up included)
        deadline = budget.deadline(len(names) - i, reserve_s=REPORT_RESERVE_S + REPORT_S_PER_RUN
                                   * len(names) * len(wls) * args.max_runs)
        if budget.limited and deadline - time.monotonic() < 2 * budget.min_run_s:
            budget.cut(f"{name}: not started (the budget was spent)")
            continue
        try:
            # a start that would take the setup's whole share fails instead (TimeoutError)
            start_s = min(args.start_timeout, max(1.0, deadline - time.monotonic()))
            with open_setup(name, args, start_s) as (target, info):
                # GPUs seen from this host: only for setups launched here
                gpus = [] if args.coordinator else [g for pool in info["pools"].values()
                                                    for g in pool]
                with GpuSampler(gpus) as sampler, \
                        HeartbeatRecorder(info.get("coordinator")) as beats:
                    guesses = start_guesses(args, [info["label"]], wls, slos)
                    try:
                        res = measure_setup(target, info, args, wls, slos, window, loop,
                                            budget, deadline, guesses.get(info["label"], {}),
                                            load)
                    finally:  # its channels closed on the loop the next setups use
                        loop.run_until_complete(target.close())
                res.gpu, res.gpu_note = sampler.samples, sampler.note or \
                    f"sampled with {sampler.source} every {sampler.period_s:g} s"
                res.heartbeats = beats
                results.append(res)
                write_records(args.out, results, ctx, wls)
        except (ClusterError, TimeoutError, RuntimeError, OSError, ValueError) as e:
            # keep what the other setups measured: report them, exit non-zero at the end
            print(f"error: {name}: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

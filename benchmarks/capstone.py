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
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pdserve.benchmarks import capstone_plots as plots
from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks import plotting
from pdserve.benchmarks.capstone_client import (
    CondTarget,
    GpuSampler,
    GrpcTarget,
    OpenAITarget,
    run_load,
)
from pdserve.benchmarks.capstone_metrics import Window, parse_goodput, summarize
from pdserve.benchmarks.capstone_search import find_max_rate
from pdserve.benchmarks.capstone_workloads import (
    Workload,
    load_sharegpt,
    make_requests,
    parse_workload,
)
from pdserve.benchmarks.planner_sim import parse_setup, setup_name

NAME = "capstone"


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
                        "xPyD+Nboth+condT: prompts under T tokens go to N colocated workers, "
                        "the rest to xPyD (repeatable; default 1P1D,2both)")
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
    w = p.add_argument_group("workload")
    w.add_argument("--workload", action="append", metavar="SPEC",
                   help="fixed:in=N,out=N | uniform:in=LO-HI,out=LO-HI | sharegpt-synth | "
                        "shared-prefix:prefix=N,suffix=LO-HI,out=N | prefill-heavy | "
                        "decode-heavy (repeatable; default sharegpt-synth)")
    w.add_argument("--dataset", nargs=2, metavar=("sharegpt", "PATH"), action="append",
                   help="a ShareGPT JSON file, tokenized with --tokenizer")
    w.add_argument("--tokenizer", help="tokenizer for --dataset (default: --model)")
    w.add_argument("--num-requests", type=int, default=200, help="requests per run (200)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps (1 = Poisson)")
    w.add_argument("--concurrency", type=str, default="",
                   help="fixed-concurrency mode: levels '1,4,16' instead of the rate search")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup-requests", type=int, default=2, help="sequential requests per setup")
    w.add_argument("--timeout", type=float, default=300.0, help="per-request deadline (s)")
    s = p.add_argument_group("SLOs and search")
    s.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:100"], metavar="KEY:MS",
                   help="SLOs as vLLM's --goodput: ttft:MS tpot:MS e2el:MS")
    s.add_argument("--target", type=float, default=0.9, help="SLO attainment target (0.9)")
    s.add_argument("--start-rate", type=float, default=2.0, help="first rate of every search")
    s.add_argument("--max-runs", type=int, default=6, help="runs per search (6)")
    s.add_argument("--rel-tol", type=float, default=0.15, help="stop when hi/lo <= 1 + this")
    s.add_argument("--window-warmup", type=float, default=0.1, help="fraction excluded at start")
    s.add_argument("--window-cooldown", type=float, default=0.1, help="fraction excluded at end")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=f"benchmarks/results/{NAME}", help="report directory")
    o.add_argument("--label", default="", help="a line for the report")
    o.add_argument("--no-plan", action="store_true", help="skip the planner validation")


def check_args(args: argparse.Namespace) -> str | None:
    if args.coordinator and args.base_url:
        return "give at most one of --coordinator and --base-url"
    if args.num_requests < 2:
        return "--num-requests must be at least 2"
    if not 0 < args.target <= 1 or args.start_rate <= 0 or args.max_runs < 1:
        return "need 0 < --target <= 1, --start-rate > 0, --max-runs >= 1"
    if not (0 <= args.window_warmup < 1 and 0 <= args.window_cooldown < 1
            and args.window_warmup + args.window_cooldown < 1):
        return "--window-warmup and --window-cooldown must be fractions summing to < 1"
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


@contextmanager
def open_setup(name: str, args: argparse.Namespace) -> Iterator[tuple[object, dict]]:
    """(target, info) for one setup; info: label, workers, vocab, max_len, pools."""
    if args.base_url:
        target = OpenAITarget(args.base_url, args.served_model_name)
        yield target, {"label": args.label or "external", "workers": target.name,
                       "vocab": args.vocab, "max_len": 0, "pools": {}}
        return
    if args.coordinator:
        yield from _pdserve_setup(args.coordinator, "", args)
        return
    from pdserve.cluster import LocalCluster

    s = parse_setup(name)
    print(f"starting {name} on {args.devices} ({args.model})", flush=True)
    kw = {"transfer": args.transfer, "worker_args": args.worker_arg,
          "start_timeout_s": args.start_timeout}
    if not s.cond_tokens:
        with LocalCluster(args.model, prefill=s.prefill, decode=s.decode, both=s.both,
                          devices=args.devices, **kw) as c:
            c.wait_ready(args.start_timeout)
            yield from _pdserve_setup(c.address, name, args)
        return
    # conditional: a P/D cluster and a colocated cluster, the router in the load generator
    pd_devs, co_devs = split_devices(args.devices, s.prefill + s.decode, s.both)
    with LocalCluster(args.model, prefill=s.prefill, decode=s.decode, both=0,
                      devices=pd_devs, **kw) as a, \
            LocalCluster(args.model, prefill=0, decode=0, both=s.both, devices=co_devs, **kw) as b:
        a.wait_ready(args.start_timeout)
        b.wait_ready(args.start_timeout)
        with _infos(a.address) as ia, _infos(b.address) as ib:
            info = _describe(ia + ib, name)
        yield CondTarget(s.cond_tokens, GrpcTarget(a.address), GrpcTarget(b.address)), info


def split_devices(devices: str, first: int, second: int) -> tuple[str, str]:
    """--devices for two clusters side by side: cpu stays cpu; auto / a GPU list is split
    into the first `first` GPUs and the next `second`."""
    from pdserve.cluster import cuda_device_count

    spec = devices.strip().lower()
    if spec == "cpu" or (spec == "auto" and cuda_device_count() == 0):
        return "cpu", "cpu"
    if spec == "auto":
        gpus = [str(i) for i in range(first + second)]
    else:
        gpus = [g.strip().removeprefix("cuda:") for g in spec.split(",") if g.strip()]
    if len(gpus) < first + second:
        raise ValueError(f"--devices {devices}: {first + second} GPUs needed")
    return ",".join(gpus[:first]), ",".join(gpus[first:first + second])


@contextmanager
def _infos(address: str) -> Iterator[list[dict]]:
    from pdserve.coordinator.client import Client

    with Client(address, timeout_s=30) as c:
        yield [w["info"] for w in c.list_workers()]


def _pdserve_setup(address: str, name: str, args: argparse.Namespace):
    with _infos(address) as infos:
        info = _describe(infos, name)
    yield GrpcTarget(address), info


def _describe(infos: list[dict], name: str) -> dict:
    pools: dict[str, list[int]] = {}
    for i in infos:
        if i["device"].startswith("cuda:"):
            pools.setdefault(i["role"], []).append(int(i["device"].split(":")[1]))
    roles = [i["role"] for i in infos]
    label = name or setup_name(roles.count("prefill"), roles.count("decode"), roles.count("both"))
    return {
        "label": label, "workers": ", ".join(f"{i['role']}@{i['device']}" for i in infos),
        "vocab": min((i["vocab_size"] for i in infos if i["vocab_size"]), default=256),
        "max_len": min((i["max_model_len"] for i in infos if i["max_model_len"]), default=0),
        "pools": pools}


def load_workloads(args: argparse.Namespace) -> list[tuple[Workload, list | None]]:
    out: list[tuple[Workload, list | None]] = [(parse_workload(s), None) for s in
                                               (args.workload or ([] if args.dataset else ["sharegpt-synth"]))]
    for _, path in args.dataset or []:
        from pdserve.engine.tokenizer import get_tokenizer

        tok = get_tokenizer(args.tokenizer or args.model)
        out.append(load_sharegpt(path, tok.encode))
    return out


def measure_setup(target, info: dict, args: argparse.Namespace, wls: list, slos: dict,
                  window: Window, loop: asyncio.AbstractEventLoop) -> report.SetupResult:
    """Every workload on one setup: the rate search (or the concurrency levels)."""
    from pdserve.benchmarks.capstone_workloads import Request

    res = report.SetupResult(info["label"], info["workers"], info["pools"])
    warm = [Request(0.0, [(7 * i + j) % (info["vocab"] - 1) + 1 for j in range(16)], 4)
            for i in range(args.warmup_requests)]
    for req in warm:
        loop.run_until_complete(run_load(target, [req], args.timeout))
    for wl, pool in wls:
        wr = report.WorkloadRuns(wl.name, wl.describe)
        res.by_workload[wl.name] = wr

        def one(rate: float, conc: int = 0, wl: Workload = wl, pool: list | None = pool,
                wr: report.WorkloadRuns = wr) -> float:
            reqs = make_requests(wl, args.num_requests, rate, args.seed, info["vocab"],
                                 args.burstiness, info["max_len"], pool)
            desc = f"{res.setup} {wl.name} @ " + (f"c={conc}" if conc else f"{rate:.3g} req/s")
            results = loop.run_until_complete(run_load(target, reqs, args.timeout, conc, desc))
            summary = summarize(results, slos, window)
            wr.runs.append(report.Run(rate, conc, results, summary))
            errors = [r.error for r in results if r.error]
            print(f"{desc}: {summary['request_throughput']:.3g} req/s achieved, attainment "
                  f"{summary['slo_attainment']:.0%}, TTFT p90 {summary['p90_ttft_ms']:.4g} ms, "
                  f"ITL p99 {summary['p99_itl_ms']:.4g} ms"
                  + (f"; {len(errors)} failed, first: {errors[0]}" if errors else ""), flush=True)
            return summary["slo_attainment"]

        levels = concurrency_levels(args)
        if levels:
            for c in levels:
                one(math.inf, c)
            continue
        wr.search = find_max_rate(one, args.start_rate, args.target, args.max_runs, args.rel_tol)
        print(f"{res.setup} {wl.name}: {wr.search.describe()}", flush=True)
    return res


def write_report(args: argparse.Namespace, setups: list[report.SetupResult],
                 ctx: report.Context, wls: list) -> list[str]:
    out = plotting.ensure_dir(args.out)
    workloads = {wl.name: {"describe": wl.describe, "params": wl.params} for wl, _ in wls}
    paths = [report.write_json(out, setups, ctx, workloads),
             report.write_calibration(out, setups, ctx)]
    pngs: dict[str, str] = {}
    map_text: dict[str, str] = {}
    title = " vs ".join(s.setup for s in setups) + f" ({ctx.meta.get('device', '')})"
    try:
        p = plots.goodput_vs_rate(os.path.join(out, "goodput_vs_rate.png"), setups, title)
        if p:
            pngs["goodput vs achieved rate"] = p
        rate = ctx.start_rate if not concurrency_levels(args) else math.inf
        for i, (wl, _) in enumerate(wls):
            p = plots.latency_cdfs(os.path.join(out, f"cdf_{i}.png"), setups, wl.name, rate,
                                   ctx.window)
            if p:
                pngs[f"TTFT and ITL CDFs: {wl.name}"] = p
            p, text = plots.slo_map_png(os.path.join(out, f"slo_map_{i}.png"), setups, wl.name,
                                        rate, ctx.window)
            if p:
                pngs[f"SLO attainment map: {wl.name}"] = p
                map_text[wl.name] = text
        for key, fn in (("transfer time vs input length", plots.transfer_vs_input),
                        ("GPU utilization per pool", plots.gpu_util)):
            p = fn(os.path.join(out, key.split()[0].lower() + ".png"), setups)
            if p:
                pngs[key] = p
    except ImportError as e:
        print(f"note: no plots ({e}); pip install matplotlib", file=sys.stderr)
    plan_lines: list[str] = []
    if not args.no_plan and not concurrency_levels(args) and setups[0].setup != "external":
        from pdserve.benchmarks import plan

        plan_lines = ["", "### Planner validation", "",
                      *plan.validation_lines(*plan.validate(out))]
    paths.append(report.write_markdown(out, setups, ctx, workloads, pngs, map_text, plan_lines))
    return paths + list(pngs.values())


def run(args: argparse.Namespace) -> int:
    from pdserve.benchmarks.serve import device_description
    from pdserve.cluster import ClusterError
    from pdserve.proto.grpc_util import install_uvloop

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
            "commit": plotting.commit_id(), "load average at start": plotting.load_average()}
    import datetime as dt
    meta["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    if args.label:
        meta = {"run": args.label, **meta}
    ctx = report.Context(slos, args.target, window, args.burstiness, args.seed,
                         args.start_rate, args.num_requests, meta, args.max_runs, args.rel_tol)
    results: list[report.SetupResult] = []
    failed: list[str] = []
    for name in setups_of(args):
        loop = asyncio.new_event_loop()
        try:
            with open_setup(name, args) as (target, info):
                # NVML sees this host's GPUs: only for setups launched here
                gpus = [] if args.coordinator else [g for pool in info["pools"].values()
                                                    for g in pool]
                with GpuSampler(gpus) as sampler:
                    res = measure_setup(target, info, args, wls, slos, window, loop)
                res.gpu, res.gpu_note = sampler.samples, sampler.note
                loop.run_until_complete(target.close())
                results.append(res)
        except (ClusterError, TimeoutError, RuntimeError, OSError, ValueError) as e:
            # keep what the other setups measured: report them, exit non-zero at the end
            print(f"error: {name}: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        finally:
            loop.close()
    meta["load average at end"] = plotting.load_average()
    if failed:
        meta["setups that failed"] = "; ".join(failed)
    if results:
        for path in write_report(args, results, ctx, wls):
            print("wrote", path)
    return 1 if failed else 0

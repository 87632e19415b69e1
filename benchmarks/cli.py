"""`pdserve bench NAME ...`: runs benchmark module pdserve.benchmarks.NAME.

A benchmark module exposes `add_arguments(parser)` and `run(args) -> int`; any such module
in this package plugs in by its name, nothing to register.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil

# one-line help of the known benchmarks (others still run if their module exists)
KNOWN: dict[str, str] = {
    "transfer": "KV transfer time vs input length, against a raw send of the same bytes",
    "decode": "decode step time vs the HBM roofline",
    "prefill": "prefill throughput (MFU) vs the measured matmul peak",
    "hf": "parity and speed against HF transformers",
    "serve": "end-to-end serving: TTFT, TPOT, goodput; P/D vs colocated",
    "profile": "where a step's GPU time goes, by kernel category",
    "ttft": "TTFT breakdown of P/D against a colocated prefill",
    "baseline": "engine baseline: torch attention, eager, same model",
    "coordinator": "the coordinator's streaming throughput with fake workers (CPU)",
    "host_knee": "where token 0 waits under an open loop: the host path's knee (CPU, fake workers)",
    "chaos": "faults under load on a CPU cluster: every request ends, recovery, leaks",
    "kernels": "Triton kernels against their baselines, one GPU",
    "skinny": "skinny GEMM against cuBLAS for decode shapes, one GPU",
    "capstone": "when does disaggregation help? xPyD vs colocated sweep, SLO goodput, report",
}

# helpers beside the benchmarks (`plan` is the top-level `pdserve plan`)
_NOT_BENCHMARKS = {"cli", "plotting", "serve_workload", "engine_bench", "fake_workers",
                   "fake_model", "cpu_sample", "plan", "planner_sim", "capstone_workloads",
                   "capstone_metrics", "capstone_search", "capstone_client", "capstone_calibration", "capstone_report",
                   "capstone_plots", "chaos_load"}


def _exists(name: str) -> bool:
    return (name.isidentifier() and not name.startswith("_") and name not in _NOT_BENCHMARKS
            and importlib.util.find_spec(f"pdserve.benchmarks.{name}") is not None)


def available() -> dict[str, str]:
    """Benchmarks present here -> help text (known ones first, then any other module of
    this package that defines add_arguments and run, found without importing it)."""
    found = {n: h for n, h in KNOWN.items() if _exists(n)}
    here = os.path.dirname(os.path.abspath(__file__))
    for mod in pkgutil.iter_modules([here]):
        if mod.name in found or not _exists(mod.name):
            continue
        try:
            with open(os.path.join(here, f"{mod.name}.py")) as f:
                text = f.read()
        except OSError:
            continue
        if "\ndef add_arguments(" in text and "\ndef run(" in text:
            found[mod.name] = (text.split('"""')[1].strip().splitlines() or [""])[0] \
                if text.lstrip().startswith('"""') else ""
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = available()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {n:<10} {h}" for n, h in names.items()) + \
        "\n\nRun `pdserve bench NAME --help` for a benchmark's options."
    parser.add_argument("name", metavar="NAME", help="benchmark to run: " + ", ".join(names))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    name = args.name
    if not _exists(name):
        print(f"pdserve bench: unknown benchmark {name!r}; available: {', '.join(available())}")
        return 2
    module = importlib.import_module(f"pdserve.benchmarks.{name}")
    if not hasattr(module, "add_arguments") or not hasattr(module, "run"):
        print(f"pdserve bench: pdserve.benchmarks.{name} is not a benchmark (no add_arguments/run)")
        return 2
    parser = argparse.ArgumentParser(prog=f"pdserve bench {name}",
                                     description=KNOWN.get(name, module.__doc__))
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)

"""Skinny GEMM (decode linear layers) vs cuBLAS (torch F.linear) on one GPU, bf16.

  python -m pdserve.benchmarks.skinny [--quick] [--only qkv,o_proj] [--ms 1,2,4] [--calls 20]

For each Llama-3.1-8B shape and M in {1, 8, 16} (--quick: 1; --ms picks others): F.linear,
skinny_linear with its default config, and a sweep (skinny_gemm.sweep_configs, the default
path's 8 configs; at M <= FMA_MAX_M also two configs of the other path). Each is timed in
a CUDA graph: `calls` back-to-back calls captured once, replayed REPLAYS times with CUDA
events around each replay, median per call. Consecutive calls read different copies of
the weight (>= 256 MiB in rotation, 5x the L2), so weights come from HBM as in a real
decode step. GB/s counts weight + x + y bytes; the copy bandwidth (2 GiB device-to-device
copy, read + write bytes) is printed first. Each skinny row also prints its max abs error
vs F.linear (MISMATCH past BAD_ERR). A SUMMARY of the best config per shape ends the run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from tqdm import tqdm

from pdserve.kernels import skinny_gemm as sg
from pdserve.kernels._common import device_sms
from pdserve.kernels.skinny_gemm import skinny_linear

SHAPES = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096), "lm_head": (4096, 128256)}  # name -> (K, N)
DT = torch.bfloat16
DEVICE = "cuda"
ROTATE_BYTES = 256 << 20
REPLAYS = 15
BAD_ERR = 0.1  # outputs are O(1); bf16 rounding differences are ~1e-2


def event_ms(fn: Callable[[], object], reps: int = REPLAYS) -> float:
    """Median milliseconds of fn() between CUDA events."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbs(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / event_ms(functools.partial(dst.copy_, src), reps=10) / 1e6


def graph_us(fn: Callable[..., object], x: torch.Tensor, ws: list[torch.Tensor], calls: int,
             **kw: object) -> float:
    """Median microseconds per call of fn(x, ws[i % len(ws)], **kw), i < calls, captured
    back to back in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, split-K counters
        for i in range(calls):
            fn(x, ws[i % len(ws)], **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, ws[i % len(ws)], **kw)
    return event_ms(graph.replay) * 1e3 / calls


def candidates(m: int) -> list[tuple[str, tuple | None, bool | None]]:
    """(label, config, use_dot): the default, the sweep, and at small M two configs of the
    path that is not the default."""
    out = [("default", None, None)] + [(str(c), c, None) for c in sg.sweep_configs(m)]
    if m <= sg.FMA_MAX_M and sg.default_use_dot(m):
        out += [(f"fma{c}", c, False) for c in (sg.SWEEP_FMA[1], sg.SWEEP_FMA[3])]
    elif m <= sg.FMA_MAX_M:
        out += [(f"dot{c}", c, True) for c in (sg.SWEEP_DOT[0], sg.SWEEP_DOT[6])]
    return out


def report(rows: list[dict], copy: float, shape: str, k: int, n: int, m: int, nbytes: int,
           impl: str, us: float, err: float | None = None) -> None:
    gbs = nbytes / us / 1e3
    rows.append(dict(shape=shape, m=m, impl=impl, us=us, gbs=gbs, ok=err is None or err <= BAD_ERR))
    note = "" if err is None else f"  max_abs_err={err:.2e}" + (
        "  MISMATCH" if err > BAD_ERR else "")
    tqdm.write(f"{shape:<8} K={k:<6} N={n:<7} M={m:<3} {impl:<26} {us:8.2f} us "
               f"{gbs:7.0f} GB/s ({100 * gbs / copy:3.0f}% copy){note}")


def bench_shape(name: str, k: int, n: int, ms: list[int], calls: int, copy: float,
                rows: list[dict]) -> None:
    w0 = torch.randn(n, k, device=DEVICE, dtype=DT).mul_(k**-0.5)
    wbytes = w0.numel() * w0.element_size()
    ws = [w0] + [w0.clone() for _ in range(max(2, -(-ROTATE_BYTES // wbytes)) - 1)]
    sms = device_sms(w0)
    for m in ms:
        x = torch.randn(m, k, device=DEVICE, dtype=DT)
        nbytes = wbytes + x.numel() * x.element_size() + m * n * x.element_size()
        where = (rows, copy, name, k, n, m, nbytes)
        ref = F.linear(x, w0)
        report(*where, "cublas", graph_us(F.linear, x, ws, calls))
        for label, cfg, use_dot in candidates(m):
            if label == "default":
                label = f"default{sg.default_config(m, n, k, sms)}"
            try:
                y = skinny_linear(x, w0, config=cfg, use_dot=use_dot)
                err = (y.float() - ref.float()).abs().max().item()
                us = graph_us(skinny_linear, x, ws, calls, config=cfg, use_dot=use_dot)
            except Exception as exc:  # e.g. a config out of resources: report, go on
                tqdm.write(f"{name:<8} M={m:<3} {label:<26} failed: {type(exc).__name__}: "
                           f"{str(exc)[:120]}")
                continue
            report(*where, label, us, err)


def summary(rows: list[dict]) -> None:
    print("\nSUMMARY: best skinny config per shape vs cuBLAS (graph-replayed us per call)")
    for shape, m in dict.fromkeys((r["shape"], r["m"]) for r in rows):
        mine = [r for r in rows if r["shape"] == shape and r["m"] == m]
        base = next((r for r in mine if r["impl"] == "cublas"), None)
        ours = [r for r in mine if r["impl"] != "cublas" and r["ok"]]  # MISMATCH rows: out
        if base is None or not ours:
            continue
        best = min(ours, key=lambda r: r["us"])
        dflt = next((r for r in ours if r["impl"].startswith("default")), best)
        print(f"  {shape:<8} M={m:<3} cublas {base['us']:7.2f} us {base['gbs']:5.0f} GB/s | "
              f"best {best['impl']:<22} {best['us']:7.2f} us {best['gbs']:5.0f} GB/s "
              f"x{base['us'] / best['us']:.2f} | default {dflt['us']:7.2f} us "
              f"x{base['us'] / dflt['us']:.2f}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="M = 1 only")
    ap.add_argument("--only", default=",".join(SHAPES), help="comma-separated shape names")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,8,16)")
    ap.add_argument("--calls", type=int, default=20, help="calls captured per graph")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the skinny GEMM benchmark needs a GPU (no CUDA device here)")
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy = copy_gbs()
    torch.cuda.empty_cache()
    print(f"device {props.name} ({props.multi_processor_count} SMs)  torch {torch.__version__}  "
          f"triton {triton.__version__}  copy bandwidth {copy:.0f} GB/s (2 GiB, read + write)")
    ms = [int(v) for v in args.ms.split(",")] if args.ms else [1] if args.quick else [1, 8, 16]
    rows: list[dict] = []
    for name in tqdm(args.only.split(","), desc="shapes", unit="shape"):
        k, n = SHAPES[name]
        bench_shape(name, k, n, ms, args.calls, copy, rows)
        torch.cuda.empty_cache()
    summary(rows)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

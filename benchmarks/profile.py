"""`pdserve bench profile`: where a step's GPU time goes, by kernel category.

For decode points (BATCH x CTX, over a KV pool of random data, decode CUDA graphs unless
--enforce-eager) and prefill points (one prompt of N tokens), profiles --iters calls of
`runner.execute` with torch.profiler and sums the device time of every kernel, grouped by
name into categories (gemm, attention, kv_store, norm, rope, activation, copy, sampling,
other; see CATEGORIES). wall_ms is the median host time of one step (execute + device sync)
in unprofiled runs; gpu_busy = kernel ms / wall ms, so 1 - gpu_busy is time the GPU sits
idle (launch gaps, host preparation, sampling sync). On CPU there are no kernels: the same
table is built from the self time of the profiled CPU ops ("kernels" means ops; ops inside
an attention op, such as SDPA's bmm and softmax, count as attention).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import defaultdict

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from pdserve.benchmarks import engine_bench as eb
from pdserve.benchmarks import plotting

COLUMNS = ["point", "category", "ms_per_step", "share", "launches_per_step", "wall_ms", "gpu_busy"]
MEM_FRACTION = 0.85  # of free memory (after weights) for the KV pool, as bench decode
TOP_KERNELS = 15

# (category, lower-case name substrings), first match wins: specific kernels before the
# broad gemm / copy patterns ("mm", "cat", "index"). Extend here.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("_decode_kernel", "_prefill_kernel", "scaled_dot_product",
                   "flash_attn", "flash_fwd", "fmha", "attention")),
    ("kv_store", ("_store_kv_kernel",)),
    ("norm", ("rms_norm", "rsqrt", "pow", "mean")),
    ("rope", ("_rope_kernel", "rope")),  # _rope_store_kernel: rope fused with the KV store
    ("activation", ("_silu_mul_kernel", "silu", "gelu")),
    ("gemm", ("_skinny_kernel", "gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "addmm", "linear",
              "mm")),
    ("sampling", ("argmax", "sort", "softmax", "exponential", "topk", "multinomial")),
    ("copy", ("memcpy", "memset", "copy", "index", "cat", "gather", "scatter", "aten::to",
              "aten::_to")),
]
CATEGORY_NAMES = [c for c, _ in CATEGORIES] + ["other"]


def classify(name: str) -> str:
    """Category of a kernel (or CPU op) name."""
    low = name.lower()
    for category, subs in CATEGORIES:
        if any(s in low for s in subs):
            return category
    return "other"


def point_list(text: str) -> list[tuple[int, int]]:
    """Parse "1x512,64x2048" into [(1, 512), (64, 2048)]."""
    try:
        pts = [tuple(int(v) for v in t.lower().split("x")) for t in text.split(",") if t.strip()]
    except ValueError:
        pts = [()]
    if any(len(p) != 2 or min(p) < 1 for p in pts):
        raise argparse.ArgumentTypeError(f"expected BATCHxCTX,... got {text!r}")
    return pts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    eb.add_common_arguments(p, out="benchmarks/results/profile")
    p.add_argument("--decode", type=point_list, default=[(1, 512), (64, 2048)],
                   help='decode points BATCHxCTX (default "1x512,64x2048"; "" for none)')
    p.add_argument("--prefill", type=eb.int_list, default=[8192],
                   help='prefill prompt lengths (default "8192"; "" for none)')
    p.add_argument("--iters", type=int, default=5, help="profiled steps per point")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="also write each point's Chrome trace (host calls and kernels on one "
                        "timeline; open in chrome://tracing or Perfetto) to DIR/<point>.json")


def kernel_times(events, cuda: bool) -> list[tuple[str, str, float]]:
    """(name, category, us) per kernel (device events on CUDA) or per op (CPU self time)."""
    out = []
    for e in events:
        if getattr(e, "is_user_annotation", False):  # record_function ranges, not kernels
            continue
        if cuda:
            if e.device_type == DeviceType.CUDA:
                # the event's own span: device_time_total reads 0 when the profiler ran
                # without use_device (e.g. the CUPTI range monitor)
                out.append((e.name, classify(e.name), e.time_range.elapsed_us()))
        elif e.device_type == DeviceType.CPU and not e.is_async:
            cat = "attention" if _in_attention(e) else classify(e.name)
            out.append((e.name, cat, e.self_cpu_time_total))
    return out


def _in_attention(e) -> bool:
    """CPU: inside an attention op (the bmm and softmax of SDPA's math path count there)."""
    p = getattr(e, "cpu_parent", None)
    while p is not None:
        if classify(p.name) == "attention":
            return True
        p = p.cpu_parent
    return False


def summarize(times: list[tuple[str, str, float]], iters: int) -> dict:
    """Per-step ms and launches by category and by (kernel name, category)."""
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernels: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for name, cat, us in times:
        for acc in (cats[cat], kernels[name, cat]):
            acc[0] += us / 1e3 / iters
            acc[1] += 1 / iters
    return {"ms": sum(v[0] for v in cats.values()), "launches": len(times) / iters,
            "categories": dict(cats), "kernels": dict(kernels)}


def profile_point(bench: eb.Bench, out, iters: int, warmup: int,
                  trace: str | None = None) -> tuple[float, dict]:
    """(median wall ms of unprofiled steps, summary of `iters` profiled steps); with `trace`,
    the profiled steps' Chrome trace is written to that path."""
    cuda = bench.device.startswith("cuda")

    def step() -> None:
        bench.runner.execute(out)
        eb.sync(bench.device)

    for _ in range(warmup):
        step()
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():  # torch 2.11: "Profiler clears events at the end of..."
        warnings.filterwarnings("ignore", message=".*clears events", category=UserWarning)
        with profile(activities=acts) as prof:
            for _ in range(iters):
                step()
        if trace:
            prof.export_chrome_trace(trace)
    return eb.median(walls), summarize(kernel_times(prof.events(), cuda), iters)


def run(args: argparse.Namespace) -> int:
    device, dtype = eb.resolve(args)
    meta = plotting.run_metadata(device)
    model, mcfg = eb.load(args.model, device, dtype, args.seed)
    bs = args.block_size
    points = [("decode", f"{b}x{c}", b * -(-c // bs)) for b, c in args.decode]
    points += [("prefill", str(n), -(-n // bs)) for n in args.prefill]
    if not points:
        raise SystemExit("nothing to profile: give --decode and/or --prefill points")
    pool = min(eb.free_kv_blocks(mcfg, bs, dtype, device, MEM_FRACTION), max(p[2] for p in points))
    bench = eb.build(model, mcfg, device, dtype, args.attention, pool, bs, args.seed)
    fits = [(b, c) for b, c in args.decode if b * -(-c // bs) <= pool]
    graphs = False
    if not args.enforce_eager and fits:
        graphs = bench.runner.capture_cuda_graphs(
            max(b for b, _ in fits), max(c for _, c in fits), pad_block=pool,
            sizes=sorted({b for b, _ in fits}), progress=True)
    cuda = device.startswith("cuda")
    rows, notes, bars, skipped = [], [], {}, []
    for kind, spec, need in tqdm(points, desc="profile points"):
        label = f"{kind} {spec}"
        if need > pool:
            skipped.append(label)
            continue
        if kind == "decode":
            b, c = (int(v) for v in spec.split("x"))
            out = eb.decode_step(b, c, pool, bs, args.seed)
        else:
            out = eb.prefill_step(int(spec), bs, args.seed)
        trace = None
        if args.trace:
            trace = os.path.join(plotting.ensure_dir(args.trace), f"{kind}_{spec}.json")
        wall, s = profile_point(bench, out, args.iters, args.warmup, trace)
        if kind == "decode" and bench.runner.uses_graph(out):
            label += " (graph)"
        rows.append({"point": label, "category": "total", "ms_per_step": s["ms"], "share": 1.0,
                     "launches_per_step": s["launches"], "wall_ms": wall,
                     "gpu_busy": s["ms"] / wall if wall > 0 else 0.0})
        cats = s["categories"]
        for cat in CATEGORY_NAMES:
            if cat in cats:
                ms, n = cats[cat]
                rows.append({"point": label, "category": cat, "ms_per_step": ms,
                             "share": ms / s["ms"] if s["ms"] > 0 else 0.0,
                             "launches_per_step": n})
        bars[label] = ({cat: cats[cat][0] for cat in cats}, wall)
        top = sorted(s["kernels"].items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
        notes.append(f"\nTop {len(top)} {'kernels' if cuda else 'CPU ops'}, {label}:\n")
        notes.append(plotting.markdown_table(
            [{"kernel": _short(k), "category": cat, "ms_per_step": v[0], "calls_per_step": v[1]}
             for (k, cat), v in top]))
    meta.update({"model": f"{args.model} ({str(dtype).removeprefix('torch.')})",
                 "attention": args.attention, "cuda_graphs": graphs,
                 "timed": "CUDA kernel time" if cuda else "CPU op self time (no CUDA)",
                 "iters": f"{args.iters} profiled steps per point, {args.warmup} warmup",
                 "kv_pool": f"{pool} blocks of {bs}"})
    head = ["ms_per_step: summed kernel time per step (total row) or of the category; share: "
            "of the point's kernel time; wall_ms: median unprofiled step (execute + sync); "
            "gpu_busy = kernel ms / wall_ms."]
    if skipped:
        head.append(f"skipped (KV does not fit the pool): {', '.join(skipped)}")
    eb.emit(args, "profile", rows, COLUMNS, f"Step time by kernel category ({args.model})", meta,
            head + notes, (lambda path: _plot(path, bars, meta)) if bars else None)
    return 0


def _short(name: str, width: int = 60) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def _plot(path: str, bars: dict[str, tuple[dict[str, float], float]], meta: dict) -> str | None:
    """One horizontal bar per point (own ms axis: decode and prefill differ 100x), stacked ms
    per category, a black tick at the wall time."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = dict(zip(CATEGORY_NAMES, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(len(bars), 1, figsize=(9, 0.9 + 1.0 * len(bars)), dpi=120,
                             squeeze=False)
    for ax, (label, (cats, wall)) in zip(axes[:, 0], bars.items(), strict=True):
        left = 0.0
        for cat in CATEGORY_NAMES:
            if cats.get(cat, 0.0) > 0:
                ax.barh([label], [cats[cat]], left=left, color=colors[cat], label=cat)
                left += cats[cat]
        ax.plot([wall], [label], "k|", markersize=24, label="wall")
        ax.set_xlim(0, max(left, wall) * 1.05 or 1.0)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms per step")
    axes[0, 0].set_title(f"step time by kernel category, {meta.get('device')}", fontsize=10)
    handles = {h.get_label(): h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    plotting.save_png(fig, path)
    plt.close(fig)
    return path

if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="pdserve bench profile", description=__doc__)
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))

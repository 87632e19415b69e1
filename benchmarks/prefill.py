"""`pdserve bench prefill`: one prompt of 512 to 16k tokens, TFLOP/s vs the bf16 matmul peak.

FLOPs = 2 * matmul params * T + causal attention 4 * L * T^2 * H * D / 2 (+ the LM head of
the sampled row); the peak is an 8192^3 torch.matmul on random data measured in the same
run. Target (docs/architecture.md, "Performance targets"): >= 70% of the peak at 8k tokens.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from pdserve.benchmarks import engine_bench as eb
from pdserve.benchmarks import plotting

COLUMNS = ["tokens", "ms", "tok_s", "tflops", "mfu", "attn_flop_share"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    eb.add_common_arguments(p, out="benchmarks/results/prefill")
    p.add_argument("--lengths", type=eb.int_list, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--iters", type=int, default=3, help="timed runs per length (median)")
    p.add_argument("--block-size", type=int, default=16)


def run(args: argparse.Namespace) -> int:
    device, dtype = eb.resolve(args)
    meta = plotting.run_metadata(device)
    peak = eb.matmul_peak_tflops(device, dtype)
    model, mcfg = eb.load(args.model, device, dtype, args.seed)
    bs = args.block_size
    lengths = sorted(args.lengths)
    bench = eb.build(model, mcfg, device, dtype, args.attention, -(-lengths[-1] // bs), bs, args.seed)
    rows = []
    for n in tqdm(lengths, desc="prefill lengths"):
        out = eb.prefill_step(n, bs, args.seed)
        ms = eb.median(eb.time_ms(lambda out=out: bench.runner.execute(out), args.iters,
                                  args.warmup, device))
        flops = eb.prefill_flops(mcfg, n)
        attn = 4 * mcfg.num_layers * n ** 2 * mcfg.num_heads * mcfg.head_dim / 2
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append({"tokens": n, "ms": ms, "tok_s": n / (ms * 1e-3), "tflops": tflops,
                     "mfu": tflops / peak, "attn_flop_share": attn / flops})
    meta.update({"model": f"{args.model} ({str(dtype).removeprefix('torch.')})",
                 "attention": args.attention,
                 "matmul_peak": f"{peak:.4g} TFLOP/s (n^3 torch.matmul, n = 8192 on CUDA, measured)"})
    notes = ["mfu = achieved TFLOP/s / measured matmul peak; one prompt, one step, no chunking."]
    at8k = [r for r in rows if r["tokens"] == 8192]
    if at8k:
        m = at8k[0]["mfu"]
        notes.append(f"target >= 70% of peak at 8k tokens: {m:.1%} -> {'PASS' if m >= 0.7 else 'MISS'}")

    def plot(path: str):
        xs = [r["tokens"] for r in rows]
        return plotting.plot_lines(
            path, {"prefill": (xs, [r["tflops"] for r in rows]),
                   "matmul peak": (xs, [peak] * len(xs)),
                   "70% of peak": (xs, [0.7 * peak] * len(xs))},
            "prompt tokens", "TFLOP/s", title=f"prefill throughput, {meta.get('device')}",
            logx=True, styles={"matmul peak": "--", "70% of peak": ":"})

    eb.emit(args, "prefill", rows, COLUMNS, f"Prefill TFLOP/s vs matmul peak ({args.model})",
            meta, notes, plot)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="pdserve bench prefill", description=__doc__)
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))

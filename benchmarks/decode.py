"""`pdserve bench decode`: decode step time over a batch x context grid vs the HBM roofline,
with overlap scheduling off and on in the same run.

roofline_ms = (weight bytes read per step + KV bytes read) / copy bandwidth, the copy
bandwidth measured in the same run (device-to-device copy, read + write bytes counted).
Sequences are built directly over a KV pool of random data (no real prefill); grid points
whose KV does not fit the pool are skipped and listed. Triton attention + CUDA graphs
unless --attention torch / --enforce-eager. Targets (docs/architecture.md, "Performance
targets"): batch 1 <= 1.15 x roofline, batch 64 at 2k context <= 1.3 x.

sync_ms / overlap_ms: the engine's own step loop (engine/step_pipeline.py: scheduler,
runner, tokens back to the host), overlap scheduling off / on; fwd_ms: the forward alone
(graph replay, no LM head, no sampling), back to back. One GPU, under two minutes:

    python3 -m pdserve.benchmarks.decode --batch-sizes 1,8,64,256 --contexts 512,2048
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from pdserve.benchmarks import engine_bench as eb
from pdserve.benchmarks import plotting

COLUMNS = ["batch", "ctx", "sync_ms", "overlap_ms", "fwd_ms", "roofline_ms", "sync_ratio",
           "overlap_ratio", "fwd_ratio", "weights_gb", "kv_gb", "tok_s", "graphs"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    eb.add_common_arguments(p, out="benchmarks/results/decode")
    p.add_argument("--batch-sizes", type=eb.int_list, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--contexts", type=eb.int_list, default=[512, 2048, 8192],
                   help="context lengths (tokens already cached + the new one)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per point (median)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--mem-fraction", type=float, default=0.85,
                   help="fraction of free memory (after weights) for the KV pool")
    p.add_argument("--block-size", type=int, default=16)


def run(args: argparse.Namespace) -> int:
    device, dtype = eb.resolve(args)
    meta = plotting.run_metadata(device)
    bw = eb.copy_bandwidth_gbs(device)
    model, mcfg = eb.load(args.model, device, dtype, args.seed)
    bs = args.block_size
    grid = [(b, c) for c in sorted(args.contexts) for b in sorted(args.batch_sizes)]
    extra = eb.engine_step_extra_tokens(args.iters, args.warmup)
    need = {(b, c): b * -(-(c + extra) // bs) for b, c in grid}
    fit = eb.free_kv_blocks(mcfg, bs, dtype, device, args.mem_fraction)
    pool = min(fit, max(need.values()))
    bench = eb.build(model, mcfg, device, dtype, args.attention, pool, bs, args.seed)
    fits = [(b, c) for b, c in grid if need[b, c] <= pool]
    graphs = False
    if not args.enforce_eager and fits:
        max_len = max(c for _, c in fits) + extra
        graphs = bench.runner.capture_cuda_graphs(
            max(b for b, _ in fits), max_len, pad_block=pool,
            sizes=sorted({b for b, _ in fits}), progress=True)
    weight_bytes = eb.weight_bytes_per_step(model, mcfg)
    kv_tok = mcfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
    rows, skipped = [], []
    for b, c in tqdm(grid, desc="decode grid"):
        if need[b, c] > pool:
            skipped.append(f"{b}x{c}")
            continue
        out = eb.decode_step(b, c, pool, bs, args.seed)
        fwd = eb.median(eb.time_ms(eb.forward_only(bench, out), args.iters, args.warmup, device))
        step = {flag: eb.engine_step_ms(bench, b, c, args.iters, args.warmup, flag, args.seed)
                for flag in (False, True)}
        kv_bytes = b * c * kv_tok
        roof = (weight_bytes + kv_bytes) / (bw * 1e9) * 1e3
        rows.append({"batch": b, "ctx": c, "sync_ms": step[False], "overlap_ms": step[True],
                     "fwd_ms": fwd, "roofline_ms": roof, "sync_ratio": step[False] / roof,
                     "overlap_ratio": step[True] / roof, "fwd_ratio": fwd / roof,
                     "weights_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
                     "tok_s": b / (step[True] * 1e-3), "graphs": bench.runner.uses_graph(out)})
    meta.update({"model": f"{args.model} ({str(dtype).removeprefix('torch.')})",
                 "attention": args.attention,
                 "cuda_graphs": graphs, "copy_bw": f"{bw:.0f} GB/s (read + write)",
                 "kv_pool": f"{pool} blocks of {bs}"})
    notes = ["sync_ms / overlap_ms: the engine's step loop (scheduler + prepare + forward + "
             "logits + sampling + tokens to the host), overlap scheduling off / on, wall time "
             "per step over back-to-back steps; fwd_ms: forward alone (graph replay, no LM "
             "head), back to back; ratios = ms / roofline_ms; tok_s with overlap."]
    notes += _targets(rows)
    if skipped:
        notes.append(f"skipped (KV does not fit the pool): {', '.join(skipped)}")

    def plot(path: str):
        series, styles = {}, {}
        for c in sorted({r["ctx"] for r in rows}):
            pts = [r for r in rows if r["ctx"] == c]
            series[f"ctx {c} sync"] = ([r["batch"] for r in pts], [r["sync_ms"] for r in pts])
            series[f"ctx {c} overlap"] = ([r["batch"] for r in pts], [r["overlap_ms"] for r in pts])
            series[f"ctx {c} roofline"] = ([r["batch"] for r in pts], [r["roofline_ms"] for r in pts])
            styles[f"ctx {c} roofline"] = "--"
        return plotting.plot_lines(path, series, "batch", "ms per decode step",
                                   title=f"decode step vs HBM roofline, {meta.get('device')}",
                                   logx=True, logy=True, styles=styles)

    eb.emit(args, "decode", rows, COLUMNS, f"Decode step vs HBM roofline ({args.model})", meta,
            notes, plot if rows else None)
    return 0


def _targets(rows: list[dict]) -> list[str]:
    out = []
    b1 = [r for r in rows if r["batch"] == 1]
    if b1:
        r = min(b1, key=lambda r: r["ctx"])
        out.append(f"target batch 1 (ctx {r['ctx']}) <= 1.15x roofline: overlap "
                   f"{r['overlap_ratio']:.3f}x -> {'PASS' if r['overlap_ratio'] <= 1.15 else 'MISS'}"
                   f" (sync {r['sync_ratio']:.3f}x)")
    b64 = [r for r in rows if r["batch"] == 64 and r["ctx"] == 2048]
    if b64:
        r = b64[0]
        out.append(f"target batch 64 @ 2k <= 1.3x roofline: overlap {r['overlap_ratio']:.3f}x "
                   f"-> {'PASS' if r['overlap_ratio'] <= 1.3 else 'MISS'} (sync {r['sync_ratio']:.3f}x)")
    return out


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="pdserve bench decode", description=__doc__)
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))

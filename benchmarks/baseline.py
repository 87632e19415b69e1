"""Engine baseline: llama-3.1-8b, bf16, torch reference attention, eager (no CUDA graphs).

`pdserve bench baseline`: the simplest configuration, to measure later work against (the
preset's random weights).

Measures prefill tokens/s of one 2k-token prompt and the decode step at batch 1 and 32 with
a 512-token context, and writes benchmarks/results/engine_baseline.{md,csv} by default.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from pdserve.benchmarks import engine_bench as eb
from pdserve.benchmarks import plotting

COLUMNS = ["metric", "value", "unit", "step_ms", "fwd_ms", "roofline_ms"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    eb.add_common_arguments(p, out="benchmarks/results", attention="torch")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--decode-batches", type=eb.int_list, default=[1, 32])
    p.add_argument("--context", type=int, default=512, help="decode context length")
    p.add_argument("--iters", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--name", default="engine_baseline", help="file name of the results")


def run(args: argparse.Namespace) -> int:
    device, dtype = eb.resolve(args)
    meta = plotting.run_metadata(device)
    bw = eb.copy_bandwidth_gbs(device)
    model, mcfg = eb.load(args.model, device, dtype, args.seed)
    bs = 16
    need = max(-(-args.prefill_tokens // bs), max(args.decode_batches) * -(-args.context // bs))
    bench = eb.build(model, mcfg, device, dtype, args.attention, need, bs, args.seed)
    weight_bytes = eb.weight_bytes_per_step(model, mcfg)
    kv_tok = mcfg.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
    rows = []
    points = [("prefill", args.prefill_tokens)] + [("decode", b) for b in args.decode_batches]
    for kind, n in tqdm(points, desc="baseline"):
        if kind == "prefill":
            out = eb.prefill_step(n, bs, args.seed)
            ms = eb.median(eb.time_ms(lambda out=out: bench.runner.execute(out), args.iters,
                                      args.warmup, device))
            rows.append({"metric": f"prefill {n} tokens", "value": n / (ms * 1e-3),
                         "unit": "tokens/s", "step_ms": ms})
        else:
            out = eb.decode_step(n, args.context, need, bs, args.seed)
            t = eb.measure_step(bench, out, args.iters, args.warmup)
            roof = (weight_bytes + n * args.context * kv_tok) / (bw * 1e9) * 1e3
            rows.append({"metric": f"decode batch {n} @ ctx {args.context}", "value": t["step_ms"],
                         "unit": "ms/step", "step_ms": t["step_ms"], "fwd_ms": t["fwd_ms"],
                         "roofline_ms": roof})
    meta.update({"model": f"{args.model} ({str(dtype).removeprefix('torch.')})",
                 "attention": args.attention, "cuda_graphs": False,
                 "copy_bw": f"{bw:.0f} GB/s (read + write)"})
    notes = ["Baseline: reference attention (python loop over sequences), eager. step_ms is a "
             "whole engine step (prepare + forward + logits + sampling); fwd_ms the forward "
             "alone; roofline_ms = (weights + KV bytes) / copy bandwidth."]
    eb.emit(args, args.name, rows, COLUMNS, "Engine baseline", meta, notes)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="pdserve bench baseline", description=__doc__)
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))

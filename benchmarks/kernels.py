"""Kernel benchmarks on one GPU; each prints its baseline from the same run.

  python -m pdserve.benchmarks.kernels [--quick] [--json out.json] [--only decode,prefill,...]

- decode: paged decode attention, batch 1..256 x context 512..8k, Llama-3.1-8B geometry
  (32 q heads, 8 kv heads, head_dim 128, 16-token blocks), vs the bytes-read roofline at
  the copy bandwidth measured here (device-to-device copy_, read + write bytes / time);
- prefill: causal varlen attention over the paged cache, TFLOP/s at 512..16k tokens per
  prompt (batches of 16k tokens), vs the measured bf16 matmul peak and torch SDPA on
  contiguous tensors; a config sweep at 8k;
- kv: a block gather/scatter (one index_select / index_copy_, as the transfer layer does)
  and the KV store, GB/s vs a copy of the same bytes and the torch reference;
- norm/rope: fused RMSNorm(+residual) and rotary vs torch eager.
Timings: triton.testing.do_bench, median (includes host launch cost when the GPU idles);
decode also reports graph_us, per call inside a CUDA graph (do_bench_cudagraph: GPU time,
as the engine's captured decode step sees it, L2 warm). The last line is a SUMMARY.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from pdserve.kernels._common import device_sms
from pdserve.kernels.decode_attention import choose_num_splits, decode_attention
from pdserve.kernels.kv_cache_ops import store_kv
from pdserve.kernels.norm_rope import apply_rope, rms_norm
from pdserve.kernels.prefill_attention import prefill_attention
from pdserve.kernels.reference import apply_rope_ref, rms_norm_ref, rope_cos_sin_cache, store_kv_ref

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
ROWS: list[dict] = []


def ms(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Median milliseconds of fn(*args, **kwargs)."""
    return do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=100, return_mode="median")


def graph_ms(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Median milliseconds per call of fn replayed inside a CUDA graph (no host overhead)."""
    return do_bench_cudagraph(lambda: fn(*args, **kwargs), rep=50, return_mode="median")


def report(section: str, **row: object) -> None:
    ROWS.append({"section": section, **row})
    cells = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    print(f"{section:<15}", "  ".join(cells))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device copy: (read + write) bytes / time, GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / ms(dst.copy_, src) / 1e6


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=DT)
    b = torch.randn(n, n, device="cuda", dtype=DT)
    return 2 * n**3 / ms(torch.matmul, a, b) / 1e9


def random_tables(nseq: int, blocks_per_seq: int, pool_blocks: int) -> torch.Tensor:
    ids = torch.randperm(pool_blocks, device="cuda")[: nseq * blocks_per_seq]
    return ids.view(nseq, blocks_per_seq).to(torch.int32)


def bench_decode(copy_gbs: float, quick: bool) -> None:
    print(f"\n== decode attention (copy bandwidth {copy_gbs:.0f} GB/s) ==")
    batches = [1, 16, 64, 256] if quick else [1, 4, 16, 32, 64, 128, 256]
    ctxs = [512, 2048, 8192] if quick else [512, 1024, 2048, 4096, 8192]
    pool_blocks = max(batches) * max(ctxs) // BS
    cache = torch.randn(pool_blocks, 2, BS, HKV, D, device="cuda", dtype=DT)
    for b in batches:
        for ctx in ctxs:
            q = torch.randn(b, HQ, D, device="cuda", dtype=DT)
            tables = random_tables(b, ctx // BS, pool_blocks)
            lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            t = ms(decode_attention, q, cache, tables, lens, D**-0.5, ctx)
            try:
                tg_us = graph_ms(decode_attention, q, cache, tables, lens, D**-0.5, ctx) * 1e3
            except Exception as exc:  # graph capture problems must not hide the eager rows
                print(f"  graph timing failed: {type(exc).__name__}: {exc}")
                tg_us = float("nan")
            kv_bytes = b * ctx * HKV * D * 2 * cache.element_size()
            roof_us = kv_bytes / (copy_gbs * 1e3)
            report("decode", batch=b, ctx=ctx, splits=choose_num_splits(b, HKV, ctx, device_sms(q)),
                   us=t * 1e3, graph_us=tg_us, roofline_us=roof_us, gbs=kv_bytes / t / 1e6,
                   x_roofline=t * 1e3 / roof_us)
    del cache


def prefill_flops(lens: list[int]) -> float:
    return sum(4.0 * HQ * D * s * (s + 1) / 2 for s in lens)


def bench_prefill(peak_tflops: float, quick: bool) -> None:
    print(f"\n== prefill attention (bf16 matmul peak {peak_tflops:.0f} TFLOP/s) ==")
    lens_list = [512, 2048, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for s in lens_list:
        n = max(1, 16384 // s)
        blocks = n * (s // BS)
        cache = torch.randn(blocks, 2, BS, HKV, D, device="cuda", dtype=DT)
        tables = random_tables(n, s // BS, blocks)
        lens = torch.full((n,), s, dtype=torch.int32, device="cuda")
        qsl = torch.arange(0, (n + 1) * s, s, dtype=torch.int32, device="cuda")
        q = torch.randn(n * s, HQ, D, device="cuda", dtype=DT)
        flops = prefill_flops([s] * n)
        t = ms(prefill_attention, q, cache, tables, lens, qsl, s, D**-0.5)
        qc = q.view(n, s, HQ, D).transpose(1, 2)  # (n, Hq, s, D)
        kc = torch.randn(n, HQ, s, D, device="cuda", dtype=DT)  # K/V expanded to Hq heads
        t_sdpa = ms(F.scaled_dot_product_attention, qc, kc, kc, is_causal=True)
        report("prefill", seqs=n, seq_len=s, ms=t, tflops=flops / t / 1e9,
               pct_peak=100 * flops / t / 1e9 / peak_tflops, sdpa_tflops=flops / t_sdpa / 1e9)
        sweep = {512: [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
                 8192: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                        (128, 32, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3)]}
        if s in sweep:
            for cfg in sweep[s]:
                try:
                    tc = ms(prefill_attention, q, cache, tables, lens, qsl, s, D**-0.5,
                            config=cfg)
                except Exception as exc:  # e.g. out of shared memory for a config
                    print(f"  config {cfg}: {type(exc).__name__}")
                    continue
                report("prefill_config", seq_len=s, config=str(cfg), tflops=flops / tc / 1e9)
        del cache, q, kc


def bench_kv(quick: bool) -> None:
    print("\n== KV store / gather / scatter (32 layers, 64 KiB blocks) ==")
    layers, pool_blocks = 32, 4096
    pool = torch.randn(layers, pool_blocks, 2, BS, HKV, D, device="cuda", dtype=DT)
    caches = list(pool)
    for tokens in ([2048, 32768] if quick else [512, 2048, 8192, 32768]):
        nb = tokens // BS
        ids = torch.randperm(pool_blocks, device="cuda")[:nb]
        staging = torch.empty(layers, nb, 2, BS, HKV, D, device="cuda", dtype=DT)
        nbytes = staging.numel() * staging.element_size()
        src = torch.empty_like(staging)
        flat, rows = pool.view(layers, pool_blocks, -1), staging.view(layers, nb, -1)
        gb = nbytes / 1e6  # GB/s = payload bytes / time
        report("kv", tokens=tokens, mib=nbytes / 2**20,
               copy_gbs=gb / ms(staging.copy_, src),
               gather_gbs=gb / ms(torch.index_select, flat, 1, ids, out=rows),
               scatter_gbs=gb / ms(flat.index_copy_, 1, ids, rows))
    cache = caches[0]
    for t in [1, 256, 8192]:
        k = torch.randn(t, HKV, D, device="cuda", dtype=DT)
        slots = torch.randperm(pool_blocks * BS, device="cuda")[:t]
        report("store", tokens=t, us=ms(store_kv, cache, k, k, slots) * 1e3,
               ref_us=ms(store_kv_ref, cache, k, k, slots) * 1e3)
    del pool, caches


def bench_norm_rope() -> None:
    print("\n== RMSNorm / rotary vs torch eager ==")
    for t in [1, 64, 8192]:
        x = torch.randn(t, 4096, device="cuda", dtype=DT)
        r, w = torch.randn_like(x), torch.randn(4096, device="cuda", dtype=DT)
        report("rms_norm", tokens=t, us=ms(rms_norm, x, w, 1e-5, r) * 1e3,
               eager_us=ms(rms_norm_ref, x, w, 1e-5, r) * 1e3)
        qkv = torch.randn(t, HQ + 2 * HKV, D, device="cuda", dtype=DT)
        q, k = qkv[:, :HQ], qkv[:, HQ:HQ + HKV]
        pos = torch.randint(0, 8192, (t,), device="cuda")
        cs = rope_cos_sin_cache(D, 8192, 500000.0, device="cuda")
        report("rope", tokens=t, us=ms(apply_rope, q, k, pos, cs, inplace=True) * 1e3,
               eager_us=ms(apply_rope_ref, q, k, pos, cs) * 1e3)


def summary_line() -> str:
    """One line with the headline numbers, for the tail of a log."""
    def pick(section: str, key: str, **match: object) -> str:
        for r in ROWS:
            if r["section"] == section and all(r.get(k) == v for k, v in match.items()):
                return f"{r[key]:.1f}"
        return "n/a"
    return ("SUMMARY decode b1 ctx512 us=" + pick("decode", "us", batch=1, ctx=512)
            + " graph_us=" + pick("decode", "graph_us", batch=1, ctx=512)
            + " | decode b64 ctx2048 us=" + pick("decode", "us", batch=64, ctx=2048)
            + " graph_us=" + pick("decode", "graph_us", batch=64, ctx=2048)
            + " | prefill 8k tflops=" + pick("prefill", "tflops", seq_len=8192)
            + " (sdpa " + pick("prefill", "sdpa_tflops", seq_len=8192) + ")")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", default="decode,prefill,kv,norm", help="comma-separated sections")
    ap.add_argument("--json", default=None, help="also write the rows to this file")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the kernel benchmarks need a GPU (no CUDA device here)")
        return 2
    torch.manual_seed(0)
    only = set(args.only.split(","))
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    peak = matmul_tflops()
    print(f"device {dev}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s  "
          f"bf16 matmul {peak:.0f} TFLOP/s")
    sections: dict[str, Callable[[], None]] = {
        "decode": lambda: bench_decode(copy_gbs, args.quick),
        "prefill": lambda: bench_prefill(peak, args.quick),
        "kv": lambda: bench_kv(args.quick),
        "norm": bench_norm_rope,
    }
    for name, section in sections.items():
        if name in only:
            try:
                section()
            except Exception as exc:  # report and go on with the other sections
                print(f"!! section {name} failed: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
    print(summary_line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "copy_gbs": copy_gbs, "matmul_tflops": peak,
                       "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

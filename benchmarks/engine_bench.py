"""Shared pieces of the engine benchmarks (baseline, decode, prefill, hf).

A benchmark builds a ModelRunner on a preset (random weights) and feeds it hand-made
SchedulerOutputs: decode batches over a KV pool filled with random data (no real prefill
of 256 x 8k tokens), or one long prompt. Times come from CUDA events (perf_counter on
CPU), medians of several runs; peaks (copy bandwidth, matmul) are measured in the same run.
Not a benchmark itself: run decode, prefill, hf or baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.benchmarks import plotting
from pdserve.engine.config import CacheConfig, ModelConfig, SchedulerConfig
from pdserve.engine.loader import load_model
from pdserve.engine.model_runner import (
    NUM_PAD_BLOCKS,
    TORCH_DTYPES,
    ModelRunner,
    allocate_kv_caches,
    kv_block_bytes,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence as EngineSeq
from pdserve.engine.sequence import new_block_table_id
from pdserve.engine.step_pipeline import StepPipeline
from pdserve.kernels.attention import get_backend

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_common_arguments(p: argparse.ArgumentParser, out: str, attention: str = "triton") -> None:
    p.add_argument("--model", default="llama-3.1-8b", help="preset name (random weights)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=tuple(TORCH_DTYPES),
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", default=attention, choices=("torch", "triton"),
                   help=f"attention backend (default {attention})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each point")
    p.add_argument("--out", default=out, help=f"results directory (default {out})")
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")


def resolve(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available here")
        torch.cuda.set_device(torch.device(device))
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, TORCH_DTYPES[dtype]


# ---- model and pool ---------------------------------------------------------------------------
@dataclass
class Bench:
    model: torch.nn.Module
    mcfg: ModelConfig
    runner: ModelRunner
    kv_caches: list[torch.Tensor]
    num_blocks: int
    block_size: int
    device: str
    dtype: torch.dtype


def load(model_name: str, device: str, dtype: torch.dtype, seed: int = 0):
    import os

    from pdserve.engine.model_cache import default_cache_dir

    return load_model(model_name, dtype, device, seed, str(default_cache_dir(os.environ)))


def free_kv_blocks(mcfg: ModelConfig, block_size: int, dtype: torch.dtype, device: str,
                   fraction: float, reserve_bytes: int = 4 << 30) -> int:
    """Blocks that fit in `fraction` of free device memory minus a reserve for activations
    (CPU: a pool of 1 GiB)."""
    per_block = kv_block_bytes(mcfg, block_size, dtype)
    if not device.startswith("cuda"):
        return max(1, (1 << 30) // per_block)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int((free * fraction - reserve_bytes) // per_block) - NUM_PAD_BLOCKS)


def build(model: torch.nn.Module, mcfg: ModelConfig, device: str, dtype: torch.dtype,
          attention: str, num_blocks: int, block_size: int = 16, seed: int = 0) -> Bench:
    """A runner over a pool of num_blocks (+ scratch) blocks filled with N(0, 1) data."""
    kv = allocate_kv_caches(mcfg, num_blocks, block_size, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in kv:
        layer.normal_(generator=gen)
    runner = ModelRunner(model, mcfg, get_backend(attention, device), kv, block_size, device)
    return Bench(model, mcfg, runner, kv, num_blocks, block_size, device, dtype)


def decode_step(batch: int, ctx: int, num_blocks: int, block_size: int,
                seed: int = 0) -> SchedulerOutput:
    """batch sequences with ctx - 1 cached tokens each feeding token ctx - 1, over disjoint
    blocks in random order (as a long-running pool scatters them). Each sequence's table
    carries a block_table_id, as the scheduler's chunks do, so repeated steps reuse it."""
    per_seq = -(-ctx // block_size)
    assert batch * per_seq <= num_blocks, "pool too small for this decode batch"
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return SchedulerOutput(chunks=[
        ScheduledChunk(f"s{i}", [1 + i % 200], ctx - 1, perm[i * per_seq:(i + 1) * per_seq], True,
                       GREEDY, 0, block_table_id=new_block_table_id()) for i in range(batch)], num_batched_tokens=batch)


def prefill_step(tokens: int, block_size: int, seed: int = 0) -> SchedulerOutput:
    ids = torch.randint(1, 250, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    blocks = list(range(-(-tokens // block_size)))
    return SchedulerOutput(chunks=[ScheduledChunk("p", ids, 0, blocks, True, GREEDY, 0)],
                           num_batched_tokens=tokens)


# ---- byte and flop counts -------------------------------------------------------------------
def weight_bytes_per_step(model: torch.nn.Module, mcfg: ModelConfig) -> int:
    """Weight bytes one decode step reads: every parameter except the embedding table (only a
    few rows are gathered), which counts when it doubles as the LM head (tied)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    return total if mcfg.tie_word_embeddings else total - emb.numel() * emb.element_size()


def matmul_params(mcfg: ModelConfig) -> int:
    """Parameters of the per-token matmuls of the decoder layers (no embedding, no LM head)."""
    h, hd = mcfg.hidden_size, mcfg.head_dim
    attn = h * hd * (mcfg.num_heads * 2 + mcfg.num_kv_heads * 2)  # q, o, k, v
    mlp = 3 * h * mcfg.intermediate_size
    return mcfg.num_layers * (attn + mlp)


def prefill_flops(mcfg: ModelConfig, tokens: int) -> float:
    """2 * params * T for the matmuls, causal attention 4 * L * T^2 * H * D / 2, plus the LM
    head of the one sampled row."""
    attn = 4 * mcfg.num_layers * tokens ** 2 * mcfg.num_heads * mcfg.head_dim / 2
    return 2.0 * matmul_params(mcfg) * tokens + attn + 2.0 * mcfg.hidden_size * mcfg.vocab_size


# ---- timing and peaks ---------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_ms(fn: Callable[[], Any], iters: int, warmup: int, device: str) -> list[float]:
    """Per-run times in ms: CUDA events around each run (runs queue back to back unless fn
    syncs), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if not device.startswith("cuda"):
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync(device)
    return [s.elapsed_time(e) for s, e in events]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def copy_bandwidth_gbs(device: str, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth, counting read + write bytes (GB/s, 1e9)."""
    if not device.startswith("cuda"):
        nbytes = min(nbytes, 256 << 20)
    def measure() -> float:
        src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
        dst = torch.empty_like(src)
        return median(time_ms(lambda: dst.copy_(src), iters, 2, device))

    ms = measure()  # the buffers are gone once it returns
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int = 8192, iters: int = 10) -> float:
    """Measured n^3 matmul throughput on random data (TFLOP/s)."""
    if not device.startswith("cuda"):
        n = min(n, 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median(time_ms(lambda: torch.matmul(a, b), iters, 3, device))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ---- measurements -----------------------------------------------------------------------------
def forward_only(bench: Bench, out: SchedulerOutput) -> Callable[[], Any]:
    """The model forward of `out` alone (graph replay, or eager forward over tensors prepared
    once): no host preparation, no sampling, no sync."""
    r = bench.runner
    if r.uses_graph(out):
        r.graphs.run(out.chunks)  # loads the static buffers
        size = min(s for s in r.graphs.sizes if s >= len(out.chunks))
        return r.graphs.graphs[size].replay if r.graphs.use_cuda_graph else lambda: r.graphs._forward(size)
    b = r.prepare(out)

    def fwd() -> None:
        with torch.inference_mode():
            bench.model(b.input_ids, b.positions, bench.kv_caches, b.meta, r.attn)
    return fwd


def measure_step(bench: Bench, out: SchedulerOutput, iters: int, warmup: int) -> dict[str, float]:
    """step_ms: a whole engine step (prepare, forward, logits, sampling; ends in a host sync);
    fwd_ms: the model forward alone, runs queued back to back."""
    step = median(time_ms(lambda: bench.runner.execute(out), iters, warmup, bench.device))
    fwd = median(time_ms(forward_only(bench, out), iters, warmup, bench.device))
    return {"step_ms": step, "fwd_ms": fwd}


def engine_step_extra_tokens(steps: int, warmup: int) -> int:
    """Tokens past `ctx` that engine_step_ms's sequences may reach (pool and graph sizing)."""
    return warmup + steps + 8


def engine_step_ms(bench: Bench, batch: int, ctx: int, steps: int, warmup: int,
                   overlap: bool, seed: int = 0) -> float:
    """ms per decode step of the engine's own step loop (StepPipeline: scheduler, runner,
    token hand-back), `steps` steps back to back over `batch` sequences placed as a decode
    worker admits them (reserve_remote + admit_remote, over the pool's random data), sized
    so that the timed steps' context is `ctx` on average. With overlap, step N+1 is
    launched before step N's tokens are read, so the host's per-step work hides behind the
    GPU. Wall time over the timed steps; the pool is left free."""
    cfg = SchedulerConfig(max_num_batched_tokens=max(batch, 8192), max_num_seqs=batch)
    cache = CacheConfig(block_size=bench.block_size, num_blocks=bench.num_blocks,
                        enable_prefix_caching=False)
    extra = warmup + steps + 8  # outputs past the prompt; none ends inside the timed steps
    prompt = max(1, ctx - 1 - warmup - steps // 2)
    sched = Scheduler(cfg, cache, bench.num_blocks, prompt + extra, eos_token_ids=())
    params = SamplingParams(temperature=0.0, max_tokens=extra, ignore_eos=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(batch):
        ids = torch.randint(1, 250, (prompt,), generator=gen).tolist()
        seq = EngineSeq(f"s{i}", ids, params)
        assert sched.reserve_remote(seq) is not None, "pool too small for this decode batch"
        sched.admit_remote(seq.seq_id, 1 + i % 200)
    pipe = StepPipeline(sched, bench.runner, overlap, on_result=lambda out, res: None)
    for _ in range(warmup):
        pipe.advance()
    sync(bench.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        pipe.advance()  # returns once one step's tokens are on the host
    ms = (time.perf_counter() - t0) * 1e3 / steps
    pipe.finish()
    for i in range(batch):
        sched.abort(f"s{i}")
    sync(bench.device)
    return ms


# ---- output ---------------------------------------------------------------------------------------
def emit(args: argparse.Namespace, name: str, rows: list[dict], columns: list[str], title: str,
         meta: dict[str, Any], notes: list[str], plot: Callable[[str], Any] | None = None) -> None:
    """Print the table (or JSON rows) and write NAME.csv, NAME.md (and NAME.png) under --out."""
    out_dir = plotting.ensure_dir(args.out)
    plotting.write_csv(f"{out_dir}/{name}.csv", rows, columns)
    plotting.write_markdown(f"{out_dir}/{name}.md", rows, columns, title=title, notes=notes,
                            meta=meta)
    png = plot(f"{out_dir}/{name}.png") if plot else None
    if args.json:
        for r in rows:
            print(json.dumps({k: r.get(k) for k in columns}))
    else:
        print(f"\n{title}")
        print("\n".join(f"- {k}: {v}" for k, v in meta.items()))
        print(plotting.markdown_table(rows, columns))
        print("\n".join(notes))
        print(f"wrote {out_dir}/{name}.csv, .md" + (", .png" if png else ""))

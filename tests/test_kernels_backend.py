"""The "triton" attention backend vs the "torch" reference backend, end to end: store the
new K/V, then attend (mixed batches, decode batches with padding rows, CUDA graphs)."""

from __future__ import annotations

import kernels_env  # first: sets TRITON_INTERPRET before pdserve.kernels loads
import pytest
import torch
from kernels_env import DEVICE, TOL, assert_close, gpu_only, paged_batch

from pdserve.kernels.attention import AttentionMetadata, get_backend
from pdserve.kernels.attention_backend import TritonAttention


def make_step(seq_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, bs: int,
              dtype: torch.dtype, seed: int = 0):
    """A step's inputs: cached prefixes in a random paged pool, new tokens' q/k/v, metadata.
    The new tokens' slots hold NaN until stored."""
    torch.manual_seed(seed)
    pb = paged_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    tables = pb.block_tables.cpu()
    slots = []
    for b, (s, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        slots += [int(tables[b, t // bs]) * bs + t % bs for t in range(s - ql, s)]
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    cache = pb.kv_cache
    for s in slots:  # poison: a missing store shows up as NaN in the output
        cache[s // bs, :, s % bs] = float("nan")
    t = pb.q.shape[0]
    k = torch.randn(t, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(t, hkv, d, device=DEVICE).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=pb.query_start_loc, seq_lens=pb.seq_lens,
        block_tables=pb.block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=pb.qsl_cpu, seq_lens_cpu=pb.seq_lens_cpu, block_size=bs)
    return pb.q, k, v, cache, meta


def compare_backends(seq_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, bs: int,
                     dtype: torch.dtype, window: int | None = None) -> None:
    q, k, v, cache, meta = make_step(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    cache_ref = cache.clone()
    scale = d ** -0.5
    out = TritonAttention().forward(q, k, v, cache, meta, scale, window)
    ref = get_backend("torch").forward(q, k, v, cache_ref, meta, scale, window)
    assert_close(out, ref, TOL[dtype])
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    assert torch.equal(cache.nan_to_num(), cache_ref.nan_to_num())  # identical stores


def test_registered() -> None:
    assert isinstance(get_backend("triton"), TritonAttention)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 9])
def test_mixed_batch_tiny(dtype: torch.dtype, window: int | None) -> None:
    # a decode row; a chunk after a cached prefix; a fresh prompt (lengths off block bounds)
    compare_backends([21, 30, 13], [1, 12, 13], hq=4, hkv=2, d=16, bs=4, dtype=dtype,
                     window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_batch_tiny(dtype: torch.dtype) -> None:
    # decode-only path; the last two rows stand for CUDA-graph padding (seq_len 1)
    compare_backends([17, 5, 1, 1], [1, 1, 1, 1], hq=8, hkv=2, d=32, bs=8, dtype=dtype)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_gpu(dtype: torch.dtype) -> None:
    compare_backends([2049, 1, 3000, 513, 4096], [1, 1, 1000, 513, 64], 32, 8, 128, 16, dtype)


@gpu_only
def test_decode_cuda_graph_gpu() -> None:
    """The decode path captures in a CUDA graph and replays correctly with new seq_lens."""
    hq, hkv, d, bs, B, max_len = 32, 8, 128, 16, 8, 4096
    dtype = torch.bfloat16
    q, k, v, cache, meta = make_step([max_len] * B, [1] * B, hq, hkv, d, bs, dtype)
    cache.nan_to_num_(0.0)
    backend, scale = TritonAttention(), d ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        backend.forward(q, k, v, cache, meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, meta, scale)
    for step, lens in enumerate([[1, 7, 100, 4096, 17, 33, 2048, 0], [300] * B]):
        torch.manual_seed(step)
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        tables = meta.block_tables.cpu()
        slots = [int(tables[b, max(s - 1, 0) // bs]) * bs + max(s - 1, 0) % bs
                 for b, s in enumerate(lens)]
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.slot_mapping.copy_(torch.tensor(slots))
        graph.replay()
        real = [b for b, s in enumerate(lens) if s > 0]
        ref_meta = AttentionMetadata(
            slot_mapping=meta.slot_mapping[real], block_tables=meta.block_tables[real],
            seq_lens=meta.seq_lens[real],
            query_start_loc=torch.arange(len(real) + 1, dtype=torch.int32, device=DEVICE),
            max_query_len=1, max_seq_len=max(lens), query_start_loc_cpu=list(range(len(real) + 1)),
            seq_lens_cpu=[lens[b] for b in real], block_size=bs)
        ref = get_backend("torch").forward(q[real], k[real], v[real], cache.clone(), ref_meta, scale)
        assert_close(out[real], ref, TOL[dtype])
        if len(real) < B:
            assert (out[[b for b in range(B) if b not in real]] == 0).all()


kernels_env.run_in_subprocess_if_needed(globals())

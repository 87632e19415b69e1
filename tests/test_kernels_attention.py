"""Decode and prefill attention kernels vs their torch references.

Tiny shapes run everywhere (on CPU through the Triton interpreter); realistic shapes are
marked gpu. Outputs are NaN-poisoned before each call and the caches hold NaN in every
slot a kernel must not read.
"""

from __future__ import annotations

import kernels_env  # first: sets TRITON_INTERPRET before pdserve.kernels loads
import pytest
import torch
from kernels_env import DEVICE, TOL, assert_close, gpu_only, paged_batch

from pdserve.kernels.decode_attention import choose_num_splits, decode_attention
from pdserve.kernels.prefill_attention import prefill_attention
from pdserve.kernels.reference import decode_attention_ref, prefill_attention_ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_decode(seq_lens: list[int], hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
                 num_splits: int | None, window: int | None = None, seed: int = 0) -> None:
    torch.manual_seed(seed)
    pb = paged_batch(seq_lens, [1] * len(seq_lens), hq, hkv, d, bs, dtype)
    scale = d ** -0.5
    out = torch.full_like(pb.q, float("nan"))
    decode_attention(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens, scale, max(seq_lens),
                     window, num_splits, out=out)
    ref = decode_attention_ref(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens, scale, window)
    assert_close(out, ref, TOL[dtype])


def check_prefill(seq_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, bs: int,
                  dtype: torch.dtype, window: int | None = None, seed: int = 0) -> None:
    torch.manual_seed(seed)
    pb = paged_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    scale = d ** -0.5
    out = torch.full_like(pb.q, float("nan"))
    prefill_attention(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens, pb.query_start_loc,
                      max(q_lens), scale, window, out=out)
    ref = prefill_attention_ref(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens,
                                pb.query_start_loc, scale, window)
    assert_close(out, ref, TOL[dtype])


# ---- tiny shapes (CPU interpreter or GPU) ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_tiny(dtype: torch.dtype, group: int) -> None:
    # lengths: 1, below / at / past a block boundary, several blocks; splits 1 and 3
    hkv = 2 if group < 4 else 1
    check_decode([1, 3, 4, 5, 23], hq=hkv * group, hkv=hkv, d=16, bs=4, dtype=dtype, num_splits=1)
    check_decode([1, 9, 37], hq=hkv * group, hkv=hkv, d=16, bs=4, dtype=dtype, num_splits=3,
                 seed=1)


@pytest.mark.parametrize("window", [None, 6])
def test_decode_tiny_splits_window_headdim(window: int | None) -> None:
    check_decode([2, 30, 47], hq=4, hkv=1, d=32, bs=8, dtype=torch.float16, num_splits=4,
                 window=window)
    check_decode([7, 40], hq=8, hkv=2, d=64, bs=16, dtype=torch.bfloat16, num_splits=None,
                 window=window, seed=2)
    check_decode([5, 19], hq=2, hkv=1, d=24, bs=4, dtype=torch.float32, num_splits=2,
                 window=window, seed=3)  # head_dim padded to 32 with masks


def test_decode_split_tickets_reset_between_launches() -> None:
    """Split-K combines in the last program of each group; its tickets return to zero, so
    back-to-back launches (and graph replays) with other lengths stay correct."""
    from pdserve.kernels.decode_attention import split_counters

    for step, lens in enumerate([[9, 37, 3], [40, 2, 17], [1, 1, 1]]):
        check_decode(lens, hq=4, hkv=2, d=16, bs=4, dtype=torch.float32, num_splits=5, seed=step)
        assert (split_counters(torch.device(DEVICE), 6)[:6] == 0).all()


def test_decode_padding_rows() -> None:
    """Rows of a padded (CUDA-graph) batch with seq_len 0 give zeros, with 1 a finite row."""
    torch.manual_seed(3)
    pb = paged_batch([5, 1, 1, 1], [1] * 4, 4, 2, 16, 4, torch.float16)
    pb.seq_lens[2:] = torch.tensor([0, 0], dtype=torch.int32)
    for splits in (1, 2):
        out = torch.full_like(pb.q, float("nan"))
        decode_attention(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens, 0.25, 64, None,
                         splits, out=out)
        ref = decode_attention_ref(pb.q, pb.kv_cache, pb.block_tables, pb.seq_lens, 0.25)
        assert_close(out, ref, TOL[torch.float16])
        assert (out[2:] == 0).all()


def test_choose_num_splits() -> None:
    assert choose_num_splits(256, 8, 8192, 132) == 1  # batch fills the GPU
    assert choose_num_splits(1, 8, 100, 132) == 1  # short context
    assert 8 <= choose_num_splits(1, 8, 8192, 132) <= 32
    assert choose_num_splits(1, 8, 1024, 132) == 1  # short: one launch, no reduce
    assert choose_num_splits(64, 8, 2048, 132) == 1  # 512 programs already fill 132 SMs
    assert choose_num_splits(16, 8, 8192, 132) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_tiny(dtype: torch.dtype, group: int) -> None:
    # fresh prompt not a multiple of bs; chunk after a cached prefix; decode row; len-1 prompt;
    # a long prompt crossing several BLOCK_M / BLOCK_N tiles
    hkv = 2 if group < 4 else 1
    check_prefill([13, 29, 10, 1, 40], [13, 11, 1, 1, 40], hq=hkv * group, hkv=hkv, d=16, bs=4,
                  dtype=dtype)


@pytest.mark.parametrize("window", [1, 7, 20])
def test_prefill_tiny_window(window: int) -> None:
    check_prefill([37, 20, 3], [37, 9, 1], hq=4, hkv=2, d=32, bs=8, dtype=torch.float16,
                  window=window)


def test_prefill_tiny_head_dims() -> None:
    check_prefill([33, 17], [17, 17], hq=8, hkv=2, d=64, bs=16, dtype=torch.bfloat16)
    check_prefill([35, 6], [20, 6], hq=2, hkv=1, d=24, bs=4, dtype=torch.float32)  # padded D


# ---- realistic shapes (GPU) ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 32, 64), (16, 8, 128), (64, 8, 128)])
@pytest.mark.parametrize("splits", [1, None])
@gpu_only
def test_decode_gpu(dtype: torch.dtype, hq: int, hkv: int, d: int, splits: int | None) -> None:
    torch.manual_seed(10)
    lens = torch.randint(1, 4100, (48,)).tolist() + [1, 16, 17, 8192]
    check_decode(lens, hq, hkv, d, 16, dtype, splits)


@gpu_only
def test_decode_gpu_fp32_window() -> None:
    check_decode([1, 700, 3000, 5000], 32, 8, 128, 16, torch.float32, None, window=1024)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 32, 64), (16, 8, 128)])
@gpu_only
def test_prefill_gpu(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    # fresh prompts, a chunk with a long cached prefix, decode rows
    check_prefill([2048, 777, 4096, 300, 1, 1500], [2048, 777, 1000, 1, 1, 129], hq, hkv, d, 16,
                  dtype)


@pytest.mark.parametrize("window", [None, 512])
@gpu_only
def test_prefill_gpu_fp32_window(window: int | None) -> None:
    check_prefill([1500, 2100], [1500, 600], 16, 8, 128, 16, torch.float32, window=window)


kernels_env.run_in_subprocess_if_needed(globals())

"""KV store, block pack/unpack, RMSNorm, rotary and SiLU-gate kernels vs their torch references."""

from __future__ import annotations

import kernels_env  # first: sets TRITON_INTERPRET before pdserve.kernels loads
import pytest
import torch
from kernels_env import DEVICE, TOL, ULP, assert_close, gpu_only

from pdserve.kernels.activation import silu_mul, silu_mul_ref
from pdserve.kernels.kv_cache_ops import store_kv
from pdserve.kernels.norm_rope import apply_rope, rms_norm, rope_and_store
from pdserve.kernels.reference import (
    apply_rope_ref,
    rms_norm_ref,
    rope_cos_sin_cache,
    store_kv_ref,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_store(num_blocks: int, bs: int, hkv: int, d: int, t: int, dtype: torch.dtype) -> None:
    cache = torch.randn(num_blocks, 2, bs, hkv, d, device=DEVICE).to(dtype)
    expect = cache.clone()
    # k, v as views of a fused [T, 3, Hkv, D] projection (non-contiguous rows); fp32 input
    # exercises the cast, except bf16 in the interpreter (which truncates instead of rounding)
    src = dtype if (dtype == torch.bfloat16 and DEVICE == "cpu") else torch.float32
    kv = torch.randn(t, 3, hkv, d, device=DEVICE).to(src)
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.randperm(num_blocks * bs, device=DEVICE)[:t]
    slots[t // 2] = -1  # a padding token writes nothing
    store_kv(cache, k, v, slots)
    store_kv_ref(expect, k, v, slots)
    assert torch.equal(cache, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_tiny(dtype: torch.dtype) -> None:
    check_store(num_blocks=9, bs=4, hkv=2, d=16, t=11, dtype=dtype)
    check_store(num_blocks=5, bs=16, hkv=3, d=32, t=7, dtype=dtype)  # non-power-of-2 heads


def check_rms_norm(rows: int, hidden: int, dtype: torch.dtype, eps: float = 1e-6) -> None:
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    res = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    tol = TOL[dtype] + 2 * ULP[dtype]
    assert_close(rms_norm(x, w, eps), rms_norm_ref(x, w, eps), tol)
    out, new_res = rms_norm(x, w, eps, residual=res)
    out_ref, res_ref = rms_norm_ref(x, w, eps, residual=res)
    assert_close(out, out_ref, tol)
    if x.is_cuda:
        assert torch.equal(new_res, res_ref)
    else:  # the interpreter truncates fp32 -> bf16 instead of rounding
        torch.testing.assert_close(new_res.float(), res_ref.float(), atol=0, rtol=ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_tiny(dtype: torch.dtype) -> None:
    check_rms_norm(5, 48, dtype)
    check_rms_norm(3, 64, dtype)


def check_rope(t: int, hq: int, hkv: int, d: int, rot: int, dtype: torch.dtype,
               inplace: bool) -> None:
    cache = rope_cos_sin_cache(rot, 4096, base=500000.0, device=DEVICE)
    qkv = torch.randn(t, hq + 2 * hkv, d, device=DEVICE).to(dtype)  # fused projection
    q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]  # non-contiguous views
    pos = torch.randint(0, 4096, (t,), device=DEVICE)
    q_ref, k_ref = apply_rope_ref(q, k, pos, cache)
    v_before = qkv[:, hq + hkv:].clone()
    qo, ko = apply_rope(q, k, pos, cache, inplace=inplace)
    tol = 2 * ULP[dtype] + 1e-5
    assert_close(qo, q_ref, tol)
    assert_close(ko, k_ref, tol)
    if inplace:
        assert qo.data_ptr() == q.data_ptr() and torch.equal(qkv[:, :hq], qo)
    assert torch.equal(qkv[:, hq + hkv:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_tiny(dtype: torch.dtype, inplace: bool) -> None:
    check_rope(6, 4, 2, 16, 16, dtype, inplace)
    check_rope(3, 2, 1, 32, 16, dtype, inplace)  # partial rotary


def check_rope_store(t: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype) -> None:
    num_blocks = t // bs + 2
    cache = torch.randn(num_blocks, 2, bs, hkv, d, device=DEVICE).to(dtype)
    expect = cache.clone()
    cs = rope_cos_sin_cache(d, 4096, base=500000.0, device=DEVICE).to(dtype)
    qkv = torch.randn(t, hq + 2 * hkv, d, device=DEVICE).to(dtype)  # views of a fused qkv
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    pos = torch.randint(0, 4096, (t,), device=DEVICE)
    slots = torch.randperm(num_blocks * bs, device=DEVICE)[:t]
    slots[t // 2] = -1  # padding: rotates q, stores nothing
    q_ref, k_ref = apply_rope_ref(q, k, pos, cs)
    store_kv_ref(expect, k_ref, v, slots)
    k_before = k.clone()
    out = rope_and_store(q, k, v, pos, cs, cache, slots)
    tol = 2 * ULP[dtype] + 1e-5
    assert out.data_ptr() == q.data_ptr()
    assert_close(q, q_ref, tol)
    assert torch.equal(k, k_before)  # k stays as it was: only the cache gets it rotated
    assert_close(cache, expect, tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_store_tiny(dtype: torch.dtype) -> None:
    check_rope_store(7, 4, 2, 16, 4, dtype)


def check_silu_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    x = (2 * torch.randn(rows, 2 * inter, device=DEVICE)).to(dtype)
    x[0, 0], x[0, 1] = -90.0, 90.0  # exp overflow on either side stays finite
    out = silu_mul(x)
    assert out.shape == (rows, inter) and out.dtype == dtype
    assert_close(out, silu_mul_ref(x), 2 * ULP[dtype] + 1e-5)
    view = x[:, : inter]  # a non-contiguous gate|up pair: the first half of each row
    assert_close(silu_mul(view), silu_mul_ref(view), 2 * ULP[dtype] + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_tiny(dtype: torch.dtype) -> None:
    check_silu_mul(5, 40, dtype)  # 40 is not a multiple of the block: masked tail


# ---- realistic shapes (GPU) ----

@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kv_gpu(dtype: torch.dtype) -> None:
    check_store(num_blocks=2048, bs=16, hkv=8, d=128, t=8192, dtype=dtype)



@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
def test_rms_norm_gpu(dtype: torch.dtype, hidden: int) -> None:
    check_rms_norm(2048, hidden, dtype, eps=1e-5)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_gpu(dtype: torch.dtype, inplace: bool) -> None:
    check_rope(8192, 32, 8, 128, 128, dtype, inplace)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_and_store_gpu(dtype: torch.dtype) -> None:
    check_rope_store(4096, 32, 8, 128, 16, dtype)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_gpu(dtype: torch.dtype) -> None:
    check_silu_mul(4096, 14336, dtype)


kernels_env.run_in_subprocess_if_needed(globals())

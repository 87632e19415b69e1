"""KV-cache stores: write new K/V rows at their slots.

Cache layout per layer: [N, 2, bs, Hkv, D]; one block's K and V are contiguous. (Packing
blocks for the transfer layer is one torch gather: kvtransfer/pack.py.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, use_triton
from .reference import store_kv_ref


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    s_kt, s_kh, s_vt, s_vh,  # k, v [T, Hkv, D] strides
    s_cb, s_ckv, s_ct, s_ch,  # cache [N, 2, bs, Hkv, D] strides
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    dst = (slot // PAGE) * s_cb + (slot % PAGE) * s_ct + offs_h[:, None] * s_ch + offs_d[None, :]
    dtype = cache_ptr.dtype.element_ty
    k = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :], mask=mask)
    tl.store(cache_ptr + dst, k.to(dtype), mask=mask)
    v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=mask)
    tl.store(cache_ptr + s_ckv + dst, v.to(dtype), mask=mask)


def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache [N, 2, bs, Hkv, D]; k, v [T, Hkv, D]; slot_mapping [T] int (slot < 0: skip)."""
    if not use_triton(kv_cache, _store_kv_kernel):
        store_kv_ref(kv_cache, k, v, slot_mapping)
        return
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    cs = kv_cache.stride()
    _store_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cs[0], cs[1], cs[2], cs[3], H=H, D=D, BLOCK_H=next_pow2(H), BLOCK_D=next_pow2(D),
        PAGE=kv_cache.shape[2], **({"num_warps": 4} if kv_cache.is_cuda else {}))

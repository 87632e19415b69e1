"""Fused RMSNorm (+ residual add) and neox-style rotary embedding.

rms_norm follows HF Llama rounding: h = x + residual is rounded to the model dtype, the
normalized h is rounded to the model dtype before the weight multiply. apply_rope rotates
the first rotary_dim dims of each head with HF's rounding: cos/sin rounded to the model
dtype, each product rounded, then the sum rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, use_triton
from .reference import apply_rope_ref, rms_norm_ref, store_kv_ref


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    s_x, s_r, s_o, s_nr,  # row strides (columns are contiguous)
    H, eps,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(dtype)
        tl.store(new_res_ptr + row * s_nr + offs, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / H
    normed = (x * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_o + offs, (w * normed).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] (residual same shape), weight [H] -> out [..., H] in x.dtype, or
    (out, x + residual) when residual is given. Out of place."""
    if not use_triton(x, _rms_norm_kernel):
        return rms_norm_ref(x, weight, eps, residual)
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, H)
    if residual is not None:
        r2 = residual.reshape(-1, H)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        nr2 = new_res.view(-1, H)
    else:
        r2 = nr2 = x2
    rows = x2.shape[0]
    if rows:
        block = next_pow2(H)
        warps = min(16, max(1, block // 512))
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, nr2, x2.stride(0), r2.stride(0), out2.stride(0), nr2.stride(0),
            H, eps, BLOCK=block, HAS_RES=residual is not None,
            **({"num_warps": warps} if x.is_cuda else {}))
    return out if residual is None else (out, new_res)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, t, s_st, s_sh, s_dt, s_dh, cos, sin,
                  H: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < H) & (offs_r[None, :] < HALF)
    src = src_ptr + t * s_st + offs_h[:, None] * s_sh + offs_r[None, :]
    dst = dst_ptr + t * s_dt + offs_h[:, None] * s_dh + offs_r[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = dst_ptr.dtype.element_ty
    # Each product rounds to the model dtype, as eager torch (and HF) do.
    c1, s1 = (x1 * cos).to(dtype).to(tl.float32), (x1 * sin).to(dtype).to(tl.float32)
    c2, s2 = (x2 * cos).to(dtype).to(tl.float32), (x2 * sin).to(dtype).to(tl.float32)
    tl.store(dst, (c1 - s2).to(dtype), mask=mask)
    tl.store(dst + HALF, (c2 + s1).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr,
    s_qt, s_qh, s_kt, s_kh, s_qot, s_qoh, s_kot, s_koh, s_cs,
    HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)
    r_mask = offs_r < HALF
    dtype = qo_ptr.dtype.element_ty  # cos/sin round to the model dtype first, as in HF
    cos = tl.load(cs_ptr + pos * s_cs + offs_r, mask=r_mask, other=0.0).to(dtype)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + offs_r, mask=r_mask, other=0.0).to(dtype)
    cos, sin = cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]
    _rotate_heads(q_ptr, qo_ptr, t, s_qt, s_qh, s_qot, s_qoh, cos, sin, HQ, BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, t, s_kt, s_kh, s_kot, s_koh, cos, sin, HK, BLOCK_HK, HALF, BLOCK_HALF)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor, inplace: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding. q [T, Hq, D], k [T, Hkv, D] (last dim contiguous; may be views
    of a fused qkv), positions [T] int, cos_sin_cache [max_pos, rot] (cos | sin halves,
    rot <= D, see reference.rope_cos_sin_cache). Returns (q, k) rotated; with inplace=True
    they are the inputs, modified."""
    if not use_triton(q, _rope_kernel):
        qr, kr = apply_rope_ref(q, k, positions, cos_sin_cache)
        if inplace:
            q.copy_(qr)
            k.copy_(kr)
            return q, k
        return qr, kr
    T, Hq, D = q.shape
    Hk = k.shape[1]
    rot = cos_sin_cache.shape[-1]
    assert rot <= D and rot % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_sin_cache.stride(-1) == 1
    if inplace:
        qo, ko = q, k
    elif rot < D:  # dims past rot pass through unchanged
        qo, ko = q.clone(), k.clone()
        q, k = qo, ko
    else:
        qo, ko = torch.empty_like(q), torch.empty_like(k)
    if T:
        _rope_kernel[(T,)](
            q, k, qo, ko, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_sin_cache.stride(0),
            HQ=Hq, HK=Hk, BLOCK_HQ=next_pow2(Hq), BLOCK_HK=next_pow2(Hk),
            HALF=rot // 2, BLOCK_HALF=next_pow2(rot // 2),
            **({"num_warps": 4} if q.is_cuda else {}))
    return qo, ko


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cs,
    s_cb, s_ckv, s_ct, s_ch,  # cache [N, 2, bs, Hkv, D] strides
    HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)
    r_mask = offs_r < HALF
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cs_ptr + pos * s_cs + offs_r, mask=r_mask, other=0.0).to(dtype)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + offs_r, mask=r_mask, other=0.0).to(dtype)
    cos, sin = cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_ptr, t, s_qt, s_qh, s_qt, s_qh, cos, sin, HQ, BLOCK_HQ, HALF, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # padding tokens store nothing
        row = cache_ptr + (slot // PAGE) * s_cb + (slot % PAGE) * s_ct  # this token's K row
        _rotate_heads(k_ptr, row, t, s_kt, s_kh, 0, s_ch, cos, sin, HK, BLOCK_HK, HALF, BLOCK_HALF)
        offs_h = tl.arange(0, BLOCK_HK)
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        mask = (offs_h[:, None] < HK) & (offs_d[None, :] < 2 * HALF)
        v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=mask)
        tl.store(row + s_ckv + offs_h[:, None] * s_ch + offs_d[None, :],
                 v.to(cache_ptr.dtype.element_ty), mask=mask)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> torch.Tensor:
    """One launch for the start of attention: rotate q in place and store rotated k plus v
    into the paged cache at slot_mapping (slot < 0: nothing stored). q [T, Hq, D], k and v
    [T, Hkv, D] (views of a fused qkv allowed), cos_sin_cache [max_pos, D] (full rotary),
    kv_cache [N, 2, bs, Hkv, D]. Returns q. k itself is left unrotated."""
    if not use_triton(q, _rope_store_kernel):
        qr, kr = apply_rope_ref(q, k, positions, cos_sin_cache)
        q.copy_(qr)
        store_kv_ref(kv_cache, kr, v, slot_mapping)
        return q
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert cos_sin_cache.shape[-1] == D and kv_cache.shape[-1] == D, "rope_and_store: full rotary only"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos_sin_cache.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if T:
        cs = kv_cache.stride()
        _rope_store_kernel[(T,)](
            q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos_sin_cache.stride(0), cs[0], cs[1], cs[2], cs[3],
            HQ=Hq, HK=Hk, BLOCK_HQ=next_pow2(Hq), BLOCK_HK=next_pow2(Hk),
            HALF=D // 2, BLOCK_HALF=next_pow2(D // 2), PAGE=kv_cache.shape[2],
            **({"num_warps": 4} if q.is_cuda else {}))
    return q

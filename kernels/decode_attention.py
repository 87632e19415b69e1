"""Paged decode attention (one new query token per sequence), GQA-grouped, split-K.

One program handles one (sequence, kv head, split): it loads the query rows of all
G = Hq / Hkv heads of that KV group as one [BLOCK_H, D] tile, so every K/V block is read
once per KV head group. Long contexts are split into `num_splits` chunks; each program
writes a normalized partial output and its log2-sum-exp, and a reduce kernel combines
them. With one split the main kernel writes the final output directly.

Launch shapes depend only on host ints (batch, heads, num_splits), never on device data,
so the call is CUDA-graph capturable; padding rows with seq_len 0 produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, device_sms, dot_upcast, mma, next_pow2, use_triton
from .reference import decode_attention_ref

MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 512  # a split covers at least this many context tokens
PROGRAMS_PER_SM = 2  # split until B * Hkv * splits reaches this many programs per SM
SHORT_CONTEXT = 1024  # contexts up to this long never split (no partials, no reduce launch)


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    s_qb, s_qh,  # q [B, Hq, D] strides
    s_cb, s_ckv, s_ct, s_ch,  # cache [N, 2, bs, Hkv, D] strides
    s_bt,  # block_tables row stride
    s_ob, s_oh, s_os,  # out [B, Hq, D] or partial out [B, Hq, S, D] strides
    s_lb, s_lh,  # lse [B, Hq, S] strides (split stride 1)
    qk_scale, num_splits, window,  # window: keys at positions >= seq_len - window
    G: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    kv_lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    start = kv_lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < G
    d_mask = offs_d < HEAD_DIM
    heads = kvh * G + offs_h
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    kv_dtype = cache_ptr.dtype.element_ty
    q = q.to(kv_dtype)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * s_bt
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < end
        page = tl.load(bt_row + tok // PAGE, mask=n_mask, other=0)
        if IDX64:
            page = page.to(tl.int64)
        row = page * s_cb + (tok % PAGE) * s_ct + kvh * s_ch  # [BLOCK_N] cache offsets
        kv_off = row[:, None] + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), UPCAST) * qk_scale  # [BLOCK_H, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(kv_dtype), v, UPCAST)
        m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_off = b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :]
    o_mask = h_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(out_ptr + o_off, o, mask=o_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * s_lb + heads * s_lh + split, lse, mask=h_mask)
    else:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _reduce_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    s_pb, s_ph,  # partial out [B, Hq, S, D] strides (split stride is HEAD_DIM)
    s_lb, s_lh,  # lse [B, Hq, S] strides (split stride 1)
    s_ob, s_oh,  # out [B, Hq, D]
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    base = b * s_pb + h * s_ph
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all splits empty (seq_len 0): output zeros
    w = tl.exp2(lse - m)  # [BLOCK_S], 0 for empty splits
    part = tl.load(part_ptr + base + offs_s[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    den = tl.sum(w, 0)
    o = tl.sum(part * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """One split (a single launch, no reduce) for short contexts or when batch * kv heads
    already gives a program per SM; otherwise enough splits for ~PROGRAMS_PER_SM per SM."""
    if max_seq_len <= SHORT_CONTEXT or batch * num_kv_heads >= num_sms:
        return 1
    want = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(1, batch * num_kv_heads))
    by_len = triton.cdiv(max(1, max_seq_len), MIN_SPLIT_TOKENS)
    return max(1, min(want, by_len, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    kv_cache: torch.Tensor,  # [N, 2, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [B, Hq, D]
) -> torch.Tensor:  # [B, Hq, D], dtype of q
    """Attention of each sequence's single query over its seq_lens[b] cached tokens.

    max_seq_len is a host-side bound (it only picks num_splits; any value is correct).
    """
    if not use_triton(q, _decode_kernel):
        res = decode_attention_ref(q, kv_cache, block_tables, seq_lens, scale, sliding_window)
        return res if out is None else out.copy_(res)
    B, Hq, D = q.shape
    _, _, page, Hkv, Dc = kv_cache.shape
    assert Dc == D and Hq % Hkv == 0 and kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert block_tables.shape[0] == B and seq_lens.shape[0] == B
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    sms = device_sms(q)
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, max_seq_len, sms)
    interp = not q.is_cuda
    # Under one wave of programs the kernel is latency bound: take 128-token tiles (8 pages
    # per iteration, half the serial loop trips); full grids keep 64-token tiles with 3
    # stages (2 programs per SM in shared memory) for bandwidth.
    block_d = max(16, next_pow2(D))
    small_grid = B * Hkv * num_splits < sms and block_d <= 128  # 2 x 64 KiB K/V stages
    block_n = 16 if interp else (128 if small_grid else 64)
    common = dict(
        G=G, BLOCK_H=max(16, next_pow2(G)), HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=page,
        UPCAST=dot_upcast(kv_cache.dtype, _decode_kernel), IDX64=kv_cache.numel() >= 2**31,
    )
    launch = {} if interp else dict(num_warps=4, num_stages=2 if small_grid else 3)
    grid = (B, Hkv, num_splits)
    window = sliding_window or (1 << 30)
    cs = kv_cache.stride()
    if num_splits == 1:
        _decode_kernel[grid](
            q, kv_cache, block_tables, seq_lens, out, out,
            q.stride(0), q.stride(1), cs[0], cs[1], cs[2], cs[3], block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0, scale * LOG2E, 1, window,
            SPLIT=False, **common, **launch)
        return out
    part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        q, kv_cache, block_tables, seq_lens, part, lse,
        q.stride(0), q.stride(1), cs[0], cs[1], cs[2], cs[3], block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale * LOG2E, num_splits, window,
        SPLIT=True, **common, **launch)
    _reduce_kernel[(B, Hq)](
        part, lse, out, num_splits, part.stride(0), part.stride(1), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits), **({} if interp else dict(num_warps=4)))
    return out

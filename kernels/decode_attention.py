"""Paged decode attention (one new query token per sequence), GQA-grouped, split-K.

One program handles one (sequence, kv head, split): it loads the query rows of all
G = Hq / Hkv heads of that KV group as one [BLOCK_H, D] tile, so every K/V block is read
once per KV head group. Long contexts are split into `num_splits` chunks; each program
writes a normalized partial output and its log2-sum-exp, then takes a ticket from a
per-(sequence, kv head) counter: the program that arrives last combines the partials into
the final output and resets the counter. So split-K is one launch (no reduce kernel), which
matters at batch 1 where the whole attention is a few microseconds per layer. With one
split the program writes the final output directly.

Launch shapes depend only on host ints (batch, heads, num_splits), never on device data,
so the call is CUDA-graph capturable; padding rows with seq_len 0 produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, device_sms, dot_upcast, mma, next_pow2, ticket_counters, use_triton
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
    final_ptr, s_fb, s_fh,  # final out [B, Hq, D] (SPLIT: written by the last split)
    counter_ptr,  # [B * Hkv] int32 tickets, zero between launches (SPLIT only)
    qk_scale, num_splits, window,  # window: keys at positions >= seq_len - window
    G: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    kv_lo = tl.maximum(seq_len - window, 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N), 1) * BLOCK_N
    n_active = tl.cdiv(seq_len - kv_lo, chunk)  # splits with keys; the others only check in
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
        if split < n_active:
            tl.store(out_ptr + o_off, o, mask=o_mask)
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + b * s_lb + heads * s_lh + split, lse, mask=h_mask)
        # Every thread's stores land before the ticket (barrier, then a release); the program
        # holding the last ticket acquires, so it sees every other split's partials.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + b * tl.num_programs(1) + kvh, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            tl.debug_barrier()
            _combine(out_ptr, lse_ptr, final_ptr, b, heads, h_mask, offs_d, d_mask, n_active,
                     s_ob, s_oh, s_os, s_lb, s_lh, s_fb, s_fh, BLOCK_H, BLOCK_S)
            tl.atomic_xchg(counter_ptr + b * tl.num_programs(1) + kvh, 0)  # ready for reuse
    else:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine(part_ptr, lse_ptr, final_ptr, b, heads, h_mask, offs_d, d_mask, n_active,
             s_pb, s_ph, s_ps, s_lb, s_lh, s_fb, s_fh,
             BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    """Weighted sum of the partial outputs of the n_active splits that had keys, for one KV
    group's heads (log2 domain); n_active 0 (seq_len 0) gives zeros."""
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < n_active
    lse = tl.load(lse_ptr + b * s_lb + heads[:, None] * s_lh + offs_s[None, :],
                  mask=h_mask[:, None] & s_mask[None, :], other=float("-inf"),
                  cache_modifier=".cg")  # [BLOCK_H, BLOCK_S]; .cg: from L2, not this SM's L1
    m = tl.max(lse, 1)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp2(lse - m[:, None])  # 0 for empty splits
    den = tl.sum(w, 1)
    acc = tl.zeros([BLOCK_H, offs_d.shape[0]], tl.float32)
    base = part_ptr + b * s_pb + heads[:, None] * s_ph + offs_d[None, :]
    hd_mask = h_mask[:, None] & d_mask[None, :]
    for s in range(0, n_active):
        ws = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)  # [BLOCK_H] weight of split s
        part = tl.load(base + s * s_ps, mask=hd_mask, other=0.0, cache_modifier=".cg")
        acc += part * ws[:, None]
    o = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(final_ptr + b * s_fb + heads[:, None] * s_fh + offs_d[None, :],
             o.to(final_ptr.dtype.element_ty), mask=hd_mask)


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
    tickets = split_counters(q.device, B * Hkv) if num_splits > 1 else None
    if tickets is None:  # one split, or tickets not allocated before a graph capture
        num_splits = 1
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
            out.stride(0), out.stride(1), 0, 0, 0, out, 0, 0, seq_lens, scale * LOG2E, 1, window,
            SPLIT=False, BLOCK_S=1, **common, **launch)
        return out
    part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        q, kv_cache, block_tables, seq_lens, part, lse,
        q.stride(0), q.stride(1), cs[0], cs[1], cs[2], cs[3], block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out, out.stride(0), out.stride(1), tickets,
        scale * LOG2E, num_splits, window,
        SPLIT=True, BLOCK_S=next_pow2(num_splits), **common, **launch)
    return out


_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}  # split-K tickets per device


def split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """This kernel's tickets for n (sequence, kv head) groups (see _common.ticket_counters)."""
    return ticket_counters(_COUNTERS, device, n)

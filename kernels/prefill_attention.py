"""Varlen causal prefill attention over a paged KV cache (FlashAttention-style tiling).

For sequence b the queries q[qsl[b]:qsl[b+1]] are the last q_len positions of a context
of seq_lens[b] tokens whose K/V (new tokens included, already stored) live in the paged
cache. So the same kernel serves fresh prompts, chunked prefill and prefix-cache hits;
rows with q_len == 1 (decode rows of a mixed batch) are handled too.

Grid (m-block, q head, sequence). A program keeps a BLOCK_M x D query tile and streams
BLOCK_N-token K/V tiles gathered through the block table, with an online softmax in fp32
(log2 domain). Key tiles entirely below the first query are processed without masks; only
the diagonal tiles are masked, and tiles past the last query are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot_upcast, mma, next_pow2, use_triton
from .reference import prefill_attention_ref

Config = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages


@triton.jit
def _tile(acc, m_i, l_i, q, qpos, n0, hi, window, cache_ptr, bt_row, s_cb, s_ckv, s_ct, kv_head_off,
          qk_scale, offs_n, offs_d,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
          MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
          IDX64: tl.constexpr):
    tok = n0 + offs_n  # [BLOCK_N] key positions
    if MASKED:
        n_ok = tok < hi
        page = tl.load(bt_row + tok // PAGE, mask=n_ok, other=0)
    else:
        page = tl.load(bt_row + tok // PAGE)
    if IDX64:
        page = page.to(tl.int64)
    kv_off = (page * s_cb + (tok % PAGE) * s_ct + kv_head_off)[:, None] + offs_d[None, :]
    if MASKED:
        kv_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        d_mask = offs_d[None, :] < HEAD_DIM
        k = tl.load(cache_ptr + kv_off, mask=d_mask, other=0.0)
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=d_mask, other=0.0)
    else:
        k = tl.load(cache_ptr + kv_off)
        v = tl.load(cache_ptr + s_ckv + kv_off)
    qk = mma(q, tl.trans(k), UPCAST)  # [BLOCK_M, BLOCK_N] fp32
    if MASKED:
        keep = (tok[None, :] <= qpos[:, None]) & n_ok[None, :]
        if HAS_WINDOW:
            keep = keep & (tok[None, :] > qpos[:, None] - window)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = m_new
    if HAS_WINDOW:
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    s_qt, s_qh,  # q [T, Hq, D]
    s_cb, s_ckv, s_ct, s_ch,  # cache [N, 2, bs, Hkv, D]
    s_bt,  # block_tables [B, max_blocks]
    s_ot, s_oh,  # out [T, Hq, D]
    qk_scale, window,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
):
    mb = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query blocks first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_q = seq_len - q_len + mb * BLOCK_M  # position of this tile's first query
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = mb * BLOCK_M + offs_m < q_len
    qpos = first_q + offs_m
    rows = (q_start + mb * BLOCK_M + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * s_qt + h * s_qh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
    q = q.to(cache_ptr.dtype.element_ty)

    hi = tl.minimum(first_q + BLOCK_M, seq_len)  # keys < hi
    if HAS_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)
        full_hi = lo  # every tile is masked (the window bounds each row from below)
    else:
        lo = first_q * 0
        full_hi = ((first_q + 1) // BLOCK_N) * BLOCK_N  # tiles whose keys all <= first_q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b * s_bt
    kv_head_off = (h // G) * s_ch
    for n0 in range(lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, qpos, n0, hi, window, cache_ptr, bt_row,
                              s_cb, s_ckv, s_ct, kv_head_off, qk_scale, offs_n, offs_d,
                              HEAD_DIM, BLOCK_D, PAGE, False, HAS_WINDOW, UPCAST, IDX64)
    for n0 in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, qpos, n0, hi, window, cache_ptr, bt_row,
                              s_cb, s_ckv, s_ct, kv_head_off, qk_scale, offs_n, offs_d,
                              HEAD_DIM, BLOCK_D, PAGE, True, HAS_WINDOW, UPCAST, IDX64)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * s_ot + h * s_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def default_config(max_query_len: int, head_dim: int, interpreted: bool) -> Config:
    if interpreted:
        return (16, 16, 4, 1)
    if head_dim > 128:
        return (64, 32, 4, 2)
    if max_query_len <= 1024:  # short prompts: smaller M tiles give more programs
        return (64, 64, 4, 3)
    return (128, 64, 4, 3)  # best of the H200 sweep at 8k (432 TFLOP/s vs 368 for 8 warps)


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [N, 2, bs, Hkv, D], the new tokens' K/V already stored
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length incl. the new tokens
    query_start_loc: torch.Tensor,  # [B+1] int32
    max_query_len: int,  # host-side bound on qsl[b+1] - qsl[b]
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, Hq, D]
    config: Config | None = None,
) -> torch.Tensor:  # [T, Hq, D], dtype of q
    if not use_triton(q, _prefill_kernel):
        res = prefill_attention_ref(q, kv_cache, block_tables, seq_lens, query_start_loc,
                                    scale, sliding_window)
        return res if out is None else out.copy_(res)
    T, Hq, D = q.shape
    _, _, page, Hkv, Dc = kv_cache.shape
    assert Dc == D and Hq % Hkv == 0 and kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    B = seq_lens.shape[0]
    if out is None:
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0 or max_query_len == 0:
        return out
    interp = not q.is_cuda
    block_m, block_n, warps, stages = config or default_config(max_query_len, D, interp)
    grid = (triton.cdiv(max_query_len, block_m), Hq, B)
    cs = kv_cache.stride()
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out,
        q.stride(0), q.stride(1), cs[0], cs[1], cs[2], cs[3], block_tables.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E, sliding_window or 0,
        G=Hq // Hkv, HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, HAS_WINDOW=sliding_window is not None,
        UPCAST=dot_upcast(kv_cache.dtype, _prefill_kernel), IDX64=kv_cache.numel() >= 2**31,
        **({} if interp else dict(num_warps=warps, num_stages=stages)))
    return out

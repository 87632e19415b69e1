"""Torch references of every kernel in this package. They define the semantics, run on
any device, and are what the kernels are tested against (and what the public wrappers
fall back to on CPU outside the Triton interpreter). Attention math is done in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_context(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                   ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ctx_len tokens: each [ctx_len, Hkv, D]."""
    blocks = kv_cache[block_ids]  # [nb, 2, bs, Hkv, D]
    nb, _, bs, h, d = blocks.shape
    k = blocks[:, 0].reshape(nb * bs, h, d)[:ctx_len]
    v = blocks[:, 1].reshape(nb * bs, h, d)[:ctx_len]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float,
            sliding_window: int | None) -> torch.Tensor:
    """q [n, Hq, D] = the last n positions of a ctx-token context; k, v [ctx, Hkv, D]."""
    n, hq = q.shape[0], q.shape[1]
    group = hq // k.shape[1]
    qf = q.float().transpose(0, 1)  # (Hq, n, D)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, ctx, D)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    qpos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)  # (n, 1)
    kpos = torch.arange(ctx, device=q.device).unsqueeze(0)  # (1, ctx)
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)  # (Hq, n, D)
    return o.transpose(0, 1)  # (n, Hq, D)


def prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor | list[int],
                          query_start_loc: torch.Tensor | list[int], scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
    """q [T, Hq, D]: rows qsl[b]:qsl[b+1] are the last positions of sequence b's context of
    seq_lens[b] tokens, all of whose K/V are in kv_cache [N, 2, bs, Hkv, D]. -> [T, Hq, D].
    seq_lens and query_start_loc may be host lists (no device sync then)."""
    out = torch.zeros_like(q)
    bs = kv_cache.shape[2]
    qsl = query_start_loc if isinstance(query_start_loc, list) else query_start_loc.tolist()
    lens = seq_lens if isinstance(seq_lens, list) else seq_lens.tolist()
    for b, ctx in enumerate(lens):
        qs, qe = qsl[b], qsl[b + 1]
        if qe == qs:
            continue
        nblk = (ctx + bs - 1) // bs
        k, v = gather_context(kv_cache, block_tables[b, :nblk].long(), ctx)
        out[qs:qe] = _attend(q[qs:qe], k, v, ctx, scale, sliding_window).to(q.dtype)
    return out


def decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float,
                         sliding_window: int | None = None) -> torch.Tensor:
    """q [B, Hq, D], one query per sequence at position seq_lens[b]-1 -> [B, Hq, D]
    (zeros for rows with seq_len 0)."""
    rows = (seq_lens > 0).nonzero().flatten()
    qsl = torch.arange(rows.numel() + 1, dtype=torch.int32)  # one query per kept row
    out = torch.zeros_like(q)
    if rows.numel():
        out[rows] = prefill_attention_ref(q[rows], kv_cache, block_tables[rows], seq_lens[rows],
                                          qsl, scale, sliding_window)
    return out


def store_kv_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """kv_cache[slot // bs, 0|1, slot % bs] = k|v for each token; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots, k, v = slot_mapping[keep], k[keep], v[keep]
    bs = kv_cache.shape[2]
    blk, off = slots // bs, slots % bs
    kv_cache[blk, 0, off] = k.to(kv_cache.dtype)
    kv_cache[blk, 1, off] = v.to(kv_cache.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF Llama semantics: h = x + residual (rounded to x.dtype), out = w * norm(h).to(dtype).
    Returns out, or (out, h) when residual is given."""
    h = x if residual is None else (x + residual)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, h)


def rope_cos_sin_cache(rotary_dim: int, max_positions: int, base: float = 10000.0,
                       inv_freq: torch.Tensor | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32: cos(pos * f) in the first half, sin in the second.
    inv_freq [rotary_dim/2] may carry a scaling (e.g. llama3); default base^(-2i/d)."""
    if inv_freq is None:
        inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(pos, inv_freq.float())  # (P, rot/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, 1, rot/2] in x.dtype: neox rotation of the first rot dims,
    computed in x.dtype (every product rounded, as HF does)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding: q [T, Hq, D], k [T, Hkv, D], positions [T]. Out of place.
    The cache rounds to q's dtype first (HF casts cos/sin to the activations' dtype)."""
    cs = cos_sin_cache.index_select(0, positions.long()).to(q.dtype)  # (T, rot)
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # (T, 1, rot/2)
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)

"""Torch reference attention over the paged cache. Runs anywhere; the kernels are checked
against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata, register_backend


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new K/V rows at their slots. kv_cache: [N, 2, bs, Hkv, D]; k, v: [T, Hkv, D]."""
    bs = kv_cache.shape[2]
    blk = torch.div(slot_mapping, bs, rounding_mode="floor")
    off = slot_mapping - blk * bs
    kv_cache[blk, 0, off] = k.to(kv_cache.dtype)
    kv_cache[blk, 1, off] = v.to(kv_cache.dtype)


def gather_context(kv_cache: torch.Tensor, block_ids: torch.Tensor, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ctx_len tokens: each [ctx_len, Hkv, D]."""
    blocks = kv_cache[block_ids]  # [nb, 2, bs, Hkv, D]
    nb, _, bs, h, d = blocks.shape
    k = blocks[:, 0].reshape(nb * bs, h, d)[:ctx_len]
    v = blocks[:, 1].reshape(nb * bs, h, d)[:ctx_len]
    return k, v


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole paged context, in fp32."""
    out = torch.empty_like(q)
    bs = meta.block_size
    group = q.shape[1] // kv_cache.shape[3]
    for b in range(meta.num_seqs):
        qs, qe = meta.query_start_loc_cpu[b], meta.query_start_loc_cpu[b + 1]
        ctx = meta.seq_lens_cpu[b]
        n = qe - qs
        if n == 0:
            continue
        nblk = (ctx + bs - 1) // bs
        k, v = gather_context(kv_cache, meta.block_tables[b, :nblk].long(), ctx)
        qf = q[qs:qe].float().transpose(0, 1)  # (Hq, n, D)
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, ctx, D)
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        qpos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)  # (n, 1)
        kpos = torch.arange(ctx, device=q.device).unsqueeze(0)  # (1, ctx)
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)  # (Hq, n, D)
        out[qs:qe] = o.transpose(0, 1).to(q.dtype)
    return out


@register_backend("torch")
class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window=None, rope=None):
        if rope is not None:
            raise ValueError("the torch attention backend does not fuse rope (fuses_rope=False)")
        write_kv(kv_cache, k, v, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale, sliding_window)

"""The "triton" attention backend: store kernel (or rope + store in one kernel, when the
model passes `rope`) + paged decode kernel for decode-only batches, + varlen prefill
kernel otherwise (mixed batches included: the prefill kernel handles q_len == 1 rows).

The decode path makes no host syncs: launch grids come from tensor shapes and
meta.max_seq_len (a host int used only to choose the split count), so it can be captured
in a CUDA graph for a padded batch. For capture, pass the largest context the graph will
replay with as meta.max_seq_len (or pin `decode_num_splits`); any split count is correct
for any seq_lens, it only changes speed. Padding rows may have seq_len 0 (output zeros)
or 1, and slot_mapping < 0 (nothing stored).
"""

from __future__ import annotations

import torch

from pdserve.kernels.attention import AttentionBackend, AttentionMetadata, register_backend

from .decode_attention import decode_attention
from .kv_cache_ops import store_kv
from .norm_rope import rope_and_store
from .prefill_attention import prefill_attention


@register_backend("triton")
class TritonAttention(AttentionBackend):
    fuses_rope = True  # forward(rope=...) rotates q and k in the store kernel

    def __init__(self, decode_num_splits: int | None = None) -> None:
        self.decode_num_splits = decode_num_splits  # None: chosen from batch and max_seq_len

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [N, 2, bs, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        if rope is not None:  # one launch: rotate q in place, store rotated k and v
            q = rope_and_store(q, k, v, rope[0], rope[1], kv_cache, meta.slot_mapping)
        else:
            store_kv(kv_cache, k, v, meta.slot_mapping)
        if meta.decode_only and q.shape[0] == meta.seq_lens.shape[0]:
            return decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                    meta.max_seq_len, sliding_window, self.decode_num_splits)
        return prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens,
                                 meta.query_start_loc, meta.max_query_len, scale, sliding_window)

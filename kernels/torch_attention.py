"""The "torch" attention backend: the reference math of kernels/reference.py, eager.

Runs anywhere; it is the baseline the Triton backend is measured and checked against."""

from __future__ import annotations

from .attention import AttentionBackend, register_backend
from .reference import prefill_attention_ref, store_kv_ref


@register_backend("torch")
class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window=None, rope=None):
        if rope is not None:
            raise ValueError("the torch attention backend does not fuse rope (fuses_rope=False)")
        store_kv_ref(kv_cache, k, v, meta.slot_mapping)
        return prefill_attention_ref(q, kv_cache, meta.block_tables, meta.seq_lens_cpu,
                                     meta.query_start_loc_cpu, scale, sliding_window)

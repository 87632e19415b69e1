"""Triton kernels, each with a torch reference (reference.py) that the wrappers fall back
to on CPU:

- decode_attention.decode_attention: paged decode attention, GQA-grouped, split-K;
- prefill_attention.prefill_attention: varlen causal attention over a paged prefix;
- kv_cache_ops.store_kv / pack_blocks / unpack_blocks: KV stores and transfer staging;
- norm_rope.rms_norm / apply_rope: fused RMSNorm(+residual) and neox rotary;
- attention_backend.TritonAttention: the "triton" AttentionBackend.

Submodules import triton; importing this package alone does not.
"""

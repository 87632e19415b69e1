"""Triton kernels, each with a torch reference (reference.py) that the wrappers fall back
to on CPU:

- decode_attention.decode_attention: paged decode attention, GQA-grouped, split-K;
- prefill_attention.prefill_attention: varlen causal attention over a paged prefix;
- kv_cache_ops.store_kv / pack_blocks / unpack_blocks: KV stores and transfer staging;
- norm_rope.rms_norm / apply_rope / rope_and_store: fused RMSNorm(+residual), neox
  rotary, and rotary fused with the KV-cache store;
- activation.silu_mul: SiLU-gated activation over a gate|up projection;
- skinny_gemm.skinny_linear: bandwidth-bound GEMM for decode batches (M <= 16);
- attention_backend.TritonAttention: the "triton" AttentionBackend.

Submodules import triton; importing this package alone does not.
"""

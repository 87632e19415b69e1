"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k norm).

q|k|v and gate|up run as merged GEMMs; `layers.checkpoint_tensors` maps the HF safetensors
names onto them (views), so weights load by name. Attention goes
through an `AttentionBackend` over the paged KV pool; the model itself holds no cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import GatedMLP, Linear, MergedLinear, RMSNorm, RotaryEmbedding, linear
from pdserve.kernels.attention import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.sliding_window = config.sliding_window
        h, q_size, kv_size = config.hidden_size, config.num_heads * config.head_dim, \
            config.num_kv_heads * config.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(h, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias=config.attention_bias)
        self.o_proj = Linear(q_size, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)  # views of one GEMM
        q = q.view(t, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = v.view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary.fused and attn.fuses_rope:  # rope fused into the backend's KV store
            o = attn.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window,
                             rope=(positions, rotary.cos_sin_cache))  # (T, nh, hd)
        else:
            q, k = rotary(positions, q, k)
            o = attn.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))  # (T, H)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """The `model.` prefix of HF names: embeddings, layers, final norm, shared rope table."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling_dict)


class LlamaForCausalLM(nn.Module):
    """One decoder class for every supported architecture; `config` picks the variant.

    With tie_word_embeddings there is no `lm_head` module: logits use the embedding matrix,
    so tying survives `to_empty()` and a checkpoint needs no `lm_head.weight`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = None if config.tie_word_embeddings else \
            Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata, attn: AttentionBackend,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, H].

        Layer i's new K/V are written into kv_caches[i] at meta.slot_mapping; layer_hook(i)
        runs right after that write (before layer i's MLP).
        """
        m = self.model
        h = m.embed_tokens(input_ids)  # (T, H)
        residual = None
        for i, layer in enumerate(m.layers):
            if residual is None:
                residual, h = h, layer.input_layernorm(h)
            else:
                h, residual = layer.input_layernorm(h, residual)
            h = layer.self_attn(positions, h, m.rotary_emb, kv_caches[i], meta, attn)
            if layer_hook is not None:
                layer_hook(i)
            h, residual = layer.post_attention_layernorm(h, residual)
            h = layer.mlp(h)
        h, _ = m.norm(h, residual)
        return h

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, fused=self.model.norm.fused).float()

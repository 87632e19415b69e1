"""Named model presets: real shapes, deterministic random weights, the byte tokenizer.

Every preset uses the byte tokenizer (engine/tokenizer.py), so its bos/eos are the byte
tokenizer's specials rather than the real model's token ids.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import checkpoint_tensors
from pdserve.engine.tokenizer import BYTE_BOS_ID, BYTE_EOS_ID

_BYTE_SPECIALS = {"eos_token_ids": (BYTE_EOS_ID,), "bos_token_id": BYTE_BOS_ID}


def _llama3_rope(factor: float) -> tuple[tuple[str, object], ...]:
    return tuple(sorted({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}.items()))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=384, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, **_BYTE_SPECIALS),
    "llama-3.1-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_llama3_rope(8.0), **_BYTE_SPECIALS),
    "llama-3.2-1b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True, **_BYTE_SPECIALS),
    "qwen3-0.6b": ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, qk_norm=True, **_BYTE_SPECIALS),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place, on its own device and dtype (no CPU detour).

    Norm weights are 1, biases 0, other weights N(0, std); the projections that write into
    the residual stream (o_proj, down_proj) get std / sqrt(2 * num_layers) so activations
    stay O(1) through deep presets. Each tensor draws from its own generator seeded by
    (seed, name): the same seed gives the same weights on the same device type, whatever
    the parameter order. CPU and CUDA generators give different streams.
    """
    tensors = checkpoint_tensors(model)  # HF names: merged projections draw per shard
    num_layers = sum(1 for n in tensors if n.endswith("input_layernorm.weight"))
    for name, p in tensors.items():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            s = std / math.sqrt(2 * max(num_layers, 1)) if name.endswith(
                ("o_proj.weight", "down_proj.weight")) else std
            gen = torch.Generator(device=p.device)
            gen.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # CPU uses 32 bits
            p.normal_(0.0, s, generator=gen)

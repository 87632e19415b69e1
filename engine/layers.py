"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, SiLU-gated MLP.

The math follows HF transformers' Llama modules operation by operation, so fp32 outputs
match HF to rounding and bf16 outputs round the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in fp32 and cast back to x's dtype.

    With `residual`, first adds it (in x's dtype, as HF does) and returns
    `(normed, x + residual)`, the new residual stream; without it, returns `normed`.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32, CPU) for rope_type default, linear, llama3."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept,
        # and the band in between interpolates smoothly between the two.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (HF rotate_half) from a cached table indexed by position.

    The cos/sin tables [max_position, head_dim // 2] are non-persistent buffers: they follow
    the module's device and dtype. After `to_empty()` call `reset_cache()` to refill them.
    """

    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.inv_freq_cpu = rope_inv_freq(head_dim, base, rope_scaling)
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        cos, sin = self._tables(device)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self.inv_freq_cpu.to(device))  # (P, hd/2), fp32
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def reset_cache(self) -> None:
        cos, sin = self._tables(self.cos_cache.device)
        self.cos_cache = cos.to(self.cos_cache.dtype)
        self.sin_cache = sin.to(self.sin_cache.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, nh, hd], k [T, nkv, hd] -> rotated (q, k)."""
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, hd/2)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, hd/2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Equal to x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), without the concatenations.
    x1, x2 = x.chunk(2, dim=-1)  # each (T, h, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (T, h, hd)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); parameter names as in HF."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

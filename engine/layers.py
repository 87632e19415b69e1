"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, SiLU-gated MLP, and
merged projections (q|k|v, gate|up) that run as one GEMM.

The math follows HF transformers' Llama modules operation by operation, so fp32 outputs
match HF to rounding and bf16 outputs round the same way. Modules with a `fused` flag run
a fused Triton kernel (pdserve.kernels) instead of the eager torch ops when it is set (see
`set_fused_kernels`); both paths round the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _kernels() -> SimpleNamespace:
    """The fused Triton kernels, imported on first use (importing triton is slow)."""
    from pdserve.kernels.activation import silu_mul
    from pdserve.kernels.norm_rope import apply_rope, rms_norm
    from pdserve.kernels.skinny_gemm import skinny_linear
    return SimpleNamespace(rms_norm=rms_norm, apply_rope=apply_rope, silu_mul=silu_mul,
                           skinny_linear=skinny_linear)


SKINNY_ALWAYS_M = 1  # rows at or below which the skinny GEMM replaces cuBLAS for any shape
SKINNY_MAX_M, SKINNY_MAX_N = 16, 4096  # up to 16 rows for outputs this narrow (o_proj, down)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           fused: bool = False) -> torch.Tensor:
    """F.linear, or with `fused` the Triton skinny GEMM where it beat cuBLAS on an H200
    (benchmarks/results: every shape at one row; outputs of <= 4096 features, where cuBLAS
    splits K into a second kernel, up to 16 rows)."""
    if fused and x.dim() == 2:
        m, n = x.shape[0], weight.shape[0]
        if 0 < m <= SKINNY_ALWAYS_M or (m <= SKINNY_MAX_M and n <= SKINNY_MAX_N):
            return _kernels().skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose `fused` flag routes small-batch (decode) calls to the skinny GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.fused)


def set_fused_kernels(model: nn.Module, on: bool) -> int:
    """Switch every module with a `fused` flag to the Triton kernels (on) or eager torch;
    returns how many modules were switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = on
            n += 1
    return n


class MergedLinear(Linear):
    """One Linear whose output rows stack several checkpoint projections of the same input
    (q|k|v, gate|up), so they run as one GEMM. `shards` maps each checkpoint name to its
    number of output features, in order; `checkpoint_tensors` yields the per-name views."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards = dict(shards)

    def shard_tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        off = 0
        for name, n in self.shards.items():
            yield f"{prefix}{name}.weight", self.weight[off:off + n]
            if self.bias is not None:
                yield f"{prefix}{name}.bias", self.bias[off:off + n]
            off += n


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under their HF checkpoint names; a MergedLinear contributes one view per
    shard (writing a view writes the merged parameter). Loading, random init and export
    go through this mapping."""
    out: dict[str, torch.Tensor] = {}
    merged = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MergedLinear):
            parent = mod_name.rpartition(".")[0]
            out.update(mod.shard_tensors(f"{parent}." if parent else ""))
            merged.add(mod_name)
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in merged:
            out[name] = p
    return out

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
        self.fused = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            return _kernels().rms_norm(x, self.weight, self.eps, residual)
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

    `cos_sin_cache` [max_position, head_dim] holds cos in the first half of each row and sin
    in the second. It is a non-persistent buffer: it follows the module's device and dtype
    (HF also rounds cos/sin to the activations' dtype). After `to_empty()` call
    `reset_cache()` to refill it.
    """

    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.inv_freq_cpu = rope_inv_freq(head_dim, base, rope_scaling)
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        self.register_buffer("cos_sin_cache", self._table(device), persistent=False)
        self.fused = False

    def _table(self, device: torch.device) -> torch.Tensor:
        pos = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self.inv_freq_cpu.to(device))  # (P, hd/2), fp32
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # (P, hd)

    @torch.no_grad()
    def reset_cache(self) -> None:
        self.cos_sin_cache = self._table(self.cos_sin_cache.device).to(self.cos_sin_cache.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, nh, hd], k [T, nkv, hd] -> rotated (q, k). The fused
        kernel rotates in place (q and k may be views of one qkv projection)."""
        if self.fused:
            return _kernels().apply_rope(q, k, positions, self.cos_sin_cache, inplace=True)
        cs = self.cos_sin_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, hd)
        cos, sin = cs.chunk(2, dim=-1)  # each (T, 1, hd/2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Equal to x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), without the concatenations.
    x1, x2 = x.chunk(2, dim=-1)  # each (T, h, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (T, h, hd)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), gate and up as one merged GEMM; the
    checkpoint names are HF's (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        if self.fused:
            return self.down_proj(_kernels().silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

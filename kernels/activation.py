"""Fused SiLU-gated activation: out = silu(gate) * up over a [T, 2I] gate|up tensor.

Rounds like the eager torch expression `F.silu(gate) * up` in the input dtype: silu is
computed in fp32 and rounded, then the product is rounded once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import use_triton


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, s_x, s_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * s_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * s_o + offs, (s * u).to(dtype), mask=mask)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate | up halves, last dim contiguous) -> silu(gate) * up [..., I]."""
    if not use_triton(x, _silu_mul_kernel):
        return silu_mul_ref(x)
    two_i = x.shape[-1]
    assert two_i % 2 == 0, f"last dim {two_i} is not gate|up halves"
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block = 1024 if x.is_cuda else 64
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            x2, out.view(-1, inter), x2.stride(0), inter, inter, BLOCK=block,
            **({"num_warps": 4} if x.is_cuda else {}))
    return out

"""Small helpers shared by the Triton kernels: dispatch (Triton or torch reference), device
facts, and the dot-product precision switch.

A kernel runs through Triton when its tensors are on CUDA, or on CPU when Triton was
imported in interpreter mode (TRITON_INTERPRET=1 set by the test harness before the
kernel modules were imported). Otherwise the public wrappers fall back to the torch
reference, so callers never branch on the device themselves.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` (an @triton.jit object) was built by the CPU interpreter."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def use_triton(t: torch.Tensor, kernel: object) -> bool:
    """Run the Triton kernel for tensor `t`: on CUDA, or on CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and is_interpreted(kernel))


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's device (a nominal 132 off-GPU, the H100/H200 count)."""
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 132


_RETIRED: list[torch.Tensor] = []  # outgrown ticket arrays: captured graphs may point at them


def ticket_counters(pool: dict[tuple[str, int | None], torch.Tensor], device: torch.device,
                    n: int, min_slots: int = 4096) -> torch.Tensor | None:
    """Zeroed int32 tickets (>= n) for a single-launch split-K kernel, one array per device
    in `pool`, reused: every launch leaves its tickets at zero again. None when the array
    would have to be allocated during CUDA-graph capture (its zero fill would only run at
    replay): the caller then runs unsplit. Warm up eagerly before capture."""
    key = (device.type, device.index)
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, min_slots), dtype=torch.int32, device=device)
        pool[key] = buf
    return buf


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_upcast(dtype: torch.dtype, kernel: object) -> bool:
    """Whether tl.dot must take fp32 operands (ieee precision): fp32 data, and bf16 in the
    interpreter, whose bf16 dot is wrong (it multiplies the raw uint16 bit patterns)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpreted(kernel))


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32: native tensor-core dot, or fp32-exact when UPCAST."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)

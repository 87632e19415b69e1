"""Gather and scatter of pool rows with a bounded number of thread blocks (CUDA, Triton).

Why: `torch.index_select` / `index_copy_` launch one thread block per few rows, so a 64 MiB
message briefly fills every SM. The transfer backend's kernel for the next message
(ncclSend/ncclRecv), queued on another stream, then waits for SMs until the copy drains:
per message, about the copy's whole duration. These kernels instead run `ctas` persistent
programs that loop over rows, leaving the other SMs to the backend. A row is one block's K
and V of one layer: `row_words` machine words, contiguous in the pool and in staging.

`available()` is False without CUDA or Triton; callers then use the torch index ops.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _copy_rows(src_ptr, src_idx_ptr, dst_ptr, dst_idx_ptr, n_rows, row_words,
                   INDEX_SRC: tl.constexpr, BLOCK: tl.constexpr):
        """dst[dst_row(r)] = src[src_row(r)] for r in this program's share of [0, n_rows):
        INDEX_SRC: src_row = src_idx[r], dst_row = r (gather); else src_row = r,
        dst_row = dst_idx[r] (scatter)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        for r in range(pid, n_rows, nprog):
            r64 = r.to(tl.int64)
            if INDEX_SRC:
                s_row = tl.load(src_idx_ptr + r64)
                d_row = r64
            else:
                s_row = r64
                d_row = tl.load(dst_idx_ptr + r64)
            s_base = src_ptr + s_row * row_words
            d_base = dst_ptr + d_row * row_words
            for off in range(0, row_words, BLOCK):
                c = off + cols
                m = c < row_words
                tl.store(d_base + c, tl.load(s_base + c, mask=m), mask=m)


def _launch(src: torch.Tensor, src_idx: torch.Tensor | None, dst: torch.Tensor,
            dst_idx: torch.Tensor | None, n_rows: int, ctas: int) -> None:
    if n_rows == 0:
        return
    row_words = src.shape[1]
    block = min(2048, triton.next_power_of_2(row_words))
    idx = src_idx if src_idx is not None else dst_idx  # the kernel reads only this one
    _copy_rows[(min(ctas, n_rows),)](src, idx, dst, idx, n_rows, row_words,
                                     INDEX_SRC=src_idx is not None, BLOCK=block, num_warps=8)


def gather(pool: torch.Tensor, index: torch.Tensor, out: torch.Tensor, ctas: int) -> None:
    """out[r] = pool[index[r]]; pool [N, W], index [R] int64 (contiguous), out [R, W]."""
    _launch(pool, index.contiguous(), out, None, index.numel(), ctas)


def scatter(pool: torch.Tensor, index: torch.Tensor, src: torch.Tensor, ctas: int) -> None:
    """pool[index[r]] = src[r]; pool [N, W], index [R] int64, src [R, W]."""
    _launch(src, None, pool, index.contiguous(), index.numel(), ctas)

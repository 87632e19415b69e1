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

from typing import Any

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
    def _copy_rows(src_ptr, dst_ptr, idx_ptr, idx_off, n_rows, row_words,
                   INDEX_SRC: tl.constexpr, BLOCK: tl.constexpr):
        """dst[dst_row(r)] = src[src_row(r)] for r in this program's share of [0, n_rows),
        with pool row p(r) = idx[idx_off + r]:
        INDEX_SRC: src_row = p(r), dst_row = r (gather); else src_row = r, dst_row = p(r)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        for r in range(pid, n_rows, nprog):
            r64 = r.to(tl.int64)
            p = tl.load(idx_ptr + idx_off + r64)
            if INDEX_SRC:
                s_row = p
                d_row = r64
            else:
                s_row = r64
                d_row = p
            s_base = src_ptr + s_row * row_words
            d_base = dst_ptr + d_row * row_words
            for off in range(0, row_words, BLOCK):
                c = off + cols
                m = c < row_words
                tl.store(d_base + c, tl.load(s_base + c, mask=m), mask=m)


    # one specialization whatever the request (ids, layer range, sizes): the compiled kernel
    # can then be launched directly (see _Direct); the pools' alignment and row_words (a
    # layout constant: its divisibility gives the rows' vector loads) stay specialized
    @triton.jit(do_not_specialize=["nb", "l0", "n_rows", "src_blocks", "dst_blocks"],
                do_not_specialize_on_alignment=["sid_ptr", "did_ptr"])
    def _copy_pairs(src_ptr, dst_ptr, sid_ptr, did_ptr, nb, l0, n_rows, row_words,
                    src_blocks, dst_blocks, BLOCK: tl.constexpr):
        """Rows r of layers l0.. of one request, r = (layer - l0) * nb + b, b < nb:
        dst[layer * dst_blocks + did[b]] = src[layer * src_blocks + sid[b]]
        (peer copy: dst may be another GPU's pool, mapped through CUDA IPC)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        for r in range(pid, n_rows, nprog):
            layer = (l0 + r // nb).to(tl.int64)
            b = r % nb
            s_base = src_ptr + (layer * src_blocks + tl.load(sid_ptr + b)) * row_words
            d_base = dst_ptr + (layer * dst_blocks + tl.load(did_ptr + b)) * row_words
            for o in range(0, row_words, BLOCK):
                c = o + cols
                m = c < row_words
                tl.store(d_base + c, tl.load(s_base + c, mask=m), mask=m)


def _launch(src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, idx_off: int,
            n_rows: int, ctas: int, gather: bool) -> None:
    if n_rows == 0:
        return
    row_words = (src if gather else dst).shape[1]
    block = min(2048, triton.next_power_of_2(row_words))
    _copy_rows[(min(ctas, n_rows),)](src, dst, idx, idx_off, n_rows, row_words,
                                     INDEX_SRC=gather, BLOCK=block, num_warps=8)


def gather(pool: torch.Tensor, index: torch.Tensor, out: torch.Tensor, ctas: int,
           offset: int = 0, n_rows: int | None = None) -> None:
    """out[r] = pool[index[offset + r]] for r < n_rows (default: index.numel() - offset);
    pool [N, W], index contiguous int64, out [>= n_rows, W]. Nothing is sliced or
    allocated here: one launch per message (torch ops cost host time per call)."""
    n = index.numel() - offset if n_rows is None else n_rows
    _launch(pool, out, index, offset, n, ctas, True)


def copy_pairs(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor,
               dst_ids: torch.Tensor, l0: int, l1: int, src_blocks: int, dst_blocks: int,
               ctas: int, block: int = 2048, num_warps: int = 8) -> None:
    """Layers [l0, l1) of one request's blocks: for every block position b,
    dst[layer * dst_blocks + dst_ids[b]] = src[layer * src_blocks + src_ids[b]]. src, dst:
    flat [layers * blocks, W] pools (dst may live on a peer GPU); ids contiguous int64 on
    src's device, one per block of the request (no per-layer index to build or copy).
    block (words a step) and num_warps: see benchmarks/peer_copy_micro.py."""
    nb = src_ids.numel()
    n_rows = (l1 - l0) * nb
    if n_rows == 0:
        return
    block = min(block, triton.next_power_of_2(src.shape[1]))
    _PAIRS.launch(min(ctas, n_rows), (src, dst, src_ids, dst_ids, nb, l0, n_rows, src.shape[1],
                                      src_blocks, dst_blocks), block, num_warps)


class _Direct:
    """Launches of one Triton kernel without its JIT dispatch.

    Why: a peer copy is one launch per request, on the transfer's critical path, and
    `kernel[grid](...)` runs Triton's Python dispatch (argument binding, specialization,
    cache key, hooks) each time: about 0.1 ms of host time per launch in the sender's
    progress thread on an H100 host (benchmarks/results/transfer), 3-5x the launch itself.
    The first launch of a key (device, BLOCK, num_warps, row_words, the pools' alignment,
    whether every int fits 32 bits) goes through Triton and keeps the compiled kernel; later
    ones call its launcher. That is safe because the kernel specializes on nothing else
    (do_not_specialize above): the kernel compiled for the first call is the one Triton
    would pick for every later call with the same key. Launch hooks (a profiler's), or a
    current device other than the pool's, send the call through Triton."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.kernels: dict[tuple, Any] = {}

    def launch(self, grid: int, args: tuple, block: int, num_warps: int) -> None:
        src, dst, row_words = args[0], args[1], args[7]
        ints = [a for a in args if type(a) is int]
        key = (src.device.index, block, num_warps, row_words, src.data_ptr() % 16 == 0,
               dst.data_ptr() % 16 == 0, all(-(1 << 31) <= a < 1 << 31 for a in ints))
        k = self.kernels.get(key)
        knobs = getattr(triton, "knobs", None)
        if (k is None or knobs is None or knobs.runtime.launch_enter_hook is not None
                or torch.cuda.current_device() != src.device.index):
            k = self.fn[(grid,)](*args, BLOCK=block, num_warps=num_warps)
            if hasattr(k, "result"):  # an asynchronous compile's future
                k = k.result()
            if knobs is not None and hasattr(k, "packed_metadata"):
                self.kernels[key] = k
            return
        stream = torch.cuda.current_stream(src.device).cuda_stream
        k.run(grid, 1, 1, stream, k.function, k.packed_metadata, None, None, None, *args, block)


if triton is not None:
    _PAIRS = _Direct(_copy_pairs)


def scatter(pool: torch.Tensor, index: torch.Tensor, src: torch.Tensor, ctas: int,
            offset: int = 0, n_rows: int | None = None) -> None:
    """pool[index[offset + r]] = src[r] for r < n_rows; as gather, the other way."""
    n = index.numel() - offset if n_rows is None else n_rows
    _launch(src, pool, index, offset, n, ctas, False)

"""Skinny GEMM for decode: y = x @ W^T (+ bias) with few rows x [M, K] (M <= 16) and an
nn.Linear weight W [N, K] (K contiguous). At these M the call is bound by reading W once,
so the kernel is built for bandwidth, not FLOPs.

One program owns BLOCK_N output columns (rows of W) and one K range. Per iteration it
streams a [BLOCK_N, BLOCK_K] tile of W with 16-byte vector loads along K (the tile is
software-pipelined `num_stages` deep through shared memory when num_stages > 1) and the
matching K-slice of the x rows, then:
- CUDA cores (default for M < DOT_MIN_M, possible up to FMA_MAX_M rows): one fp32
  [BLOCK_N, BLOCK_K] accumulator per x row takes the elementwise products; the K
  reduction (cross-lane shuffles) happens once, after the loop;
- tensor cores (default from DOT_MIN_M rows): acc[BLOCK_M, BLOCK_N] += x_slice @ W_tile^T
  (mma.m16n8k16, x rows padded to 16 in registers; compute stays far below memory time).
Tail rows of W (N not a multiple of BLOCK_N) and padded x rows are clamped to the last
valid row, so loads need no masks unless K is not a multiple of BLOCK_K.

Split-K (SPLIT_K > 1) stays one launch: each program writes its fp32 partial tile to a
scratch [SPLIT_K, M, N], then bumps a per-column-tile counter (acq_rel); the program that
finds SPLIT_K - 1 sums the partials in split order (deterministic), adds the bias, writes
y and resets its counter to 0. The int32 counters live in one zeroed array per device,
allocated by the first split-K call and reset by every launch, so CUDA-graph replays
work; a split-K call that would allocate it during capture runs unsplit instead (warm
up eagerly before capture, as the engine's graph runner does). Two split-K launches must
not run concurrently on one device (different streams), as they share the counters.

Launch shapes depend only on host ints (M, N, K, config): CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import device_sms, dot_upcast, mma, next_pow2, ticket_counters, use_triton

Config = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K

MAX_M = 16  # larger M falls back to F.linear (cuBLAS is compute-efficient there)
FMA_MAX_M = 4  # the CUDA-core path takes at most this many rows
DOT_MIN_M = 3  # default: tensor cores (tl.dot) from this many rows (CUDA-core FMAs grow with M)
ACC_REGS = 64  # CUDA-core path: fp32 accumulator registers per thread the default allows
COUNTER_SLOTS = 1 << 16  # split-K counters per device (one per column tile)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Configs a sweep tries (bench_skinny), per path: CUDA cores and tensor cores.
SWEEP_FMA: list[Config] = [
    (8, 512, 4, 1, 1), (8, 512, 4, 3, 1), (8, 512, 4, 4, 1), (4, 512, 4, 3, 1),
    (16, 512, 8, 3, 1), (8, 256, 4, 4, 1), (16, 256, 4, 3, 2), (32, 256, 8, 3, 4),
]
SWEEP_DOT: list[Config] = [
    (16, 256, 2, 3, 1), (16, 256, 2, 4, 1), (16, 256, 2, 3, 2), (32, 256, 4, 3, 1),
    (32, 256, 4, 3, 2), (32, 128, 4, 4, 2), (64, 128, 4, 3, 1), (64, 128, 4, 3, 2),
]

_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


@triton.jit
def _x_row(x_ptr, m: tl.constexpr, M, s_xm, ks, k_ok, EVEN_K: tl.constexpr):
    """x[min(m, M - 1), ks] as fp32 (rows past M repeat the last row; never stored)."""
    ptrs = x_ptr + tl.minimum(m, M - 1) * s_xm + ks
    if EVEN_K:
        xr = tl.load(ptrs)
    else:
        xr = tl.load(ptrs, mask=k_ok, other=0.0)
    return xr.to(tl.float32)


@triton.jit
def _put_row(acc, offs_m, m: tl.constexpr, part):
    """acc [BLOCK_M, BLOCK_N] with row m set from the row-m accumulator [BLOCK_N, BLOCK_K]."""
    return tl.where(offs_m[:, None] == m, tl.sum(part, 1)[None, :], acc)


@triton.jit
def _write_out(acc, b_ptr, y_ptr, offs_m, offs_n, N, s_ym, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, s_xm, s_wn, s_ym, k_chunk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IDX64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1)  # tail columns re-read row N - 1: unmasked W loads
    if IDX64:
        rows = rows.to(tl.int64)
    w_rows = w_ptr + rows[:, None] * s_wn  # [BLOCK_N, 1]
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if USE_DOT:
        x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * s_xm  # [BLOCK_M, 1]
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            ks = (k0 + offs_k)[None, :]
            if EVEN_K:
                w = tl.load(w_rows + ks, eviction_policy="evict_first")
                xt = tl.load(x_rows + ks)
            else:
                w = tl.load(w_rows + ks, mask=ks < K, other=0.0, eviction_policy="evict_first")
                xt = tl.load(x_rows + ks, mask=ks < K, other=0.0)
            acc += mma(xt, tl.trans(w), UPCAST)
    else:
        a0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        a1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        a2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        a3 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            ks = k0 + offs_k
            k_ok = ks < K
            if EVEN_K:
                w = tl.load(w_rows + ks[None, :], eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            w = w.to(tl.float32)
            a0 += w * _x_row(x_ptr, 0, M, s_xm, ks, k_ok, EVEN_K)[None, :]
            if BLOCK_M > 1:
                a1 += w * _x_row(x_ptr, 1, M, s_xm, ks, k_ok, EVEN_K)[None, :]
            if BLOCK_M > 2:
                a2 += w * _x_row(x_ptr, 2, M, s_xm, ks, k_ok, EVEN_K)[None, :]
                a3 += w * _x_row(x_ptr, 3, M, s_xm, ks, k_ok, EVEN_K)[None, :]
        acc = _put_row(acc, offs_m, 0, a0)
        if BLOCK_M > 1:
            acc = _put_row(acc, offs_m, 1, a1)
        if BLOCK_M > 2:
            acc = _put_row(acc, offs_m, 2, a2)
            acc = _put_row(acc, offs_m, 3, a3)

    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        _write_out(acc, b_ptr, y_ptr, offs_m, offs_n, N, s_ym, mask, HAS_BIAS)
    else:
        p_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + p_off, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the release below
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:  # the last split of this column tile reduces
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * M * N + p_off, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            _write_out(total, b_ptr, y_ptr, offs_m, offs_n, N, s_ym, mask, HAS_BIAS)
            tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch / graph replay


def default_config(M: int, N: int, K: int, sms: int = 132, use_dot: bool | None = None,
                   interpreted: bool = False) -> Config:
    """Per-shape default: pipelined tiles (2 in flight per program), column tiles small
    enough for >= 3 programs per SM on the CUDA-core path, and split-K (powers of 2, each
    split >= 4 K-tiles) while there are < 2 programs per SM (e.g. N = 4096 on the
    tensor-core path, whose column tiles are wider)."""
    if use_dot is None:
        use_dot = default_use_dot(M)
    if interpreted:  # small tiles: the interpreter's cost grows with the tile
        return (16, 32, 4, 1, 1) if use_dot else (8, 32, 4, 1, 1)
    if use_dot:
        # Every program re-reads the x rows: BLOCK_N >= 2 * BLOCK_M keeps that L2 traffic
        # <= half the W bytes. mma tiles are 16 x 8 (x rows padded to 16 in registers):
        # 16 columns fill 2 warps, 32+ fill 4. Stage bytes (BLOCK_N + BLOCK_M) * BLOCK_K * 2
        # <= 24 KiB, 3 stages (2 in flight): 4+ programs fit an SM's shared memory.
        bk = min(128 if N >= 64 * 3 * sms else 256, max(16, next_pow2(K)))
        bn = 64 if bk == 128 else max(16, 2 * next_pow2(M))
        warps, stages = (2 if bn == 16 else 4), 3
    else:
        # One [BLOCK_N, BLOCK_K] fp32 accumulator per x row: at most ACC_REGS per thread.
        bm = next_pow2(M)
        warps = 4 if bm <= 2 else 8
        bk = min(512, max(16, next_pow2(K)))
        bn = 32
        while bn > 4 and (bn * bk * bm > ACC_REGS * 32 * warps or triton.cdiv(N, bn) < 3 * sms):
            bn //= 2
        stages = 3  # 2 tiles in flight per program (2 stages would keep only 1)
    split = 1
    while triton.cdiv(N, bn) * split < 2 * sms and triton.cdiv(K, 2 * split) >= 4 * bk:
        split *= 2
    return (bn, bk, warps, stages, split)


def default_use_dot(M: int) -> bool:
    return M >= DOT_MIN_M


def sweep_configs(M: int) -> list[Config]:
    """The sweep of the default path at M rows."""
    return SWEEP_DOT if default_use_dot(M) else SWEEP_FMA


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: Config | None = None, use_dot: bool | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most MAX_M rows, weight [N, K]
    (stride(-1) == 1, any row stride), bias [N]; all one dtype (bf16/fp16/fp32). fp32
    accumulation, output in x.dtype. config = (BLOCK_N, BLOCK_K, num_warps, num_stages,
    SPLIT_K) (default: default_config); use_dot forces the tensor-core (True) or
    CUDA-core (False) path. Anything else falls back to F.linear."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if (not use_triton(x, _skinny_kernel) or not 0 < M <= MAX_M or weight.dim() != 2
            or weight.shape[1] != K or weight.shape[0] == 0 or x.dtype not in DTYPES
            or weight.dtype != x.dtype or weight.device != x.device
            or (bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1]))):
        return F.linear(x, weight, bias)
    N = weight.shape[0]
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    if use_dot is None:
        use_dot = default_use_dot(M)
    interp = not x.is_cuda
    bn, bk, warps, stages, split = config or default_config(
        M, N, K, device_sms(x), use_dot, interpreted=interp)
    if use_dot and (bn < 16 or bk < 16):
        raise ValueError(f"the tensor-core path needs BLOCK_N, BLOCK_K >= 16, got {bn}, {bk}")
    if not use_dot and M > FMA_MAX_M:
        raise ValueError(f"the CUDA-core path takes at most {FMA_MAX_M} rows, got {M}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(N, bn)
    k_chunk = triton.cdiv(triton.cdiv(K, split), bk) * bk if split > 1 else K
    cnt = ticket_counters(_COUNTERS, x.device, n_tiles, COUNTER_SLOTS) if split > 1 else None
    if cnt is None:
        split, k_chunk, cnt, part = 1, K, y, y
    else:
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _skinny_kernel[(n_tiles, split)](
        x2, w, b if b is not None else y, y, part, cnt,
        M, N, K, x2.stride(0), w.stride(0), y.stride(0), k_chunk,
        BLOCK_M=next_pow2(M), BLOCK_N=bn, BLOCK_K=bk,
        SPLIT_K=split, NUM_STAGES=stages, USE_DOT=use_dot,
        UPCAST=use_dot and dot_upcast(x.dtype, _skinny_kernel), HAS_BIAS=b is not None,
        EVEN_K=K % bk == 0, IDX64=(N - 1) * w.stride(0) + K >= 2**31,
        **({"num_warps": warps, "num_stages": stages} if x.is_cuda else {}))
    return y.view(*x.shape[:-1], N)

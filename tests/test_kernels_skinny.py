"""Skinny GEMM (decode-time linear layers, M <= 16 rows) vs F.linear."""

from __future__ import annotations

import kernels_env  # first: sets TRITON_INTERPRET before pdserve.kernels loads
import pytest
import torch
import torch.nn.functional as F
from kernels_env import DEVICE, ULP, assert_close, gpu_only

from pdserve.kernels import skinny_gemm
from pdserve.kernels.skinny_gemm import (
    FMA_MAX_M,
    MAX_M,
    SWEEP_DOT,
    SWEEP_FMA,
    default_config,
    default_use_dot,
    skinny_linear,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LLAMA_8B = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672),
            "down": (14336, 4096), "lm_head": (4096, 128256)}  # name -> (K, N)


def make(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, device: str = DEVICE):
    """x [m, k], weight [n, k] scaled so outputs are O(1), bias [n] or None."""
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * k**-0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def tol_for(dtype: torch.dtype) -> float:
    # One rounding of the fp32 sum to the output dtype (the interpreter truncates: up to
    # one ULP), plus fp32 accumulation-order noise.
    return 2 * ULP[dtype] + 1e-5


def check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw: object) -> torch.Tensor:
    y = skinny_linear(x, w, b, **kw)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close(y, ref, tol_for(x.dtype))
    return y


# ---- tiny shapes (CPU: Triton interpreter) ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_tiny(dtype: torch.dtype, m: int, bias: bool) -> None:
    x, w, b = make(m, 37, 75, dtype, bias)  # N, K odd: tail column tile, masked K tail
    check(x, w, b)  # default config
    # every SPLIT_K shape: none, even, uneven (3 x 32 over K = 75), one empty split (4)
    for split in (1, 2, 3, 4):
        check(x, w, b, config=(16, 16, 4, 2, split))
    if m <= FMA_MAX_M:  # the other path too
        check(x, w, b, config=(16, 32, 4, 1, 2), use_dot=not default_use_dot(m))


def test_skinny_four_rows_cuda_cores() -> None:
    """M = 3 on the CUDA-core path: 4 row accumulators, the padding row repeats row 2."""
    x, w, b = make(3, 37, 75, torch.bfloat16, True)
    check(x, w, b, use_dot=False)
    check(x, w, b, config=(16, 16, 4, 2, 3), use_dot=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skinny_views_and_even_k(dtype: torch.dtype) -> None:
    """K a multiple of BLOCK_K (unmasked loads), leading batch dims, strided x and weight
    rows (a slice of a wider fused weight), BLOCK_N > N."""
    k, n = 64, 20
    fused = (torch.randn(n, k + 24, device=DEVICE) * k**-0.5).to(dtype)
    w = fused[:, 8:8 + k]  # row stride k + 24, columns contiguous
    xs = torch.randn(2, 2, k + 8, device=DEVICE).to(dtype)[..., :k]  # M = 4, strided rows
    b = torch.randn(n, device=DEVICE).to(dtype)
    check(xs, w, b, config=(8, 32, 4, 1, 1), use_dot=False)
    check(xs, w, b, config=(32, 16, 4, 3, 2), use_dot=False)
    check(xs, w, b, config=(16, 32, 4, 3, 1), use_dot=True)
    check(xs[:1, :1], w, None, config=(4, 64, 4, 1, 1))  # M = 1, one K tile


def test_skinny_split_k_reuses_counters() -> None:
    """The split-K counters are back at 0 after each call; repeated calls are bit-identical
    (partials are summed in split order, not in arrival order)."""
    x, w, b = make(5, 37, 75, torch.float32, True)
    y1 = check(x, w, b, config=(16, 16, 4, 1, 3))
    y2 = skinny_linear(x, w, b, config=(16, 16, 4, 1, 3))
    assert torch.equal(y1, y2)
    counters = skinny_gemm._COUNTERS[(x.device.type, x.device.index)]
    assert counters.numel() >= skinny_gemm.COUNTER_SLOTS and not counters.any()


class _NoLaunch:
    """Stands in for the kernel: indexing it (a launch) fails the test."""

    def __getitem__(self, grid: object) -> None:
        raise AssertionError("the Triton kernel was launched")


def test_skinny_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skinny_gemm, "_skinny_kernel", _NoLaunch())
    x, w, b = make(MAX_M + 1, 12, 40, torch.float32, True)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))  # M > 16: F.linear
    empty = skinny_linear(x[:0], w, b)
    assert empty.shape == (0, 12)
    x16 = x.to(torch.float64)[:2]  # dtype the kernel does not take
    w16 = w.to(torch.float64)
    assert torch.equal(skinny_linear(x16, w16), F.linear(x16, w16))
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error
        skinny_linear(x[:2], w.to(torch.float16))


def test_skinny_bad_config() -> None:
    x, w, _ = make(5, 16, 32, torch.float32, False)
    with pytest.raises(ValueError):
        skinny_linear(x, w, config=(16, 32, 4, 1, 1), use_dot=False)  # > FMA_MAX_M rows
    with pytest.raises(ValueError):
        skinny_linear(x[:1], w, config=(8, 32, 4, 1, 1), use_dot=True)  # BLOCK_N < 16


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_default_config_llama_shapes(m: int) -> None:
    """The GPU heuristic at the Llama-3.1-8B shapes: whole K tiles, >= 2 programs per SM,
    the accumulator budget on the CUDA-core path, tensor-core tiles >= 16 columns."""
    sms = 132
    for k, n in LLAMA_8B.values():
        bn, bk, warps, stages, split = default_config(m, n, k, sms)
        assert k % bk == 0 and (k // bk) % split == 0 and stages >= 3
        assert -(-n // bn) * split >= 2 * sms
        if default_use_dot(m):
            assert bn >= 16 and (bn == 64 or bn >= 2 * m)
        else:  # the fp32 accumulators fit the register budget; >= 3 programs per SM
            assert bn * bk * m <= skinny_gemm.ACC_REGS * 32 * warps
            assert -(-n // bn) >= 3 * sms
    assert all(c[0] >= 16 and c[1] >= 16 for c in SWEEP_DOT)
    assert len(SWEEP_FMA) == len(SWEEP_DOT) == 8


# ---- realistic shapes (GPU) ----

@gpu_only
@pytest.mark.parametrize("name", list(LLAMA_8B))
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_skinny_gpu_llama(name: str, m: int) -> None:
    k, n = LLAMA_8B[name]
    x, w, b = make(m, n, k, torch.bfloat16, name == "qkv")
    check(x, w, b)


@gpu_only
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_skinny_gpu_sweep(m: int) -> None:
    x, w, b = make(m, 6144, 4096, torch.float16, True)
    configs = skinny_gemm.sweep_configs(m)
    for cfg in configs:
        check(x, w, b, config=cfg)
    if m <= FMA_MAX_M:  # the other path
        use_dot = not default_use_dot(m)
        check(x, w, b, config=(SWEEP_DOT if use_dot else SWEEP_FMA)[0], use_dot=use_dot)


@gpu_only
@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 8])
def test_skinny_gpu_split_k(split: int, m: int) -> None:
    k, n = LLAMA_8B["down"]
    x, w, b = make(m, n, k, torch.bfloat16, True)
    bn = 16 if default_use_dot(m) else 8
    y = check(x, w, b, config=(bn, 256, 4, 3, split))
    assert torch.equal(y, skinny_linear(x, w, b, config=(bn, 256, 4, 3, split)))


@gpu_only
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("warm", [True, False])
def test_skinny_gpu_cuda_graph(m: int, warm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split-K inside a CUDA graph: replays see reset counters. Without an eager warm-up
    the counters are not allocated during capture (the call runs unsplit)."""
    k, n = LLAMA_8B["o_proj"]
    x, w, b = make(m, n, k, torch.bfloat16, True)
    cfg = (16, 256, 2, 3, 4) if default_use_dot(m) else (8, 512, 4, 3, 4)
    check(x, w, b, config=cfg)  # compiles the kernel
    if not warm:
        monkeypatch.setattr(skinny_gemm, "_COUNTERS", {})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if warm:
            skinny_linear(x, w, b, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w, b, config=cfg)
    assert warm == bool(skinny_gemm._COUNTERS)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = F.linear(x.double(), w.double(), b.double())
        assert_close(y, ref, tol_for(x.dtype))


kernels_env.run_in_subprocess_if_needed(globals())

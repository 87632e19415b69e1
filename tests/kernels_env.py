"""Test-harness setup for the Triton kernels; import it before anything imports
pdserve.kernels (tests/conftest.py does: `import kernels_env  # noqa: F401`).

Without CUDA, Triton kernels run on CPU through the interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated (when its module is imported), so:
- set TRITON_INTERPRET=1 here (only when CUDA is unavailable);
- if some pdserve.kernels module was imported earlier in compiled mode, reload it so its
  kernels are rebuilt by the interpreter (functions imported elsewhere look kernels up in
  the reloaded module's globals, so they follow);
- work around triton#9171: with numpy >= 2.4 the interpreter cannot use a scalar tensor
  as a `range` bound (int() of a size-1 array); patch its `__index__` to squeeze first.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_pdserve_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._pdserve_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def _rebuild_compiled_kernel_modules() -> None:
    import triton

    for name in sorted(n for n in sys.modules if n.startswith("pdserve.kernels.")):
        mod = sys.modules[name]
        if any(isinstance(v, triton.runtime.JITFunction) for v in vars(mod).values()):
            importlib.reload(mod)


if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()
    _rebuild_compiled_kernel_modules()


# ---- shared helpers of the kernel tests ----

def gpu_only(fn):
    """Marks a test `gpu` and skips it cleanly without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")(fn))

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# One bf16/fp16 rounding step: the interpreter truncates fp32 -> bf16 (GPUs round to nearest).
ULP = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element written (finite) and within tol (absolute and relative)."""
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    kv_cache: torch.Tensor  # [N, 2, bs, Hkv, D]; unused slots hold NaN
    block_tables: torch.Tensor  # [B, max_blocks] int32, random non-contiguous blocks, 0-padded
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens_cpu: list[int]
    qsl_cpu: list[int]


def paged_batch(seq_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, bs: int,
                dtype: torch.dtype, device: str = DEVICE, spare_blocks: int = 3) -> PagedBatch:
    """Random paged context: each sequence's blocks are a random subset of the pool. Slots
    past each seq_len and unowned blocks are NaN, so a kernel reading them poisons its output."""
    nblk = [(s + bs - 1) // bs for s in seq_lens]
    n = sum(nblk) + spare_blocks
    perm = torch.randperm(n).tolist()
    owned = torch.zeros(n, bs, dtype=torch.bool)  # slots inside some sequence's context
    tables = torch.zeros(len(seq_lens), max(nblk + [1]) + 1, dtype=torch.int32)
    for b, (s, nb) in enumerate(zip(seq_lens, nblk)):
        ids, perm = perm[:nb], perm[nb:]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        owned[ids] = (torch.arange(nb * bs) < s).view(nb, bs)
    cache = torch.randn(n, 2, bs, hkv, d).to(dtype)
    cache.masked_fill_(~owned[:, None, :, None, None], float("nan"))
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    q = torch.randn(qsl[-1], hq, d).to(dtype)
    return PagedBatch(q.to(device), cache.to(device), tables.to(device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      torch.tensor(qsl, dtype=torch.int32, device=device), list(seq_lens), qsl)

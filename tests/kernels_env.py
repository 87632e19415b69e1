"""Test-harness setup for the Triton kernels; import it before anything imports triton
(tests/conftest.py does: `import kernels_env  # noqa: F401`).

Without CUDA, Triton kernels run on CPU through the interpreter. Triton reads
TRITON_INTERPRET when a function is decorated with @triton.jit, and triton.language's own
helpers (tl.zeros, ...) are decorated when triton is first imported. So:
- set TRITON_INTERPRET=1 here, only when CUDA is unavailable;
- if triton was already imported in compiled mode (e.g. through torch._dynamo) before this
  module, the kernel tests cannot run in this process: run_in_subprocess_if_needed()
  replaces a test module's tests by one test that runs the module in a fresh interpreter;
- work around triton#9171: with numpy >= 2.4 the interpreter cannot use a scalar tensor
  as a `range` bound (int() of a size-1 array); patch its `__index__` to take element 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_TRITON_PREIMPORTED = "triton" in sys.modules
NEEDS_SUBPROCESS = (not HAS_CUDA and _TRITON_PREIMPORTED
                    and os.environ.get("TRITON_INTERPRET") != "1")

if not HAS_CUDA and not _TRITON_PREIMPORTED:
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


if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()


def run_in_subprocess_if_needed(module_globals: dict) -> None:
    """Call at the end of a kernel test module. When this process cannot interpret Triton
    (see above), swap the module's tests for one that runs the module in a subprocess."""
    if not NEEDS_SUBPROCESS:
        return
    path = module_globals["__file__"]
    for name in [n for n in module_globals if n.startswith("test_")]:
        del module_globals[name]

    def test_module_in_subprocess() -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                             env=env, cwd=os.path.dirname(path), capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]

    module_globals["test_module_in_subprocess"] = test_module_in_subprocess


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
    for b, (s, nb) in enumerate(zip(seq_lens, nblk, strict=True)):
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

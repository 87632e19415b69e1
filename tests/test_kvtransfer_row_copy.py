"""The bounded-grid row copy (kvtransfer/row_copy.py) against torch's index ops.

On CPU only the fallback runs: KVLayout keeps the torch index ops whatever copy_ctas says.
With CUDA and Triton, gather and scatter must equal index_select / index_copy_ bit for bit,
for row sizes that are and are not a multiple of the kernel's block, any grid size, and
through KVLayout's flat and per-layer paths.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer import row_copy
from pdserve.kvtransfer.pack import KVLayout, Rect


def test_cpu_layout_falls_back_to_torch_index_ops():
    pools = torch.zeros(3, 8, 2, 4, 2, 8).unbind(0)
    layout = KVLayout(list(pools), copy_ctas=32)
    assert layout.copy_ctas == 0
    assert not row_copy.available(torch.device("cpu"))


def _needs_triton_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not row_copy.available(torch.device("cuda")):
        pytest.skip("needs Triton")


@pytest.mark.gpu
@pytest.mark.parametrize("row_words,ctas", [(8192, 32), (8192, 1), (1000, 7), (3, 64)])
def test_gather_scatter_equal_torch(row_words, ctas):
    _needs_triton_cuda()
    g = torch.Generator(device="cuda").manual_seed(row_words + ctas)
    pool = torch.randint(-2**62, 2**62, (300, row_words), device="cuda", generator=g)
    idx = torch.randperm(300, device="cuda", generator=g)[:123]
    out = torch.empty(123, row_words, dtype=pool.dtype, device="cuda")
    row_copy.gather(pool, idx, out, ctas)
    assert torch.equal(out, pool.index_select(0, idx))
    dst, ref = torch.zeros_like(pool), torch.zeros_like(pool)
    row_copy.scatter(dst, idx, out, ctas)
    ref.index_copy_(0, idx, out)
    assert torch.equal(dst, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("flat", [True, False])
def test_layout_rect_round_trip_with_row_copy(flat):
    _needs_triton_cuda()
    L, N = 4, 64
    if flat:
        src = list(torch.randn(L, N, 2, 16, 2, 8, device="cuda").unbind(0))
        dst = list(torch.zeros(L, N, 2, 16, 2, 8, device="cuda").unbind(0))
    else:
        src = [torch.randn(N, 2, 16, 2, 8, device="cuda") for _ in range(L)]
        dst = [torch.zeros(N, 2, 16, 2, 8, device="cuda") for _ in range(L)]
    a, b = KVLayout(src, copy_ctas=16), KVLayout(dst, copy_ctas=16)
    assert a.copy_ctas == 16 and (a.flat is not None) == flat
    src_ids, dst_ids = torch.randperm(N)[:20].tolist(), torch.randperm(N)[:20].tolist()
    rect = Rect(1, 3, 5, 17)
    staging = torch.empty(rect.rows, a.row_words, dtype=a.word, device="cuda")
    a.gather(a.index(src_ids), rect, staging)
    b.scatter(b.index(dst_ids), rect, staging)
    torch.cuda.synchronize()
    for layer in range(rect.l0, rect.l1):
        for s, d in zip(src_ids[rect.b0:rect.b1], dst_ids[rect.b0:rect.b1]):
            assert torch.equal(dst[layer][d], src[layer][s])
    untouched = set(range(N)) - set(dst_ids[rect.b0:rect.b1])
    assert all(not dst[0][i].any() for i in untouched)  # layer 0 is outside the rect


@pytest.mark.gpu
@pytest.mark.parametrize("ctas", [5, 264])
def test_gather_scatter_at_an_offset_of_the_index(ctas):
    """A message's rows are a range of the request's index: the copy reads index[offset:
    offset + n_rows] and touches nothing else."""
    _needs_triton_cuda()
    g = torch.Generator(device="cuda").manual_seed(ctas)
    pool = torch.randint(-2**62, 2**62, (200, 64), device="cuda", generator=g)
    idx = torch.randperm(200, device="cuda", generator=g)[:90]
    out = torch.full((40, 64), 7, dtype=pool.dtype, device="cuda")
    row_copy.gather(pool, idx, out, ctas, offset=25, n_rows=30)
    assert torch.equal(out[:30], pool.index_select(0, idx[25:55]))
    assert bool((out[30:] == 7).all())
    dst = torch.zeros_like(pool)
    row_copy.scatter(dst, idx, out, ctas, offset=25, n_rows=30)
    touched = set(idx[25:55].tolist())
    assert torch.equal(dst[idx[25:55]], out[:30])
    assert all(not dst[i].any() for i in range(200) if i not in touched)


@pytest.mark.gpu
@pytest.mark.parametrize("rect", [Rect(0, 4, 0, 20), Rect(2, 3, 7, 13), Rect(1, 3, 5, 17)])
def test_layout_full_grid_equals_bounded_grid(rect):
    """The drain/fill grid (full_ctas) moves the same rows as the bounded one."""
    _needs_triton_cuda()
    L, N = 4, 64
    src = list(torch.randn(L, N, 2, 16, 2, 8, device="cuda").unbind(0))
    a = KVLayout(src, copy_ctas=16)
    assert a.full_ctas > a.copy_ctas
    ids = torch.randperm(N)[:20].tolist()
    index = a.index(ids)
    one = torch.empty(rect.rows, a.row_words, dtype=a.word, device="cuda")
    two = torch.empty_like(one)
    a.gather(index, rect, one)
    a.gather(index, rect, two, a.full_ctas)
    assert torch.equal(one, two)


@pytest.mark.gpu
@pytest.mark.parametrize("row_words", [96, 4096])
def test_copy_pairs_direct_launches_equal_torch(row_words):
    """copy_pairs launches its compiled kernel directly after the first call: every later
    call (other block counts, layer ranges, id offsets, grids) must still copy exactly
    the rows torch's index ops name, and nothing else."""
    _needs_triton_cuda()
    layers, blocks = 4, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    src = torch.randint(-2**31, 2**31 - 1, (layers * blocks, row_words), device="cuda",
                        dtype=torch.int64, generator=g)
    ids = torch.randperm(blocks, device="cuda", generator=g)
    for nb, l0, l1, ctas, off in [(5, 0, 4, 8, 0), (1, 2, 3, 1, 7), (16, 1, 4, 64, 3),
                                  (33, 0, 1, 132, 1), (64, 0, 4, 16, 0)]:
        dst = torch.zeros_like(src)
        sid = ids[:nb].contiguous()
        # ids at an odd element offset of their buffer (a ring slot's second array)
        did = (torch.arange(nb + off, device="cuda") % blocks)[off:]
        row_copy.copy_pairs(src, dst, sid, did, l0, l1, blocks, blocks, ctas)
        want = torch.zeros_like(src)
        lay = torch.arange(l0, l1, device="cuda")[:, None]
        want[(lay * blocks + did).view(-1)] = src[(lay * blocks + sid).view(-1)]
        assert torch.equal(dst, want), (nb, l0, l1, ctas, off)
    assert len(row_copy._PAIRS.kernels) >= 1  # later calls took the direct launch

"""kvtransfer/index_ring.py: per-request id slots, given back and reused; the general path
where a request does not fit. The slot logic runs on CPU tensors here; on GPU the pinned and
device halves are the same code (tests/test_kvtransfer_nccl.py moves real requests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.kvtransfer import index_ring
from pdserve.kvtransfer.index_ring import IndexRing


@pytest.fixture()
def ring(monkeypatch):
    real_empty = torch.empty

    def cpu_empty(*a, pin_memory=False, device=None, **kw):  # no CUDA here: both halves on CPU
        return real_empty(*a, **kw)
    monkeypatch.setattr(index_ring.torch, "empty", cpu_empty)
    return IndexRing(torch.device("cpu"), slot_elems=8, slots=2)


def test_slots_hold_their_ids_until_given_back(ring):
    a = ring.put([np.array([1, 2, 3]), np.array([7, 8, 9])])
    b = ring.put([np.array([4]), np.array([5])])
    assert [t.tolist() for t in a] == [[1, 2, 3], [7, 8, 9]] and ring.num_free == 0
    assert ring.put([np.array([6]), np.array([6])]) is None  # all taken: the general path
    ring.give_back(a[0])
    c = ring.put([np.array([10, 11]), np.array([12, 13])])
    assert [t.tolist() for t in c] == [[10, 11], [12, 13]]
    assert b[0].tolist() == [4] and b[1].tolist() == [5]  # another slot: untouched
    ring.give_back(b[0])
    ring.give_back(b[0])  # twice, or a tensor it never gave out: ignored
    ring.give_back(torch.zeros(1, dtype=torch.int64))
    assert ring.num_free == 1


def test_requests_larger_than_a_slot_or_empty_use_the_general_path(ring):
    assert ring.put([np.arange(5), np.arange(5)]) is None  # 10 ids > 8
    assert ring.put([np.arange(0), np.arange(0)]) is None
    assert ring.num_free == 2

"""Device memory for peer copies' block ids, taken and given back per request.

A request's ids go into a pinned slot and, with ONE copy on the caller's stream (the
progress thread's copy stream, where the request's copy kernels run after it), into the
device slot of the same number. No allocation, no event, no synchronization: a slot is
given back only when its request ended, when every copy of it (and so the upload before
them, on the same stream) has completed, so the next upload into that slot, or into its
pinned twin, can never overtake a reader. On the progress thread of a loaded host, the
general path (KVLayout._to_device: a fresh device tensor, an event, a side stream) cost
about 0.28 ms of CPU per request; this is a numpy copy and one torch call.

Requests larger than a slot, or arriving while every slot is taken, use the general path.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_into(host: np.ndarray, arrays: list[np.ndarray]) -> None:
    """The arrays one after another, flattened, at the start of `host`."""
    pos = 0
    for a in arrays:
        host[pos:pos + a.size] = a.reshape(-1)
        pos += a.size


def unpack(dev: torch.Tensor, arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """Views of `dev` (what pack_into laid out) in the arrays' shapes."""
    out, pos = [], 0
    for a in arrays:
        out.append(dev[pos:pos + a.size].view(a.shape))
        pos += a.size
    return out


class IndexRing:
    """`slots` slots of `slot_elems` int64 each, in pinned host memory and on `device`."""

    def __init__(self, device: torch.device, slot_elems: int, slots: int = 64) -> None:
        self.slot_elems = slot_elems
        self._host = torch.empty(slots * slot_elems, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(slots * slot_elems, dtype=torch.int64, device=device)
        self._free = list(range(slots - 1, -1, -1))
        self._by_ptr: dict[int, int] = {}  # data_ptr of a slot's first tensor -> slot

    @property
    def num_free(self) -> int:
        return len(self._free)

    def put(self, arrays: list[np.ndarray]) -> list[torch.Tensor] | None:
        """The arrays on the device (views of one slot, uploaded on the current stream),
        or None when they do not fit a slot or none is free."""
        n = sum(a.size for a in arrays)
        if n > self.slot_elems or not self._free or n == 0:
            return None
        slot = self._free.pop()
        lo = slot * self.slot_elems
        pack_into(self._host_np[lo:lo + n], arrays)
        dev = self._dev[lo:lo + n]
        dev.copy_(self._host[lo:lo + n], non_blocking=True)
        out = unpack(dev, arrays)
        self._by_ptr[out[0].data_ptr()] = slot
        return out

    def give_back(self, first: torch.Tensor | None) -> None:
        """The request that put() `first` (its first tensor) ended: its copies completed.
        Anything else (None, a tensor of the general path) is ignored."""
        if first is not None:
            slot = self._by_ptr.pop(first.data_ptr(), None)
            if slot is not None:
                self._free.append(slot)

"""Block pack/unpack between the paged KV pool and contiguous staging buffers.

A message covers a rectangle of one request's blocks: layers [l0, l1) x the request's block
positions [b0, b1); staging holds it layer-major, one row per (layer, block), a row being
one block's K and V of one layer (contiguous in the pool). Rows are moved as machine words
(int64 where the row size allows), so any KV dtype packs the same way.

When all layers live in one allocation at a constant stride (e.g. the per-layer tensors are
`torch.empty(L, N, ...).unbind(0)`), the pool is seen as one [L * N, W] matrix and a message
of any number of layers is ONE copy: a bounded-grid Triton kernel on CUDA when `copy_ctas`
> 0 (row_copy.py: it leaves SMs to the backend's kernels), else index_select (gather) or
index_copy_ (scatter). Otherwise it is one call per layer of the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import row_copy
from .common import KVGeometry
from .index_ring import IndexRing, pack_into, unpack


def _word_dtype(row_nbytes: int) -> torch.dtype:
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_nbytes % size == 0:
            return dt
    return torch.uint8


def ids_to_bytes(ids: np.ndarray) -> bytes:
    """Block ids on the wire: little-endian uint32 each (ids are checked non-negative and
    below 2**32 before), so a peer checks and compares them without a Python loop."""
    return ids.astype("<u4").tobytes()


@dataclass(frozen=True, slots=True)
class Rect:
    """Layers [l0, l1) x request block positions [b0, b1)."""

    l0: int
    l1: int
    b0: int
    b1: int

    @property
    def rows(self) -> int:
        return (self.l1 - self.l0) * (self.b1 - self.b0)


class KVLayout:
    """Word views of a KV pool and the gather/scatter of message rectangles."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], copy_ctas: int = 0,
                 solo_copy_ctas: int = -1) -> None:
        self.geometry = KVGeometry.from_kv_caches(kv_caches)
        t0 = kv_caches[0]
        for i, t in enumerate(kv_caches):
            if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
                raise ValueError(f"KV layer {i} differs from layer 0 in shape, dtype or device")
            if not t.is_contiguous():
                raise ValueError(f"KV layer {i} is not contiguous")
        self.device = t0.device
        # thread blocks of the row-copy kernel (0 or no Triton: torch index ops)
        self.copy_ctas = copy_ctas if row_copy.available(self.device) else 0
        # the row copy's grid when no transfer kernel competes for SMs (a pipeline's fill or
        # drain): by default two programs per SM, the copy's fastest (transfer_micro.py)
        if not self.copy_ctas:
            self.full_ctas = 0
        elif solo_copy_ctas < 0:
            self.full_ctas = 2 * torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            self.full_ctas = solo_copy_ctas or self.copy_ctas
        self.num_blocks = int(t0.shape[0])
        self.row_nbytes = self.geometry.block_nbytes
        self.word = _word_dtype(self.row_nbytes)
        self.row_words = self.row_nbytes // torch.empty((), dtype=self.word).element_size()
        # [N, W] per layer, same memory as the pool
        self.layers = [t.view(self.num_blocks, -1).view(self.word) for t in kv_caches]
        self.flat = self._flat_view(kv_caches)  # [L * N, W] or None
        # index(): the [L, nb] flat rows (or [nb] ids) are formed in numpy into one
        # persistent pinned buffer and copied once: no allocation, no torch op but the copy
        self._layer_base = np.arange(len(kv_caches), dtype=np.int64)[:, None] * self.num_blocks
        self.ring: IndexRing | None = None
        if self.device.type == "cuda":
            # index(): [L, nb] rows (flat) or nb ids; index_pair(): 2 x nb ids (flat only)
            rows = max(2, len(kv_caches)) if self.flat is not None else 1
            self._pinned = torch.empty(rows * self.num_blocks, dtype=torch.int64, pin_memory=True)
            self._pinned_free: torch.cuda.Event | None = None  # the last copy out of it
            # those copies' own stream: one never waits behind a row copy queued before it
            self._h2d = torch.cuda.Stream(self.device)
            # index_pair()'s ids, per request, up to 4096 blocks (64k tokens of 16)
            self.ring = IndexRing(self.device, 2 * min(self.num_blocks, 4096)) \
                if self.flat is not None else None

    def _flat_view(self, kv: Sequence[torch.Tensor]) -> torch.Tensor | None:
        layer_nbytes = self.num_blocks * self.row_nbytes
        base = kv[0].data_ptr()
        storage = kv[0].untyped_storage().data_ptr()
        for i, t in enumerate(kv):
            if t.untyped_storage().data_ptr() != storage or t.data_ptr() != base + i * layer_nbytes:
                return None
        n = len(kv) * self.num_blocks
        if n * self.row_nbytes > kv[0].untyped_storage().nbytes() - (base - storage):
            return None
        return torch.as_strided(self.layers[0], (n, self.row_words), (self.row_words, 1))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_block_ids(self, block_ids: Sequence[int], what: str,
                        limit: int | None = None) -> np.ndarray:
        """block_ids as one int64 array (requests have thousands of blocks: numpy, never a
        Python loop); ValueError naming the first bad ones if any lies outside [0, limit)
        (default: this pool)."""
        limit = self.num_blocks if limit is None else limit
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= limit):  # two reductions, no temporaries
            bad = ids[(ids < 0) | (ids >= limit)]
            raise ValueError(f"{what} block ids out of range [0, {limit}): {bad[:8].tolist()}")
        return ids

    def index(self, block_ids: Sequence[int], stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Device index for a request: [L, nb] flat rows, or [nb] block ids (per-layer path).

        On CUDA the copy runs on its own stream and `stream` (the caller's stream if None)
        waits for it; the host work is one numpy add into pinned memory, whatever the
        request's size."""
        ids = np.asarray(block_ids, dtype=np.int64)
        if len(ids) > self.num_blocks:
            raise ValueError(f"{len(ids)} block ids for a pool of {self.num_blocks} blocks")
        if self.flat is None:
            return self._to_device([ids], stream)[0]
        return self._to_device([self._layer_base + ids], stream)[0]

    def index_pair(self, src: Sequence[int], dst: Sequence[int],
                   stream: torch.cuda.Stream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A peer copy's block ids, src in this pool and dst in the peer's, as two [nb]
        int64 tensors on this device (one H2D copy); rows are formed in the copy kernel.

        On CUDA, with `stream` the current one (the progress thread's copy stream), they
        come from the index ring when they fit: give them back with release(src_ids) once
        the request's copies completed."""
        assert self.flat is not None, "a peer copy needs a flat pool"
        s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        if len(s) > self.num_blocks or len(d) != len(s):
            raise ValueError(f"{len(s)} source and {len(d)} destination block ids for a pool "
                             f"of {self.num_blocks} blocks")
        if self.ring is not None and (stream is None
                                      or stream == torch.cuda.current_stream(self.device)):
            got = self.ring.put([s, d])
            if got is not None:
                return got[0], got[1]
        si, di = self._to_device([s, d], stream)
        return si, di

    def release(self, src_ids: torch.Tensor | None) -> None:
        """The request of index_pair()'s src_ids ended and no copy of it runs any more."""
        if self.ring is not None:
            self.ring.give_back(src_ids)

    def _to_device(self, arrays: list[np.ndarray], stream: torch.cuda.Stream | None
                   ) -> list[torch.Tensor]:
        """The arrays as int64 tensors on the pool's device (one copy on CUDA)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if self._pinned_free is not None:
            self._pinned_free.synchronize()  # the previous index copy: alone on its stream
        host = self._pinned[: sum(a.size for a in arrays)]
        pack_into(host.numpy(), arrays)
        with torch.cuda.stream(self._h2d):
            dev = host.to(self.device, non_blocking=True)
            self._pinned_free = torch.cuda.Event()
            self._pinned_free.record()
        user = stream if stream is not None else torch.cuda.current_stream(self.device)
        user.wait_event(self._pinned_free)  # what `user` runs from now on sees the index
        dev.record_stream(user)  # and its memory is not reused before that work ends
        return unpack(dev, arrays)

    def peer_copy(self, src_ids: torch.Tensor, dst_ids: torch.Tensor, dst: torch.Tensor,
                  dst_blocks: int, l0: int, l1: int, ctas: int | None = None) -> None:
        """Layers [l0, l1) of a request from this pool into `dst`, a peer's flat pool of
        dst_blocks blocks a layer as open_pool() mapped it; ids from index_pair()."""
        if self.copy_ctas:
            row_copy.copy_pairs(self.flat, dst, src_ids, dst_ids, l0, l1, self.num_blocks,
                                dst_blocks, ctas or self.full_ctas)
            return
        layers = torch.arange(l0, l1, device=src_ids.device)[:, None]
        rows = self.flat.index_select(0, (layers * self.num_blocks + src_ids).view(-1))
        d_rows = (layers * dst_blocks + dst_ids).view(-1)
        dst.index_copy_(0, d_rows.to(dst.device), rows.to(dst.device))

    def gather(self, index: torch.Tensor, rect: Rect, out: torch.Tensor,
               ctas: int | None = None) -> None:
        """out[rows of rect] = pool rows (out: [rect.rows, W] staging view). ctas: thread
        blocks of the row copy (default copy_ctas; full_ctas when nothing else runs)."""
        self._copy(index, rect, out, ctas, gather=True)

    def scatter(self, index: torch.Tensor, rect: Rect, src: torch.Tensor,
                ctas: int | None = None) -> None:
        """Pool rows of rect = src ([rect.rows, W] staging view)."""
        self._copy(index, rect, src, ctas, gather=False)

    def _copy(self, index: torch.Tensor, rect: Rect, buf: torch.Tensor, ctas: int | None,
              gather: bool) -> None:
        ctas = self.copy_ctas if ctas is None or not self.copy_ctas else ctas
        n = rect.b1 - rect.b0
        if self.flat is not None:
            # whole layers, or a piece of one layer (all next_rect cuts): the rect's rows are
            # one range of the [L, nb] index, so one copy takes an offset, no sliced tensor
            nb = index.shape[1]
            if rect.l1 - rect.l0 == 1 or n == nb:
                self._rows(self.flat, index, rect.l0 * nb + rect.b0, rect.rows, buf, ctas, gather)
                return
            for k, layer in enumerate(range(rect.l0, rect.l1)):
                self._rows(self.flat, index, layer * nb + rect.b0, n, buf[k * n:(k + 1) * n],
                           ctas, gather)
            return
        for k, layer in enumerate(range(rect.l0, rect.l1)):
            self._rows(self.layers[layer], index, rect.b0, n, buf[k * n:(k + 1) * n], ctas,
                       gather)

    @staticmethod
    def _rows(pool: torch.Tensor, index: torch.Tensor, off: int, n: int, buf: torch.Tensor,
              ctas: int, gather: bool) -> None:
        if ctas:
            (row_copy.gather if gather else row_copy.scatter)(pool, index, buf, ctas, off, n)
            return
        rows = index.view(-1)[off:off + n]
        if gather:
            torch.index_select(pool, 0, rows, out=buf)
        else:
            pool.index_copy_(0, rows, buf)


class StagingPool:
    """Fixed set of [rows, W] buffers, each holding up to `rows` pool rows (one message)."""

    def __init__(self, layout: KVLayout, nbytes: int, num_buffers: int) -> None:
        self.rows = nbytes // layout.row_nbytes
        if self.rows < 1:
            raise ValueError(f"staging buffer of {nbytes} bytes is smaller than one block "
                             f"({layout.row_nbytes} bytes)")
        pin = layout.device.type == "cpu" and torch.cuda.is_available()
        self._bufs = [torch.empty((self.rows, layout.row_words), dtype=layout.word,
                                  device=layout.device, pin_memory=pin)
                      for _ in range(num_buffers)]
        self._free = list(range(num_buffers))

    @property
    def total(self) -> int:
        return len(self._bufs)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, i: int) -> None:
        assert i not in self._free, f"staging buffer {i} released twice"
        self._free.append(i)

    def view(self, i: int, rows: int) -> torch.Tensor:
        return self._bufs[i][:rows]


def next_rect(num_layers: int, num_blocks: int, layer_pos: int, block_pos: int,
              ready_layers: int, max_rows: int, min_rows: int, k: int) -> Rect | None:
    """The next message of a request, or None when nothing is ready.

    layer_pos/block_pos: first row not yet sent; ready_layers: layers [0, ready) are ready.
    Whole layers are grouped while they fit in max_rows; a layer larger than that is split
    by blocks into equal pieces. Group sizes grow x2 from min_rows (short pipeline fill) and
    shrink again towards the end (short drain: the last scatter is what nobody overlaps).
    """
    if layer_pos >= num_layers or layer_pos >= ready_layers or num_blocks == 0:
        return None
    if num_blocks > max_rows:  # split a layer into equal pieces of <= max_rows blocks
        pieces = -(-num_blocks // max_rows)
        size = -(-num_blocks // pieces)
        return Rect(layer_pos, layer_pos + 1, block_pos, min(num_blocks, block_pos + size))
    cap = max(1, max_rows // num_blocks)
    lo = max(1, min(cap, -(-min_rows // num_blocks)))
    size = min(cap, lo << min(k, 30))
    remaining = num_layers - layer_pos
    if remaining < 2 * size:
        size = max(lo, -(-remaining // 2))
    if remaining - size < lo:
        size = remaining
    size = min(size, cap, ready_layers - layer_pos)
    return Rect(layer_pos, layer_pos + size, 0, num_blocks)

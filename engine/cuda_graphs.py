"""CUDA graphs for decode-only steps, captured at start-up for a ladder of padded batch sizes.

A step whose chunks all carry exactly one token (decode, or a 1-token prefill tail) and
whose batch fits the largest captured size is padded up to the next captured size and
replayed over static input buffers. Padding rows write their K/V into a scratch block
(`pad_block`, one block past the scheduler's pool; see model_runner.allocate_kv_caches)
and attend over that one slot (seq_len 1), so they never touch a real block.

Everything a graph reads lives in the static buffers below; host-side metadata fields are
fixed at capture (max_seq_len = max_model_len, so the decode kernel's split count and grid
are static). Only graph-safe attention backends qualify: the torch reference loops over
host lists, so it always runs eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pdserve.engine.scheduler import ScheduledChunk
from pdserve.kernels.attention import AttentionBackend, AttentionMetadata

DEFAULT_CAPTURE_SIZES: tuple[int, ...] = (1, 2, 4, 8, *range(16, 257, 8))  # 1..256
GRAPH_SAFE_BACKENDS = frozenset({"triton"})  # decode path without host syncs


def capture_sizes(max_num_seqs: int, ladder: tuple[int, ...] = DEFAULT_CAPTURE_SIZES) -> list[int]:
    """Ladder sizes below max_num_seqs plus the first one reaching it (capped at the ladder)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    i = bisect.bisect_left(ladder, max_num_seqs)
    return list(ladder[: min(i + 1, len(ladder))])


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """Smallest captured size >= n, or None when n exceeds them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def capture_ladder(sizes: list[int], forward: Callable[[int], torch.Tensor],
                   device: torch.device, what: str, progress: bool = True
                   ) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph of forward(size) per size, largest first, all sharing one memory pool,
    each after an eager warm-up (compiles kernels, creates cuBLAS workspaces); returns the
    graphs and their static outputs by size.

    The capture stream is made on `device`: torch.cuda.graph's default stream is created
    once per process on whatever device was current then, and Triton launches on the
    capture stream's device."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = None
    stream = torch.cuda.Stream(device)
    for size in tqdm(sorted(sizes, reverse=True), desc=f"capturing {what} CUDA graphs",
                     disable=not progress, leave=False):
        forward(size)  # warm-up
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs


def graphs_unsupported(device: torch.device, attn: AttentionBackend) -> str | None:
    """Why decode graphs cannot be used here, or None when they can."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if attn.name not in GRAPH_SAFE_BACKENDS:
        return f"attention backend {attn.name!r} is not graph-safe (use one of {sorted(GRAPH_SAFE_BACKENDS)})"
    return None


@dataclass(slots=True)
class PaddedDecodeInputs:
    """Host arrays of one decode batch padded to `size` rows (rows >= num_real are padding)."""

    input_ids: np.ndarray  # [size] int64
    positions: np.ndarray  # [size] int64
    slot_mapping: np.ndarray  # [size] int64
    seq_lens: np.ndarray  # [size] int32
    block_tables: np.ndarray  # [size, width] int32 (a view); padding rows start with pad_block
    num_real: int


class BlockTableStaging:
    """Host block tables of padded decode batches, in one persistent array [rows, width].

    Row i remembers (seq_id, block_table_id, length) of the table it holds. A sequence's
    table with the same id only ever grows (Sequence.block_table_id), so a step that keeps
    a sequence on its row converts only the new tail instead of the whole table: in steady
    decoding that is nothing, or one block every block_size steps. Entries past a row's
    length may be stale; attention reads only the pages below each seq_len.
    """

    def __init__(self, rows: int, width: int, pin: bool = False) -> None:
        self.host = torch.zeros((rows, width), dtype=torch.int32, pin_memory=pin)
        self.array = self.host.numpy()
        self._keys: list[tuple[str, int, int] | None] = [None] * rows

    def fill(self, chunks: list[ScheduledChunk], size: int, pad_block: int) -> int:
        """Rows 0..len(chunks)-1 hold the chunks' tables, rows up to `size` start with
        pad_block; returns the width in use (the longest table, at least 1)."""
        a, keys, width = self.array, self._keys, 1
        for i, c in enumerate(chunks):
            n, tid, key = len(c.block_ids), c.block_table_id, keys[i]
            width = max(width, n)
            if tid >= 0 and key is not None and key[0] == c.seq_id and key[1] == tid and key[2] <= n:
                if key[2] < n:
                    a[i, key[2]:n] = c.block_ids[key[2]:]
            else:
                a[i, :n] = c.block_ids
            keys[i] = (c.seq_id, tid, n)
        for i in range(len(chunks), size):
            a[i, 0] = pad_block
            keys[i] = None
        return width


def pad_decode_batch(chunks: list[ScheduledChunk], size: int, block_size: int,
                     pad_block: int, tables: BlockTableStaging | None = None) -> PaddedDecodeInputs:
    """Flatten 1-token chunks into `size` rows; padding rows: token 0 at position 0, stored
    at slot pad_block * block_size, attending over that single slot (seq_len 1). Block
    tables go to `tables` (persistent across steps) or to a fresh array."""
    n = len(chunks)
    assert n <= size, f"{n} chunks do not fit a padded batch of {size}"
    assert all(c.num_tokens == 1 for c in chunks), "decode graphs take 1-token chunks only"
    if tables is None:
        tables = BlockTableStaging(size, max([1] + [len(c.block_ids) for c in chunks]))
    width = tables.fill(chunks, size, pad_block)
    pos = np.zeros(size, np.int64)
    pos[:n] = np.fromiter((c.start_pos for c in chunks), np.int64, n)
    ids = np.zeros(size, np.int64)
    ids[:n] = np.fromiter((c.token_ids[0] for c in chunks), np.int64, n)
    tables = tables.array[:size, :width]
    slots = np.full(size, pad_block * block_size, np.int64)
    real_blocks = tables[np.arange(n), pos[:n] // block_size].astype(np.int64)
    slots[:n] = real_blocks * block_size + pos[:n] % block_size
    seq_lens = np.ones(size, np.int32)
    seq_lens[:n] = pos[:n] + 1
    return PaddedDecodeInputs(ids, pos, slots, seq_lens, tables, n)


class DecodeGraphs:
    """Static buffers, per-size metadata views and (on CUDA) one captured graph per size.

    With use_cuda_graph=False, `run` executes the same forward over the same static
    buffers eagerly: the CPU tests exercise padding and buffer handling that way.
    """

    def __init__(self, model: torch.nn.Module, attn: AttentionBackend,
                 kv_caches: list[torch.Tensor], block_size: int, pad_block: int,
                 sizes: list[int], max_model_len: int, device: torch.device,
                 use_cuda_graph: bool = True) -> None:
        assert sizes == sorted(sizes) and sizes, "capture sizes must be sorted, non-empty"
        assert kv_caches[0].shape[0] > pad_block, "the pool has no scratch block at pad_block"
        self.model, self.attn, self.kv_caches = model, attn, kv_caches
        self.block_size, self.pad_block = block_size, pad_block
        self.sizes, self.max_model_len, self.device = list(sizes), max_model_len, device
        self.use_cuda_graph = use_cuda_graph
        self.max_bs = sizes[-1]
        self.max_blocks = -(-max_model_len // block_size) + 1  # +1: a reserved extra block
        dev, mb = device, self.max_bs
        # ids | positions | slots share one buffer (one host-to-device copy per step)
        self._i64 = torch.zeros(3 * mb, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self._i64.view(3, mb).unbind(0)
        self.slot_mapping.fill_(pad_block * block_size)
        self.seq_lens = torch.ones(mb, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((mb, self.max_blocks), pad_block, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(mb + 1, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._host_i64 = torch.empty(3 * mb, dtype=torch.int64, pin_memory=pin)  # ids|pos|slots
        self._host_i64.copy_(self._i64)  # rows past a batch are copied too: keep them valid
        self._host_lens = torch.ones(mb, dtype=torch.int32, pin_memory=pin)
        self._tables = BlockTableStaging(mb, self.max_blocks, pin)
        self._copied = torch.cuda.Event() if pin else None  # host staging free once it fires
        self.metas = {bs: self._meta(bs) for bs in sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> static hidden [size, H]
        self.num_runs = 0  # steps served (stats and tests)

    def _meta(self, bs: int) -> AttentionMetadata:
        # Host fields are capture-time bounds, not this batch's values: graph-safe backends
        # read lengths from the device tensors only.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[self.max_model_len] * bs, block_size=self.block_size)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches,
                          self.metas[bs], self.attn)

    # ---- start-up -------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture one graph per size (capture_ladder)."""
        if self.use_cuda_graph:
            self.graphs, self.outputs = capture_ladder(self.sizes, self._forward, self.device,
                                                       "decode", progress)

    # ---- steps ----------------------------------------------------------------------------
    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        return (0 < len(chunks) <= self.max_bs
                and all(c.num_tokens == 1 and len(c.block_ids) <= self.max_blocks
                        and c.start_pos < self.max_model_len for c in chunks))

    def run(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [len(chunks), H] of a decode batch (can_run must hold). The
        result is a view of a static output: use it before the next run. input_ids: [n]
        device tensor that replaces the chunks' token ids (overlap: the previous step's
        sampled tokens), copied device-to-device after the host inputs."""
        bs = bucket_for(len(chunks), self.sizes)
        assert bs is not None
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        self._load(pad_decode_batch(chunks, bs, self.block_size, self.pad_block, self._tables))
        if input_ids is not None:
            self.input_ids[: len(chunks)].copy_(input_ids)
        self.num_runs += 1
        if self.use_cuda_graph:
            self.graphs[bs].replay()
            out = self.outputs[bs]
        else:
            out = self._forward(bs)
        return out[: len(chunks)]

    def _load(self, b: PaddedDecodeInputs) -> None:
        """Copy a padded batch into the static buffers (pinned host staging, async H2D)."""
        bs, width, mb = len(b.seq_lens), b.block_tables.shape[1], self.max_bs
        h64 = self._host_i64.numpy()
        h64[:bs], h64[mb:mb + bs], h64[2 * mb:2 * mb + bs] = b.input_ids, b.positions, b.slot_mapping
        self._host_lens.numpy()[:bs] = b.seq_lens
        nb = self.device.type == "cuda"
        self._i64.copy_(self._host_i64, non_blocking=nb)  # 3 x max_bs int64: a few KiB
        self.seq_lens[:bs].copy_(self._host_lens[:bs], non_blocking=nb)
        # b.block_tables is a view of the pinned staging: one 2-D copy of [bs, width]
        self.block_tables[:bs, :width].copy_(self._tables.host[:bs, :width], non_blocking=nb)
        if self._copied is not None:
            self._copied.record()

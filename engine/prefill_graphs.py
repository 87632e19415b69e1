"""CUDA graphs for short prefills: one prompt chunk of up to a few hundred tokens, padded to
the next captured token count and replayed over static buffers.

Why: an eager forward launches every layer's kernels from Python, and for a short prompt
the host launches them slower than the GPU runs them. The forward's time then follows the
host (which core, what other threads want the GIL): in `bench ttft` a 512-token prefill
took 17.6 to 24.7 ms in one process and another on the same GPU. Replaying a graph makes it
one launch. vLLM captures piecewise graphs over token counts for the same reason.

What qualifies (`can_run`): a step of exactly one chunk of 2..max(sizes) tokens (1-token
chunks are the decode graphs' job) with no layer hook. The chunk may continue a cached
prefix (start_pos > 0): the kernels read the context through the block table. Padding rows
past the prompt store nothing (slot -1) and the prefill kernel's query rows stop at the
chunk's length (query_start_loc holds the real one), so they attend to nothing real and
nothing reads their output; a row's hidden state depends on its own row only elsewhere
(GEMMs, norms, rope), so the real rows equal an eager forward's.

Host fields of the metadata are capture-time bounds (max_query_len = the size, max_seq_len =
max_model_len): the triton backend reads lengths from the device tensors only.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from pdserve.engine.cuda_graphs import capture_ladder
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.kernels.attention import AttentionBackend, AttentionMetadata


class PrefillGraphs:
    """Static buffers, per-size metadata and (on CUDA) one graph per token count.

    With use_cuda_graph=False, `run` executes the same forward over the same static buffers
    eagerly (the CPU tests exercise padding and buffers that way)."""

    def __init__(self, model: torch.nn.Module, attn: AttentionBackend,
                 kv_caches: list[torch.Tensor], block_size: int, sizes: list[int],
                 max_model_len: int, device: torch.device, use_cuda_graph: bool = True) -> None:
        if not sizes or sizes != sorted(sizes) or sizes[0] < 2:
            raise ValueError(f"prefill graph sizes must be sorted and >= 2, got {sizes}")
        self.model, self.attn, self.kv_caches = model, attn, kv_caches
        self.block_size, self.sizes = block_size, list(sizes)
        self.max_model_len, self.device, self.use_cuda_graph = max_model_len, device, use_cuda_graph
        self.max_tokens = sizes[-1]
        self.max_blocks = -(-max_model_len // block_size) + 1
        dev, mt = device, self.max_tokens
        # ids | positions | slots in one buffer, seq_len | q_len in another: 3 H2D copies a step
        self._i64 = torch.zeros(3 * mt, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self._i64.view(3, mt).unbind(0)
        self.slot_mapping.fill_(-1)
        self._i32 = torch.zeros(3, dtype=torch.int32, device=dev)  # seq_len, 0, q_len
        self.seq_lens, self.query_start_loc = self._i32[0:1], self._i32[1:3]
        self.block_tables = torch.zeros((1, self.max_blocks), dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._host_i64 = torch.empty(3 * mt, dtype=torch.int64, pin_memory=pin)
        self._host_i64.copy_(self._i64)
        self._host_i32 = torch.zeros(3, dtype=torch.int32, pin_memory=pin)
        self._host_table = torch.zeros((1, self.max_blocks), dtype=torch.int32, pin_memory=pin)
        self._copied = torch.cuda.Event() if pin else None  # host staging free once it fires
        self.metas = {t: self._meta(t) for t in sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> static hidden [size, H]
        self.num_runs = 0

    def _meta(self, t: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:t], query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, block_tables=self.block_tables, max_query_len=t,
            max_seq_len=self.max_model_len, query_start_loc_cpu=[0, t],
            seq_lens_cpu=[self.max_model_len], block_size=self.block_size)

    def _forward(self, t: int) -> torch.Tensor:
        return self.model(self.input_ids[:t], self.positions[:t], self.kv_caches,
                          self.metas[t], self.attn)

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """One graph per size (cuda_graphs.capture_ladder), warmed up and captured over a
        one-token prompt that stores nothing (every slot is -1)."""
        if not self.use_cuda_graph:
            return
        self._i32.copy_(torch.tensor([1, 0, 1], dtype=torch.int32))
        self.graphs, self.outputs = capture_ladder(self.sizes, self._forward, self.device,
                                                   "prefill", progress)

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        if len(chunks) != 1:
            return False
        c = chunks[0]
        return (2 <= c.num_tokens <= self.max_tokens and len(c.block_ids) <= self.max_blocks
                and c.start_pos + c.num_tokens <= self.max_model_len)

    def run(self, chunk: ScheduledChunk) -> torch.Tensor:
        """Final hidden states [n, H] of the chunk's n tokens (can_run must hold): a view of
        a static output, to use before the next run."""
        n = chunk.num_tokens
        t = self.sizes[bisect.bisect_left(self.sizes, n)]
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        self._load(chunk, n)
        self.num_runs += 1
        if self.use_cuda_graph:
            self.graphs[t].replay()
            out = self.outputs[t]
        else:
            out = self._forward(t)
        return out[:n]

    def _load(self, c: ScheduledChunk, n: int) -> None:
        mt, bs = self.max_tokens, self.block_size
        h64 = self._host_i64.numpy()
        pos = np.arange(c.start_pos, c.start_pos + n, dtype=np.int64)
        blocks = np.asarray(c.block_ids, dtype=np.int64)
        h64[:n] = c.token_ids
        h64[mt:mt + n] = pos
        h64[2 * mt:2 * mt + n] = blocks[pos // bs] * bs + pos % bs
        h64[n:mt], h64[mt + n:2 * mt], h64[2 * mt + n:] = 0, 0, -1  # padding: store nothing
        self._host_i32.numpy()[:] = (c.start_pos + n, 0, n)
        self._host_table.numpy()[0, :len(blocks)] = blocks
        nb = self.device.type == "cuda"
        self._i64.copy_(self._host_i64, non_blocking=nb)
        self._i32.copy_(self._host_i32, non_blocking=nb)
        width = max(1, len(blocks))
        self.block_tables[:, :width].copy_(self._host_table[:, :width], non_blocking=nb)
        if self._copied is not None:
            self._copied.record()


def graph_sizes(tokens: tuple[int, ...], max_num_batched_tokens: int) -> list[int]:
    """The configured token counts a step can reach (at most the step's token budget)."""
    return sorted({t for t in tokens if 2 <= t <= max_num_batched_tokens})

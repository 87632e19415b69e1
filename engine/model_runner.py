"""Turns a SchedulerOutput into tensors, runs the model, samples. Never sees Sequence objects.

Decode-only steps replay a CUDA graph (engine/cuda_graphs.py) when `capture_cuda_graphs`
ran at start-up; every other step, and any step with a layer_hook, runs eagerly.

`launch` queues a step and returns at once (engine/async_output.py): greedy tokens stay on
the device, and a step whose inputs come from the previous one (overlap scheduling) reads
them from that step's device tensor. `execute` is launch + wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.async_output import LaunchedStep
from pdserve.engine.config import CacheConfig, ModelConfig
from pdserve.engine.cuda_graphs import DecodeGraphs, capture_sizes, graphs_unsupported
from pdserve.engine.layers import set_fused_kernels
from pdserve.engine.prefill_graphs import PrefillGraphs
from pdserve.engine.sampler import Sampler, SamplerOutput, TokenLogprobs, wants_logprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kernels.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

NUM_PAD_BLOCKS = 1  # scratch block(s) past the scheduler's pool: padded graph rows write there

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_block_bytes(mcfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers (K and V)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return mcfg.kv_bytes_per_token(elem) * block_size


def decide_num_blocks(mcfg: ModelConfig, ccfg: CacheConfig, dtype: torch.dtype, device: str) -> int:
    """Explicit count, else a fraction of free device memory (CUDA) or the CPU default."""
    if ccfg.num_blocks is not None:
        return ccfg.num_blocks
    if not device.startswith("cuda"):
        return ccfg.cpu_num_blocks
    free_bytes, total_bytes = torch.cuda.mem_get_info(torch.device(device))
    # Keep (1 - fraction) of the whole card for activations and everything else.
    budget = free_bytes - (1.0 - ccfg.memory_fraction) * total_bytes
    n = int(budget // kv_block_bytes(mcfg, ccfg.block_size, dtype)) - NUM_PAD_BLOCKS
    if n < 1:
        raise RuntimeError(f"no device memory left for the KV cache on {device} "
                           f"(free {free_bytes / 2**30:.1f} GiB); lower the model size or memory use")
    return n


def allocate_kv_caches(mcfg: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """One [num_blocks + 1, 2, block_size, Hkv, D] tensor per layer. Blocks 0..num_blocks-1
    are the scheduler's; block `num_blocks` is scratch that CUDA-graph padding rows write."""
    shape = (num_blocks + NUM_PAD_BLOCKS, 2, block_size, mcfg.num_kv_heads, mcfg.head_dim)
    # One allocation for all layers: a multi-layer gather for transfer is one index_select.
    pool = torch.zeros((mcfg.num_layers, *shape), dtype=dtype, device=device)
    return list(pool.unbind(0))


@dataclass(slots=True)
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # row of the last token of each chunk that samples
    sample_seq_ids: list[str]


class ModelRunner:
    """kv_caches come from allocate_kv_caches: their last block is graph padding scratch.

    The model's fused Triton kernels (RMSNorm, rope, SiLU-gate) follow the attention
    backend: on with "triton", eager torch with the "torch" reference.
    """

    def __init__(self, model: torch.nn.Module, mcfg: ModelConfig, attn: AttentionBackend,
                 kv_caches: list[torch.Tensor], block_size: int, device: str,
                 sampler: Sampler | None = None) -> None:
        self.model = model
        self.mcfg = mcfg
        self.attn = attn
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.sampler = sampler or Sampler()
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        set_fused_kernels(model, attn.name == "triton")

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int, pad_block: int,
                            sizes: list[int] | None = None, progress: bool = True) -> bool:
        """Capture decode graphs for batches up to max_num_seqs (default ladder) or `sizes`.
        pad_block: the scratch block (the scheduler's num_blocks). False, and eager decode,
        where graphs are unsupported (CPU, or an attention backend that is not graph-safe)."""
        reason = graphs_unsupported(self.device, self.attn)
        if reason is not None:
            log.info("decode CUDA graphs off: %s", reason)
            return False
        self.graphs = DecodeGraphs(self.model, self.attn, self.kv_caches, self.block_size,
                                   pad_block, sorted(sizes or capture_sizes(max_num_seqs)),
                                   max_model_len, self.device)
        self.graphs.capture(progress)
        return True

    def capture_prefill_graphs(self, sizes: list[int], max_model_len: int,
                               progress: bool = True) -> bool:
        """Capture graphs of one prompt chunk padded to each of `sizes` tokens
        (engine/prefill_graphs.py); False where graphs are unsupported."""
        reason = graphs_unsupported(self.device, self.attn)
        if reason is not None:
            log.info("prefill CUDA graphs off: %s", reason)
            return False
        self.prefill_graphs = PrefillGraphs(self.model, self.attn, self.kv_caches,
                                            self.block_size, sizes, max_model_len, self.device)
        self.prefill_graphs.capture(progress)
        return True

    def uses_prefill_graph(self, out: SchedulerOutput,
                           layer_hook: Callable[[int], None] | None = None) -> bool:
        """Whether this step replays a prefill graph."""
        return (layer_hook is None and self.prefill_graphs is not None
                and self.prefill_graphs.can_run(out.chunks))

    def prepare(self, out: SchedulerOutput) -> PreparedBatch:
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        max_blocks = max((len(c.block_ids) for c in out.chunks), default=1)
        tables = np.zeros((len(out.chunks), max_blocks), dtype=np.int32)
        for i, c in enumerate(out.chunks):
            n = len(c.token_ids)
            ids.extend(c.token_ids)
            pos = np.arange(c.start_pos, c.start_pos + n, dtype=np.int64)
            blocks = np.asarray(c.block_ids, dtype=np.int64)
            pos_parts.append(pos)
            slot_parts.append(blocks[pos // bs] * bs + pos % bs)
            tables[i, : len(c.block_ids)] = c.block_ids
            qsl.append(qsl[-1] + n)
            seq_lens.append(c.start_pos + n)
            if c.sample:
                sample_rows.append(qsl[-1] - 1)
                sample_ids.append(c.seq_id)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            max_query_len=max(len(c.token_ids) for c in out.chunks),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        return PreparedBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(np.concatenate(pos_parts)).to(dev),
            meta=meta, sample_rows=sample_rows, sample_seq_ids=sample_ids)

    def uses_graph(self, out: SchedulerOutput,
                   layer_hook: Callable[[int], None] | None = None) -> bool:
        """Whether this step replays a decode graph."""
        return layer_hook is None and self.graphs is not None and self.graphs.can_run(out.chunks)

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput, layer_hook: Callable[[int], None] | None = None,
                input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
        """Hidden states [N, H] of the N chunks that sample, and their seq ids in order.
        input_ids: [T] device tensor replacing the chunks' token ids (overlap)."""
        if input_ids is None and self.uses_prefill_graph(out, layer_hook):
            c = out.chunks[0]
            hidden = self.prefill_graphs.run(c)  # (n, H), a view of the graph's output
            n = c.num_tokens if c.sample else 0
            return hidden[n - 1:n] if n else hidden[:0], [c.seq_id] if n else []
        if self.uses_graph(out, layer_hook):
            hidden = self.graphs.run(out.chunks, input_ids)  # (B, H), one row per chunk
            rows = [i for i, c in enumerate(out.chunks) if c.sample]
            if len(rows) < len(out.chunks):
                hidden = hidden[rows]
            return hidden, [out.chunks[i].seq_id for i in rows]
        b = self.prepare(out)
        if input_ids is not None:
            b.input_ids = input_ids
        hidden = self.model(b.input_ids, b.positions, self.kv_caches, b.meta, self.attn,
                            layer_hook=layer_hook)  # (T, H)
        rows = torch.tensor(b.sample_rows, dtype=torch.int64, device=self.device)
        return hidden.index_select(0, rows), b.sample_seq_ids

    def execute(self, out: SchedulerOutput,
                layer_hook: Callable[[int], None] | None = None) -> SamplerOutput:
        """Run one step and wait; return the sampled token (and logprobs, where asked) of
        every chunk that samples."""
        step = self.launch(out, layer_hook)
        return SamplerOutput(step.tokens(), step.logprobs)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, layer_hook: Callable[[int], None] | None = None,
               prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step; its tokens are read later (LaunchedStep.tokens). When
        out.inputs_from_previous, `prev` is the step before, whose sampled tokens (on the
        device) are this step's inputs, row for row. Any thread may call it: the step runs
        with this runner's device current (Triton launches on the calling thread's current
        device, and an engine loop thread starts on cuda:0)."""
        if not out.chunks:
            return LaunchedStep(out, [], torch.empty(0, dtype=torch.int64))
        with self._device_guard():
            hidden, seq_ids = self.forward(out, layer_hook, self._inputs_from(out, prev))
            if not seq_ids:
                return LaunchedStep(out, [], torch.empty(0, dtype=torch.int64))
            logits = self.model.compute_logits(hidden)  # (N, V) fp32
            by_id = {c.seq_id: c for c in out.chunks}
            params = [by_id[s].params for s in seq_ids]
            indices = [by_id[s].output_index for s in seq_ids]
            tokens, logprobs = self._sample(logits, params, indices, seq_ids)
            return LaunchedStep(out, seq_ids, tokens, logprobs)

    @staticmethod
    def _inputs_from(out: SchedulerOutput, prev: LaunchedStep | None) -> torch.Tensor | None:
        if not out.inputs_from_previous:
            return None
        ids = [c.seq_id for c in out.chunks]
        if prev is None or prev.seq_ids != ids or any(c.num_tokens != 1 for c in out.chunks):
            raise ValueError("a step whose inputs come from the previous one needs that step "
                             "and one token per chunk, in the same row order")
        return prev.token_ids

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
                seq_ids: list[str]) -> tuple[torch.Tensor, dict[str, TokenLogprobs]]:
        """Sampled ids [N] int64 on the logits' device, and the logprobs of the rows that ask.
        An all-greedy batch without logprobs (the sampler's argmax) never leaves the device;
        otherwise the sampler runs (it waits for the step) and its tokens are copied back,
        so the next step can still read them there."""
        if all(p.greedy for p in params) and not wants_logprobs(params):
            return logits.argmax(dim=-1), {}
        sampled = self.sampler.sample_output(logits, params, indices, seq_ids)
        tokens = [sampled.tokens[s] for s in seq_ids]
        return torch.tensor(tokens, dtype=torch.int64).to(logits.device), sampled.logprobs

    def _device_guard(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

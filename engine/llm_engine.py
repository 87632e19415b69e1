"""The engine step: schedule -> run -> update. Shared by LLM, the prefill and decode workers."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import load_model, load_model_config
from pdserve.engine.memory import check_device, check_fits
from pdserve.engine.model_runner import (
    TORCH_DTYPES,
    ModelRunner,
    allocate_kv_caches,
    decide_num_blocks,
)
from pdserve.engine.prefill_graphs import graph_sizes
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence
from pdserve.engine.step_pipeline import LayerHook, StepPipeline, StepResult, apply_step
from pdserve.engine.tokenizer import get_tokenizer
from pdserve.kernels.attention import get_backend

__all__ = ["LLMEngine", "StepResult"]


class LLMEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        check_device(cfg.device)  # ResourceError (one clear line) before touching CUDA
        if cfg.device == "cuda":  # pin the bare name to a device index once, here
            cfg = replace(cfg, device=f"cuda:{torch.cuda.current_device()}")
        self.cfg = cfg
        self.dtype = TORCH_DTYPES[cfg.dtype]
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(cfg.device))
        mcfg = load_model_config(cfg.model, cfg.model_cache_dir)
        limit = mcfg.max_position_embeddings
        if cfg.scheduler.max_model_len is not None and cfg.scheduler.max_model_len > limit:
            # rope's table has `limit` rows: later positions would read past it
            raise ValueError(f"max_model_len {cfg.scheduler.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit}); use at most {limit}")
        check_fits(cfg.model, mcfg, self.dtype, cfg.device)
        self.model, self.model_cfg = load_model(cfg.model, self.dtype, cfg.device, cfg.seed,
                                                cfg.model_cache_dir)
        self.tokenizer = get_tokenizer(cfg.model, cfg.model_cache_dir)
        self.max_model_len = cfg.scheduler.max_model_len or self.model_cfg.max_position_embeddings
        self.num_blocks = decide_num_blocks(self.model_cfg, cfg.cache, self.dtype, cfg.device)
        self.block_size = cfg.cache.block_size
        self.kv_caches = allocate_kv_caches(self.model_cfg, self.num_blocks, self.block_size,
                                            self.dtype, cfg.device)
        self.attn = get_backend(cfg.attention_backend, cfg.device)
        self.runner = ModelRunner(self.model, self.model_cfg, self.attn, self.kv_caches,
                                  self.block_size, cfg.device)
        if not cfg.enforce_eager:  # CUDA graphs (no-op off CUDA or with torch attention)
            if cfg.capture_decode_graphs:
                self.runner.capture_cuda_graphs(cfg.scheduler.max_num_seqs, self.max_model_len,
                                                pad_block=self.num_blocks)
            sizes = graph_sizes(cfg.prefill_graph_tokens, cfg.scheduler.max_num_batched_tokens)
            if sizes:
                self.runner.capture_prefill_graphs(sizes, self.max_model_len)
        eos = tuple(sorted(set(self.model_cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        self.eos_token_ids = eos
        self.scheduler = Scheduler(cfg.scheduler, cfg.cache, self.num_blocks, self.max_model_len, eos)
        self.overlap = cfg.overlap if cfg.overlap is not None else cfg.device.startswith("cuda")
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: Iterable[int]) -> list[int]:
        """The prompt as a new list of ints in [0, vocab_size), or ValueError. Read through
        numpy: one copy for a protobuf repeated field (its `__array__`) or an array, one C
        loop for a list; a 32k prompt is on the TTFT path (about 0.3 ms, against 3 ms for
        Python-level conversion and range checks)."""
        vocab = self.model_cfg.vocab_size
        try:
            ids = np.asarray(prompt_token_ids)
            if ids.size and ids.dtype.kind not in "iu":  # bools, floats, strings: as int() reads them
                ids = np.asarray(list(map(int, prompt_token_ids)), dtype=np.int64)
        except OverflowError:
            raise ValueError(f"prompt token ids out of range [0, {vocab})") from None
        if ids.size == 0:
            raise ValueError("prompt is empty: give at least one token")
        if ids.ndim != 1:
            raise ValueError(f"prompt must be a flat list of token ids, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][:5].tolist()
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad}")
        return ids.tolist()

    def make_sequence(self, prompt_token_ids: Iterable[int], params: SamplingParams,
                      seq_id: str | None = None, prefill_only: bool = False,
                      output_offset: int = 0) -> Sequence:
        """output_offset: see Sequence (a migrated request's earlier outputs)."""
        if params.logprobs is not None and params.logprobs > self.cfg.max_logprobs:
            raise ValueError(f"logprobs must be at most {self.cfg.max_logprobs}, got {params.logprobs}")
        seq_id = seq_id if seq_id is not None else f"req-{next(self._ids)}"
        return Sequence(seq_id=seq_id, prompt_token_ids=self.validate_prompt(prompt_token_ids),
                        params=params, arrival_s=time.monotonic(), prefill_only=prefill_only,
                        output_offset=output_offset)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    seq_id: str | None = None, prefill_only: bool = False) -> Sequence:
        seq = self.make_sequence(prompt_token_ids, params, seq_id, prefill_only)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: str) -> bool:
        return self.scheduler.abort(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def run(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> StepResult:
        """One step, synchronously."""
        return apply_step(self.scheduler, self.runner.launch(out, layer_hook=layer_hook))

    def step(self, layer_hook: LayerHook | None = None) -> StepResult:
        return self.run(self.schedule(), layer_hook)

    def pipeline(self, on_result: Callable[[SchedulerOutput, StepResult], None],
                 before_run: Callable[[SchedulerOutput], LayerHook | None] | None = None,
                 overlap: bool | None = None) -> StepPipeline:
        """Steps with overlap scheduling as configured (or as `overlap` says)."""
        return StepPipeline(self.scheduler, self.runner,
                            self.overlap if overlap is None else overlap, on_result, before_run)

    def warm_up(self, prompt_lens: tuple[int, ...] = (1, 8, 40, 130, 256, 400, 1200, 1280),
                decode_steps: int = 2) -> int:
        """Run throw-away requests so that kernels are compiled before the first real one:
        each prompt length alone (the prefill kernels specialise on the step's longest
        query, and Triton on integer arguments divisible by 16: 256 and 1280 tokens give
        block tables 16 and 80 wide; without them the first such step of a GPU run
        compiled in the middle of serving, benchmarks/results/capstone-2gpu/README.md),
        then all together (a mixed batch, then batched decode steps). Leaves the pool
        as it found it (the prefix cache aside). Call before any request is added. Returns
        the steps run."""
        vocab = self.model_cfg.vocab_size
        params = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
        room = min(self.max_model_len, self.num_blocks * self.block_size // 2) - params.max_tokens
        lens = sorted({max(1, min(n, room)) for n in prompt_lens})
        steps = 0
        for rnd, group in enumerate([[n] for n in lens] + [lens]):
            for i, n in enumerate(group):
                self.add_request([(7919 * (rnd + 1) * (i + 1) * j + 1) % vocab for j in range(n)],
                                 params, seq_id=f"warm-up-{rnd}-{i}")
            while self.has_unfinished():
                self.step()
                steps += 1
        return steps

    # -- pool accounting ------------------------------------------------------------------
    def kv_stats(self) -> dict[str, int]:
        bm = self.scheduler.block_manager
        return {"free_blocks": bm.num_free_blocks, "total_blocks": bm.num_total_blocks,
                "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "fenced_blocks": bm.num_fenced_blocks}  # neither free nor any request's

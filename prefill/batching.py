"""The prefill pool's batching, sized to its phase: prefill is compute-bound.

The scheduler in engine/ has no phases; this module sets what makes it a prefill scheduler:
- **token budget**: each step batches whole prompts up to `max_num_batched_tokens`, so the
  GEMMs are large (the budget is the user's; 8192 by default);
- **chunking**: a prompt longer than the budget is split into budget-sized chunks over
  several steps; `long_prefill_threshold` caps one prompt's share of a step, so a long prompt
  does not hold up short ones behind it;
- **no decode CUDA graphs**: a prefill worker never runs a decode step, so it captures
  none; short prompts (engine/prefill_graphs.py) still replay prefill graphs, whose
  forward the host would otherwise launch slower than the GPU runs it;
- **prefill-only sequences**: each prompt finishes at its first token and keeps its blocks
  until the transfer has landed (`Scheduler.release`), so nothing is decoded here.
"""

from __future__ import annotations

from dataclasses import replace

from pdserve.engine.block_manager import cdiv
from pdserve.engine.config import EngineConfig
from pdserve.engine.scheduler import ScheduledChunk


def prefill_engine_config(cfg: EngineConfig) -> EngineConfig:
    """The user's engine settings, made a prefill pool's."""
    return replace(cfg, capture_decode_graphs=False)


def completes_prompt(chunk: ScheduledChunk) -> bool:
    """True for the chunk that computes a prompt's last token (the step samples token 0):
    that step is the one whose layers are pushed as they finish."""
    return chunk.sample


def prompt_blocks(chunk: ScheduledChunk, prompt_len: int, block_size: int) -> list[int]:
    """The blocks of the prompt's KV, the ones to send (the slot of token 0 stays here)."""
    return list(chunk.block_ids[: cdiv(prompt_len, block_size)])

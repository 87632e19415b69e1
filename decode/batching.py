"""The decode pool's batching, sized to its phase: decode is bandwidth-bound.

The scheduler in engine/ has no phases; this module sets what makes it a decode scheduler:
- **reservation**: `Reserve` holds blocks for the whole prompt plus the slot of token 0
  (`Scheduler.reserve_remote`); a request that does not fit is refused at once (the
  coordinator tries another decode worker or queues it), so admission never needs a block;
- **admission**: a request joins the running batch only when its KV is complete
  (`Scheduler.admit_remote`); until then it costs blocks but no step time;
- **batch caps**: at most `max_num_seqs` run at once; past that, admitted requests wait
  holding their blocks, ahead of any prompt and in the order their KV landed (FIFO); when
  blocks run out the newest running request is preempted (recomputed later), never
  deadlocked;
- **CUDA graphs** over padded batch sizes up to `max_num_seqs` (unless `enforce_eager`), since
  a decode step is a few small, launch-bound kernels per layer;
- **overlap scheduling** (on CUDA unless `--no-overlap`): while a step of an unchanged batch
  runs, the next one is planned and launched, its input ids being this step's sampled
  tokens on the device (engine/step_pipeline.py). Each admission (a `call` on the engine
  thread) makes the step around it synchronous; a request that stops has its one extra
  token discarded and its blocks freed as usual.
"""

from __future__ import annotations

from pdserve.engine.config import EngineConfig
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence

NO_ROOM = "no free KV blocks on this decode worker"


def decode_engine_config(cfg: EngineConfig) -> EngineConfig:
    """The user's engine settings are a decode pool's as they are: graphs on, caps as set."""
    return cfg


def reserve(scheduler: Scheduler, seq: Sequence) -> list[int] | None:
    """Engine thread: the block ids the prefill worker fills, or None (no room: refuse)."""
    return scheduler.reserve_remote(seq)


def transfer_blocks(scheduler: Scheduler, seq: Sequence) -> list[int]:
    """The blocks of a reserved sequence that its transfer writes (`reserve`'s result)."""
    return seq.block_ids[:-(-seq.num_prompt_tokens // scheduler.block_size)]


def admit(scheduler: Scheduler, seq_id: str, first_token: int) -> Sequence:
    """Engine thread: every layer arrived; the sequence decodes from the next step on."""
    return scheduler.admit_remote(seq_id, first_token)

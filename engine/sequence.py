"""Request state inside one worker: a sequence of token ids and how far its KV is computed.

There is no prefill/decode phase. `num_computed_tokens` counts the tokens whose K/V sit in
the sequence's blocks; a step closes the gap to `num_tokens`. Only the scheduler and the
block manager touch a `Sequence`; the model runner sees `SchedulerOutput` only.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pdserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, no blocks (except an admitted remote seq, see scheduler)
    RUNNING = enum.auto()  # scheduled each step until it finishes or is preempted
    WAITING_FOR_REMOTE_KVS = enum.auto()  # decode side: blocks reserved, KV in flight
    PREEMPTED = enum.auto()  # blocks taken back; queued to recompute prompt + outputs
    FINISHED_STOPPED = enum.auto()  # eos or a stop token
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()  # aborted, or can never fit
    FINISHED_PREFILL = enum.auto()  # prefill side: first token sampled, blocks held

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                       SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_PREFILL})

# finish_reason string of each finished status
FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_PREFILL: "prefill_done",
}



_TABLE_IDS = itertools.count()  # block_table_id source, unique per process


def new_block_table_id() -> int:
    return next(_TABLE_IDS)

@dataclass(slots=True)
class Sequence:
    """One request's tokens and cache state.

    token_ids = prompt + generated tokens. Invariants kept by the scheduler:
    num_cached_tokens <= num_computed_tokens <= num_tokens, and while RUNNING
    num_computed_tokens < num_tokens (the last token still has to be fed).
    """

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prefill_only: bool = False  # prefill worker: stop after the first token, keep blocks
    # A migrated continuation: the last `output_offset` prompt tokens are outputs generated
    # elsewhere. They count as outputs (num_output_tokens), so the next token keeps its
    # output index (seeded sampling) and max_tokens counts them.
    output_offset: int = 0
    arrival_s: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in block_ids
    num_cached_tokens: int = 0  # prefix-cache hit length at the last admission
    block_ids: list[int] = field(default_factory=list)  # block table
    # Names this block_ids list: a new id whenever the list is replaced (never on extend),
    # so (seq_id, block_table_id) and a length identify a table prefix exactly.
    block_table_id: int = -1
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefill_done"
    num_preemptions: int = 0
    # Block-manager bookkeeping: chained hashes of the first len(block_hashes) full blocks
    # of token_ids (valid forever: token_ids only grow), and how many leading entries of
    # block_ids have been offered to the prefix cache.
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0

    def set_block_table(self, block_ids: list[int]) -> None:
        """Replace the block table (it only grows in place otherwise: see block_table_id)."""
        self.block_ids = block_ids
        self.block_table_id = new_block_table_id()

    def __post_init__(self) -> None:
        """The token ids are taken as they are: `LLMEngine.make_sequence` builds every
        sequence from a checked list of ints (`validate_prompt`); converting and checking
        32k ids again here cost about 2 ms on the TTFT path."""
        self.block_table_id = new_block_table_id()
        if not isinstance(self.prompt_token_ids, list):
            self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id!r}: the prompt is empty")
        if not 0 <= self.output_offset < len(self.prompt_token_ids):
            raise ValueError(f"sequence {self.seq_id!r}: output_offset {self.output_offset} must "
                             f"be in [0, {len(self.prompt_token_ids)}) (tokens before the prompt's end)")
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Outputs so far, the earlier ones of a continuation (output_offset) included."""
        return len(self.token_ids) - self.num_prompt_tokens + self.output_offset

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def finish(self, status: SequenceStatus) -> None:
        self.status = status
        self.finish_reason = FINISH_REASONS[status]

"""Phase-less scheduler: each step closes the gap between num_computed_tokens and num_tokens.

A step fills a token budget (max_num_batched_tokens) and at most max_num_seqs running
sequences: running ones first (1 token to decode, or the rest of a chunked prompt), then
waiting ones in FCFS order, chunking a prompt that does not fit the remaining budget.
Decode side: a request whose KV landed (`admit_remote`) while max_num_seqs run waits in
`landed`, holding its blocks, and is admitted before anything in `waiting`, in the order
the KV landed (FCFS among landed requests: none starves behind later ones).
When blocks run out, the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it goes back to the FRONT of the waiting queue with
num_computed_tokens = 0 (its outputs stay in token_ids, so recomputation covers them).
No new sequence is admitted in a step that preempted.

Overlap scheduling (`schedule_ahead`): while step N runs, step N+1 of an unchanged decode
batch is planned from token counts alone; its input tokens are step N's sampled ones, still
on the device (PLACEHOLDER_TOKEN here). It reserves each sequence's next slot one token
ahead. A sequence that step N ends (EOS, stop token) runs once more in step N+1: `update`
discards that token (the sequence is no longer running) and step N's update has already
freed its blocks, the reserved slot with them (a sequence waiting for its running slot is
admitted a step later than without overlap). Anything else (arrivals, finishes by length,
preemption, prompts) makes it return None: that step is scheduled after N is applied.

The model runner only sees `SchedulerOutput`. Pure Python; no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import CacheConfig, SchedulerConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence, SequenceStatus

S = SequenceStatus

PLACEHOLDER_TOKEN = -1  # an input token the previous step sampled, still on the device


@dataclass(slots=True)
class ScheduledChunk:
    """New tokens of one sequence to run this step."""

    seq_id: str
    token_ids: list[int]  # tokens to compute, at positions start_pos, start_pos + 1, ...
    start_pos: int  # == tokens already in the KV cache of this sequence
    block_ids: list[int]  # whole block table after allocation (covers start_pos + len)
    sample: bool  # this chunk reaches the last known token: sample a new one
    params: SamplingParams
    output_index: int  # index among output tokens of the token sampled (seeded sampling)
    block_table_id: int = -1  # the sequence's Sequence.block_table_id (-1: unknown)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # seq ids preempted this step
    num_batched_tokens: int = 0
    # Overlap: each chunk's one input token is the token the previous step sampled for that
    # sequence, rows in the same order (token_ids hold PLACEHOLDER_TOKEN).
    inputs_from_previous: bool = False


class Scheduler:
    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, num_blocks: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...]):
        self.cfg = sched_cfg
        self.block_size = cache_cfg.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
        self.waiting: OrderedDict[str, Sequence] = OrderedDict()  # FCFS; front = next
        # decode side: KV landed, waiting for a running slot with its blocks; FCFS, and
        # admitted before `waiting`
        self.landed: OrderedDict[str, Sequence] = OrderedDict()
        self.running: dict[str, Sequence] = {}  # admission order; last = first victim
        self.remote: dict[str, Sequence] = {}  # decode side: WAITING_FOR_REMOTE_KVS
        self.held: dict[str, Sequence] = {}  # prefill side: FINISHED_PREFILL, blocks kept
        self._finished_early: list[Sequence] = []  # finished inside schedule(), returned by update()

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.landed)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.landed or self.running or self.remote)

    def get(self, seq_id: str) -> Sequence | None:
        for queue in (self.running, self.landed, self.waiting, self.remote, self.held):
            if seq_id in queue:
                return queue[seq_id]
        return None

    def held_blocks(self, seq_id: str) -> list[int]:
        return list(self.held[seq_id].block_ids)

    # ---- admission ----------------------------------------------------------------------
    def validate(self, seq: Sequence) -> None:
        """ValueError (clear message) if seq can never run here; the id must be new."""
        if self.get(seq.seq_id) is not None:
            raise ValueError(f"sequence id {seq.seq_id!r} is already in use")
        total = seq.num_prompt_tokens + seq.params.max_tokens - seq.output_offset
        if seq.output_offset >= seq.params.max_tokens:
            raise ValueError(f"continuation of {seq.output_offset} outputs already reached "
                             f"max_tokens ({seq.params.max_tokens})")
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.params.max_tokens}) "
                f"= {total} exceeds max_model_len ({self.max_model_len})")
        pool = self.block_manager.num_total_blocks * self.block_size
        need = seq.num_prompt_tokens + (
            1 if seq.prefill_only else seq.params.max_tokens - seq.output_offset)
        if need > pool:
            raise ValueError(
                f"sequence needs {need} KV slots but the whole KV pool holds {pool} tokens "
                f"({self.block_manager.num_total_blocks} blocks of {self.block_size})")

    def add(self, seq: Sequence) -> None:
        self.validate(seq)
        seq.status = S.WAITING
        self.waiting[seq.seq_id] = seq

    def abort(self, seq_id: str, fence: Collection[int] = ()) -> bool:
        """Finish seq_id as aborted and free its blocks wherever it is; False if unknown.
        Its blocks in `fence` stay out of the pool, fenced under seq_id (a transfer may
        still write them), until unfence(seq_id, blocks)."""
        for queue in (self.running, self.landed, self.waiting, self.remote, self.held):
            seq = queue.pop(seq_id, None)
            if seq is not None:
                self.block_manager.free(seq, fence)
                if not seq.is_finished:
                    seq.finish(S.FINISHED_ABORTED)
                return True
        return False

    # ---- disaggregation hooks -----------------------------------------------------------
    def reserve_remote(self, seq: Sequence) -> list[int] | None:
        """Decode side: reserve blocks for a prompt whose K/V will arrive. Returns the
        cdiv(num_prompt_tokens, block_size) block ids the sender fills, in order; the slot
        of the first token is reserved too (one hidden extra block when the prompt fills
        its last block), so admission never needs a block. None: no room, refuse."""
        self.validate(seq)
        if self.block_manager.reserve(seq, seq.num_prompt_tokens + 1) is None:
            return None
        seq.status = S.WAITING_FOR_REMOTE_KVS
        self.remote[seq.seq_id] = seq
        return seq.block_ids[:-(-seq.num_prompt_tokens // self.block_size)]

    def admit_remote(self, seq_id: str, first_token: int) -> Sequence:
        """Decode side: every layer arrived. The sequence decodes from the next step on
        (RUNNING), or, when max_num_seqs run or earlier landed sequences still wait, joins
        the end of `landed` holding its blocks (admitted in landing order, before any
        prompt). If first_token already ends it, it is finished and freed here. KeyError
        if seq_id is not waiting for remote KV."""
        seq = self.remote.pop(seq_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.token_ids.append(int(first_token))
        status = self.stop_status(seq, int(first_token))
        if status is not None:
            seq.finish(status)
            self.block_manager.free(seq)
        elif not self.landed and len(self.running) < self.cfg.max_num_seqs:
            seq.status = S.RUNNING
            self.running[seq_id] = seq
        else:
            seq.status = S.WAITING
            self.landed[seq_id] = seq
        return seq

    def release(self, seq_id: str) -> bool:
        """Prefill side: the transfer is done; free a FINISHED_PREFILL sequence's blocks."""
        seq = self.held.pop(seq_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    def unfence(self, seq_id: str, block_ids: Iterable[int]) -> int:
        """Free blocks that abort(seq_id, fence=...) kept; returns how many."""
        return self.block_manager.unfence(seq_id, block_ids)

    # ---- one step -----------------------------------------------------------------------
    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if self.cfg.long_prefill_threshold > 0:
            n = min(n, self.cfg.long_prefill_threshold)
        return n

    def _make_chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        c = seq.num_computed_tokens
        return ScheduledChunk(seq.seq_id, seq.token_ids[c:c + n], c, list(seq.block_ids),
                              c + n == seq.num_tokens, seq.params, seq.num_output_tokens,
                              seq.block_table_id)

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = S.PREEMPTED
        self.waiting[seq.seq_id] = seq
        self.waiting.move_to_end(seq.seq_id, last=False)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens

        # 1. running sequences, in admission order; victims come from the end
        for seq in list(self.running.values()):
            if budget == 0:
                break
            if seq.seq_id not in self.running:  # preempted earlier in this loop
                continue
            n = self._chunk_len(seq, budget)
            if self._make_room(seq, n, out):
                out.chunks.append(self._make_chunk(seq, n))
                budget -= n

        # 2. landed sequences, then waiting ones, each FCFS, only in a step without preemption
        while budget > 0 and not out.preempted and len(self.running) < self.cfg.max_num_seqs:
            queue = self.landed or self.waiting
            if not queue:
                break
            seq = queue[next(iter(queue))]
            n = self._admit(seq, queue, budget)
            if n == 0:
                break
            out.chunks.append(self._make_chunk(seq, n))
            budget -= n

        out.num_batched_tokens = self.cfg.max_num_batched_tokens - budget
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `prev`, planned while `prev` runs: every earlier step is applied,
        `prev` is not (its tokens are unknown). Only an unchanged decode batch qualifies:
        every running sequence decodes one token in `prev`, none can end there by length,
        nothing could be admitted (no waiting sequence, or max_num_seqs running: one waits
        a step longer after a stop), and the pool holds each one's next slot (taken now).
        Otherwise None."""
        if (self.waiting or self.landed) and len(self.running) < self.cfg.max_num_seqs:
            return None
        if self._finished_early or prev.preempted or not prev.chunks:
            return None
        if (len(prev.chunks) != len(self.running)
                or len(prev.chunks) > self.cfg.max_num_batched_tokens):
            return None
        seqs = []
        for c in prev.chunks:
            seq = self.running.get(c.seq_id)
            if (seq is None or seq.prefill_only or not c.sample or c.num_tokens != 1
                    or seq.num_computed_tokens != c.start_pos or seq.num_tokens != c.start_pos + 1
                    or seq.num_output_tokens + 1 >= seq.params.max_tokens
                    or seq.num_tokens + 1 >= self.max_model_len):
                return None
            seqs.append(seq)
        if not all(self.block_manager.ensure_slots(s, s.num_tokens + 1) for s in seqs):
            return None  # blocks taken so far are the ones the next step needs anyway
        chunks = [ScheduledChunk(s.seq_id, [PLACEHOLDER_TOKEN], s.num_tokens, list(s.block_ids),
                                 True, s.params, s.num_output_tokens + 1, s.block_table_id)
                  for s in seqs]
        return SchedulerOutput(chunks=chunks, num_batched_tokens=len(chunks),
                               inputs_from_previous=True)

    def _admit(self, seq: Sequence, queue: OrderedDict[str, Sequence], budget: int) -> int:
        """Move the head of `queue` (landed or waiting) to running with blocks for its
        first chunk (after prefix-cache hits); return the chunk length, or 0 if blocks are
        short (never for a landed sequence: its reservation covers its next slot)."""
        bm = self.block_manager
        fresh = not seq.block_ids  # an admitted remote seq already holds its blocks
        if fresh:
            bm.allocate_prompt(seq)
        n = self._chunk_len(seq, budget)
        if not bm.ensure_slots(seq, seq.num_computed_tokens + n):
            if fresh:
                bm.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                if bm.num_free_blocks == bm.num_total_blocks:  # never fits; validate() prevents it
                    self._drop_unfittable(seq)
            return 0
        del queue[seq.seq_id]
        seq.status = S.RUNNING
        self.running[seq.seq_id] = seq
        return n

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for n more tokens of running seq, preempting the most recently admitted
        running sequences as needed. False when seq itself had to be preempted."""
        while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
            victim = self.running[next(reversed(self.running))]
            self._preempt(victim)
            out.preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def _drop_unfittable(self, seq: Sequence) -> None:
        """The whole pool is free and seq still does not fit: finish it (no deadlock)."""
        del self.waiting[seq.seq_id]
        seq.finish(S.FINISHED_ABORTED)
        self._finished_early.append(seq)

    def stop_status(self, seq: Sequence, token: int) -> SequenceStatus | None:
        """Whether `token`, just appended to seq, ends it (and how). A prefill worker asks
        this about token 0 too, to tell the decode side the request is already done."""
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return S.FINISHED_STOPPED
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return S.FINISHED_LENGTH
        return None

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's results: advance computed tokens, append sampled tokens, commit
        full blocks to the prefix cache, finish and free. Returns sequences finished now
        (a prefill_only sequence finishes with FINISHED_PREFILL and keeps its blocks).
        Chunks of sequences no longer running are ignored: aborted since schedule(), or
        (overlap) ended by the step before this one, whose extra token is discarded."""
        finished, self._finished_early = self._finished_early, []
        for chunk in output.chunks:
            seq = self.running.get(chunk.seq_id)
            if seq is None:
                continue
            assert seq.num_computed_tokens == chunk.start_pos, f"{seq.seq_id}: stale chunk"
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.commit_full_blocks(seq)
            if not chunk.sample:
                continue
            if chunk.seq_id not in sampled:
                raise KeyError(f"no sampled token for {chunk.seq_id!r}, whose chunk asked for one")
            token = int(sampled[chunk.seq_id])
            seq.token_ids.append(token)
            status = S.FINISHED_PREFILL if seq.prefill_only else self.stop_status(seq, token)
            if status is None:
                continue
            del self.running[seq.seq_id]
            seq.finish(status)
            if seq.prefill_only:
                self.held[seq.seq_id] = seq
            else:
                self.block_manager.free(seq)
            finished.append(seq)
        return finished

    # ---- checking -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        owners = [*self.running.values(), *self.landed.values(), *self.waiting.values(),
                  *self.remote.values(), *self.held.values()]
        self.block_manager.check_invariants(owners)
        ids = [s.seq_id for s in owners]
        assert len(ids) == len(set(ids)), "a sequence is in two queues"
        assert len(self.running) <= self.cfg.max_num_seqs, "more running than max_num_seqs"
        bs = self.block_size
        for seq in self.running.values():
            assert seq.status is S.RUNNING, f"{seq.seq_id} running with status {seq.status}"
            assert seq.num_computed_tokens < seq.num_tokens, f"{seq.seq_id}: nothing to compute"
            assert len(seq.block_ids) * bs >= seq.num_computed_tokens, f"{seq.seq_id}: KV without blocks"
        for seq in self.waiting.values():
            assert seq.status in (S.WAITING, S.PREEMPTED), f"{seq.seq_id} waiting with {seq.status}"
            assert seq.num_computed_tokens == 0 and not seq.block_ids, f"{seq.seq_id}: stray KV"
        for seq in self.landed.values():
            assert seq.status is S.WAITING, f"{seq.seq_id} landed with {seq.status}"
            assert seq.num_computed_tokens == seq.num_prompt_tokens == seq.num_tokens - 1
            assert len(seq.block_ids) * bs >= seq.num_tokens, f"{seq.seq_id}: landed short of a slot"
        for seq in self.remote.values():
            assert seq.status is S.WAITING_FOR_REMOTE_KVS
            assert len(seq.block_ids) * bs >= seq.num_prompt_tokens + 1, f"{seq.seq_id}: short reserve"
        for seq in self.held.values():
            assert seq.status is S.FINISHED_PREFILL and seq.block_ids, f"{seq.seq_id}: bad held seq"


def make_scheduler(num_blocks: int = 64, block_size: int = 16, max_num_batched_tokens: int = 256,
                   max_num_seqs: int = 16, eos_token_ids: tuple[int, ...] = (),
                   enable_prefix_caching: bool = True, max_model_len: int | None = None,
                   long_prefill_threshold: int = 0) -> Scheduler:
    """A CPU scheduler for tests; max_model_len defaults to the pool's capacity."""
    sched = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                            max_model_len=max_model_len, long_prefill_threshold=long_prefill_threshold)
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks,
                        enable_prefix_caching=enable_prefix_caching)
    return Scheduler(sched, cache, num_blocks, max_model_len or num_blocks * block_size,
                     tuple(eos_token_ids))

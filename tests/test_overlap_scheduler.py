"""Overlap scheduling, the scheduler's part: `schedule_ahead` plans step N+1 of an unchanged
decode batch before step N is applied, reserves its slot one token ahead, and falls back
(None) whenever the batch could change; the extra token of a sequence that step N ended is
discarded and every block is freed."""

from __future__ import annotations

import random

import pytest
import torch
from test_scheduler import EOS, VOCAB, next_token, reference

from pdserve.engine.async_output import LaunchedStep
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import PLACEHOLDER_TOKEN, Scheduler, make_scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.step_pipeline import StepPipeline

GREEDY = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)


def decoding(sched: Scheduler, *lens: int, params: SamplingParams = GREEDY) -> list[Sequence]:
    """Sequences of the given prompt lengths, prefilled (token 100 sampled), now decoding."""
    seqs = [Sequence(f"s{i}", list(range(1, n + 1)), params) for i, n in enumerate(lens)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    sched.update(out, {s.seq_id: 100 for s in seqs})
    return seqs


def all_free(sched: Scheduler) -> bool:
    sched.check_invariants()
    bm = sched.block_manager
    return bm.num_free_blocks == bm.num_total_blocks


def test_ahead_step_follows_the_in_flight_one() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    a, b = decoding(sched, 4, 7)  # a: 5 tokens, b: 8 tokens
    n = sched.schedule()
    assert [c.start_pos for c in n.chunks] == [4, 7] and not n.inputs_from_previous
    assert [len(a.block_ids), len(b.block_ids)] == [2, 2]
    ahead = sched.schedule_ahead(n)
    assert ahead is not None and ahead.inputs_from_previous
    assert [c.seq_id for c in ahead.chunks] == ["s0", "s1"]
    assert all(c.token_ids == [PLACEHOLDER_TOKEN] and c.sample for c in ahead.chunks)
    assert [c.start_pos for c in ahead.chunks] == [5, 8]
    assert [c.output_index for c in ahead.chunks] == [2, 2]  # one past step n's
    # the slots of positions 5 and 8 are reserved now: b's takes a third block
    assert [len(a.block_ids), len(b.block_ids)] == [2, 3]
    assert all(len(c.block_ids) * 4 > c.start_pos for c in ahead.chunks)
    sched.check_invariants()
    # apply n, then the ahead step, as the pipeline does
    sched.update(n, {"s0": 7, "s1": 8})
    sched.update(ahead, {"s0": 9, "s1": 10})
    assert a.output_token_ids == [100, 7, 9] and b.output_token_ids == [100, 8, 10]
    assert a.num_computed_tokens == 6 and b.num_computed_tokens == 9
    sched.check_invariants()


def test_a_sequence_ended_by_the_in_flight_step_loses_its_extra_token() -> None:
    stop = SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=[77])
    sched = make_scheduler(num_blocks=32, block_size=4, eos_token_ids=(2,))
    a, b = decoding(sched, 3, 5, params=stop)
    n = sched.schedule()
    ahead = sched.schedule_ahead(n)
    assert ahead is not None
    finished = sched.update(n, {"s0": 77, "s1": 2})  # a stop token and EOS: both end at n
    assert {s.seq_id for s in finished} == {"s0", "s1"}
    assert all_free(sched)  # the slots reserved ahead went back with the rest
    assert sched.update(ahead, {"s0": 5, "s1": 6}) == []  # discarded
    assert a.output_token_ids == [100, 77] and b.output_token_ids == [100, 2]
    assert a.status is b.status is SequenceStatus.FINISHED_STOPPED
    assert all_free(sched) and not sched.has_unfinished()


def test_a_batch_that_may_change_is_not_scheduled_ahead() -> None:
    # a prompt step
    sched = make_scheduler(num_blocks=32, block_size=4)
    sched.add(Sequence("p", [1, 2, 3], GREEDY))
    assert sched.schedule_ahead(sched.schedule()) is None
    # a sequence waiting to be admitted
    sched = make_scheduler(num_blocks=32, block_size=4)
    decoding(sched, 3)
    n = sched.schedule()
    sched.add(Sequence("late", [1, 2], GREEDY))
    assert sched.schedule_ahead(n) is None
    # a finish by length in the in-flight step (max_tokens), and by max_model_len
    sched = make_scheduler(num_blocks=32, block_size=4)
    decoding(sched, 3, params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert sched.schedule_ahead(sched.schedule()) is None
    sched = make_scheduler(num_blocks=32, block_size=4, max_model_len=6)
    decoding(sched, 3, params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    n = sched.schedule()
    sched.update(n, {"s0": 5})
    assert sched.schedule_ahead(sched.schedule()) is None  # its 6th token ends it
    # a sequence that left since the step was scheduled
    sched = make_scheduler(num_blocks=32, block_size=4)
    decoding(sched, 3, 3)
    n = sched.schedule()
    sched.abort("s1")
    assert sched.schedule_ahead(n) is None
    # the step after an ahead step chains on (start_pos advances again)
    sched = make_scheduler(num_blocks=32, block_size=4)
    decoding(sched, 3)
    n = sched.schedule()
    ahead = sched.schedule_ahead(n)
    sched.update(n, {"s0": 1})
    again = sched.schedule_ahead(ahead)
    assert again is not None and again.chunks[0].start_pos == ahead.chunks[0].start_pos + 1


def test_no_room_for_the_next_slot_falls_back_and_keeps_the_pool_consistent() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4)  # 12 slots
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a, b = decoding(sched, 3, 3, params=short)  # 4 tokens each in one block; one block free
    n = sched.schedule()  # feeds position 3: no new block needed
    assert not n.preempted
    assert sched.schedule_ahead(n) is None  # position 4 needs a block each; one is left
    assert len(a.block_ids) == 2 and len(b.block_ids) == 1  # a holds its next block already
    sched.check_invariants()
    sched.update(n, {"s0": 5, "s1": 6})
    n2 = sched.schedule()  # the synchronous step preempts b to make room
    assert [c.seq_id for c in n2.chunks] == ["s0"] and n2.preempted == ["s1"]
    assert sched.schedule_ahead(n2) is None  # a preemption changed the batch
    sched.check_invariants()
    sched.abort("s0")
    sched.abort("s1")
    assert all_free(sched)


def test_a_full_batch_with_a_queue_still_overlaps_and_admits_after_a_stop() -> None:
    stop = SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=[77])
    sched = make_scheduler(num_blocks=32, block_size=4, max_num_seqs=2)
    decoding(sched, 3, 5, params=stop)  # s0, s1 running: max_num_seqs
    sched.add(Sequence("q", [9, 9, 9], GREEDY))  # waits for a running slot
    n = sched.schedule()
    assert [c.seq_id for c in n.chunks] == ["s0", "s1"]
    ahead = sched.schedule_ahead(n)  # nothing could be admitted before a finish anyway
    assert ahead is not None and [c.seq_id for c in ahead.chunks] == ["s0", "s1"]
    sched.update(n, {"s0": 77, "s1": 4})  # s0 stops: q gets its slot after the ahead step
    assert sched.schedule_ahead(ahead) is None  # the batch changed
    sched.update(ahead, {"s0": 1, "s1": 5})  # s0's extra token is dropped
    nxt = sched.schedule()
    assert sorted(c.seq_id for c in nxt.chunks) == ["q", "s1"]
    sched.check_invariants()
    for sid in ("q", "s1"):
        sched.abort(sid)
    assert all_free(sched)


# ---- randomized: the pipeline over a fake runner that reads its context through the tables --
# next_token / reference: the same fake model as the scheduler's own tests


class FakeRunner:
    """Writes each step's input tokens into a simulated KV pool at the chunk's slots and
    samples by hashing the context read back through the block table, at launch (launch
    order is the device's stream order). A step with inputs_from_previous takes its inputs
    from the previous step's sampled tensor, as the model runner does."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.kv = sched, {}

    def slot(self, block_ids: list[int], pos: int) -> int:
        bs = self.sched.block_size
        return block_ids[pos // bs] * bs + pos % bs

    def launch(self, out, layer_hook=None, prev: LaunchedStep | None = None) -> LaunchedStep:
        if out.inputs_from_previous:
            assert prev is not None and prev.seq_ids == [c.seq_id for c in out.chunks]
            inputs = [[t] for t in prev.token_ids.tolist()]
        else:
            assert all(PLACEHOLDER_TOKEN not in c.token_ids for c in out.chunks)
            inputs = [c.token_ids for c in out.chunks]
        for c, toks in zip(out.chunks, inputs, strict=True):
            for k, t in enumerate(toks):
                block = c.block_ids[(c.start_pos + k) // self.sched.block_size]
                assert self.sched.block_manager.refcount(block) <= 1, "wrote a shared block"
                self.kv[self.slot(c.block_ids, c.start_pos + k)] = t
        rows = [c for c in out.chunks if c.sample]
        sampled = [next_token([self.kv[self.slot(c.block_ids, p)]
                               for p in range(c.start_pos + c.num_tokens)]) for c in rows]
        return LaunchedStep(out, [c.seq_id for c in rows], torch.tensor(sampled, dtype=torch.int64))


def random_run(seed: int, overlap: bool) -> tuple[dict[str, Sequence], StepPipeline]:
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=4, eos_token_ids=(EOS,),
                           max_num_batched_tokens=32)
    pipe = StepPipeline(sched, FakeRunner(sched), overlap, on_result=lambda o, r: None)
    base = [rng.randrange(1, VOCAB) for _ in range(12)]
    events: dict[int, list] = {}
    seqs: dict[str, Sequence] = {}
    for i in range(14):
        prompt = base[: rng.randrange(0, 10)] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 8))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30),
                                ignore_eos=rng.random() < 0.5,
                                stop_token_ids=[rng.randrange(1, VOCAB)] if rng.random() < 0.4 else [])
        seqs[f"r{i}"] = Sequence(f"r{i}", prompt, params)
        events.setdefault(rng.randrange(0, 40), []).append(lambda s=seqs[f"r{i}"]: sched.add(s))
        if rng.random() < 0.2:
            events.setdefault(rng.randrange(0, 60), []).append(lambda sid=f"r{i}": sched.abort(sid))
    applied = 0
    while True:
        if pipe.in_flight is None:
            for t in sorted(t for t in events if t <= applied):
                for fn in events.pop(t):
                    fn()
        soon = any(t <= applied + 1 for t in events)
        if pipe.advance(may_run_ahead=not soon):
            applied += 1
            sched.check_invariants()
        elif events:
            applied = min(events)
        else:
            break
    assert all_free(sched)
    return seqs, pipe


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_match_the_reference_with_overlap_on_and_off(seed: int) -> None:
    runs = {flag: random_run(seed, flag) for flag in (True, False)}
    for flag, (seqs, _) in runs.items():
        for sid, seq in seqs.items():
            want = reference(seq.prompt_token_ids, seq.params)
            if seq.finish_reason == "abort":  # cut short: a prefix of the reference
                assert seq.output_token_ids == want[: len(seq.output_token_ids)], (flag, sid)
            else:
                assert seq.output_token_ids == want, (flag, sid)
    assert runs[True][1].num_overlapped > 0 and runs[False][1].num_overlapped == 0


def test_random_workloads_cover_discards_preemption_and_aborts() -> None:
    runs = [random_run(seed, True) for seed in range(6)]
    assert sum(pipe.num_discarded for _, pipe in runs) > 0
    assert sum(s.num_preemptions for seqs, _ in runs for s in seqs.values()) > 0
    assert any(s.finish_reason == "abort" for seqs, _ in runs for s in seqs.values())

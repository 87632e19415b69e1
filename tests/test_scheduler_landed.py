"""Decode side: requests whose KV landed while max_num_seqs run wait for a running slot,
holding their blocks, ahead of any prompt and first-come-first-served among themselves
(engine/scheduler.py `admit_remote`, `landed`). Same fake model as test_scheduler.py: the
outputs are checked against a reference computed from the prompt."""

from __future__ import annotations

import random

import pytest
from test_scheduler import EOS, FakeModel, next_token, rand_prompt, reference, step

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, make_scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


def arrive(sched: Scheduler, sid: str, max_tokens: int, rng: random.Random) -> Sequence:
    """Reserve blocks for a remote prompt (the KV has not landed yet)."""
    seq = Sequence(sid, rand_prompt(rng, rng.randrange(3, 10)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert sched.reserve_remote(seq) is not None
    return seq


def land(sched: Scheduler, model: FakeModel, seq: Sequence, first: int | None = None) -> Sequence:
    """The "transfer" of seq's prompt KV, then admit_remote with its token 0."""
    model.write(seq.block_ids, 0, seq.prompt_token_ids)
    token = next_token(seq.prompt_token_ids) if first is None else first
    return sched.admit_remote(seq.seq_id, token)


class Admissions:
    """The order in which sequences first enter `running` (preemption does not count)."""

    def __init__(self, sched: Scheduler):
        self.sched, self.order = sched, list(sched.running)

    def see(self) -> None:
        self.order += [sid for sid in self.sched.running if sid not in self.order]

    def drain(self, model: FakeModel) -> dict[str, Sequence]:
        done: dict[str, Sequence] = {}
        for _ in range(10_000):
            if not self.sched.has_unfinished():
                return done
            out, finished = step(self.sched, model)
            self.see()
            done.update((s.seq_id, s) for s in finished)
        raise AssertionError("scheduler did not drain")


def full_decoder(rng: random.Random) -> tuple[Scheduler, FakeModel, Sequence]:
    """max_num_seqs (2) running: r0 ends after 2 more steps, r1 after 4; then a new prompt
    p arrives and waits."""
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2, eos_token_ids=(EOS,))
    model = FakeModel(sched)
    for i, n in enumerate((3, 5)):
        assert land(sched, model, arrive(sched, f"r{i}", n, rng)).status is SequenceStatus.RUNNING
    p = Sequence("p", rand_prompt(rng, 6), SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add(p)
    return sched, model, p


def check_outputs(done: dict[str, Sequence], *seqs: Sequence) -> None:
    for s in seqs:
        assert done[s.seq_id].output_token_ids == reference(s.prompt_token_ids, s.params)


def test_landed_requests_are_admitted_in_landing_order_before_prompts():
    rng = random.Random(1)
    sched, model, p = full_decoder(rng)
    seqs = [arrive(sched, sid, 4, rng) for sid in "abc"]
    for s in seqs:  # land a, b, c in that order; the batch is full
        assert land(sched, model, s).status is SequenceStatus.WAITING
    assert sched.num_waiting == 4 and sched.num_running == 2
    sched.check_invariants()
    adm = Admissions(sched)
    done = adm.drain(model)
    assert adm.order == ["r0", "r1", "a", "b", "c", "p"]
    check_outputs(done, *seqs, p)
    assert sched.block_manager.num_free_blocks == 64


def test_landing_when_a_slot_just_freed_does_not_overtake_the_waiting():
    rng = random.Random(2)
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=1)
    model = FakeModel(sched)
    r0, a, b = (arrive(sched, sid, n, rng) for sid, n in (("r0", 2), ("a", 3), ("b", 3)))
    land(sched, model, r0)
    land(sched, model, a)  # full: a waits
    adm = Admissions(sched)
    _, finished = step(sched, model)  # r0 decodes its last token: its slot is free now
    assert [s.seq_id for s in finished] == ["r0"] and sched.num_running == 0
    assert land(sched, model, b).status is SequenceStatus.WAITING  # behind a, not before
    out = sched.schedule()
    assert [c.seq_id for c in out.chunks] == ["a"]
    sched.update(out, model.execute(out))
    adm.see()
    done = adm.drain(model)
    assert adm.order == ["r0", "a", "b"]
    check_outputs(done, a, b)


def test_abort_of_a_landed_sequence_frees_its_blocks_and_keeps_the_order():
    rng = random.Random(3)
    sched, model, p = full_decoder(rng)
    a, b, c = (arrive(sched, sid, 4, rng) for sid in "abc")
    for s in (a, b, c):
        land(sched, model, s)
    free, held = sched.block_manager.num_free_blocks, len(b.block_ids)
    assert held > 0 and sched.abort("b") and not sched.abort("b")
    assert b.status is SequenceStatus.FINISHED_ABORTED and not b.block_ids
    assert sched.block_manager.num_free_blocks == free + held and sched.get("b") is None
    assert sched.num_waiting == 3
    sched.check_invariants()
    adm = Admissions(sched)
    done = adm.drain(model)
    assert adm.order == ["r0", "r1", "a", "c", "p"]
    check_outputs(done, a, c, p)
    assert sched.block_manager.num_free_blocks == 64


def test_a_landed_sequence_that_its_first_token_ends_never_waits():
    rng = random.Random(4)
    sched, model, p = full_decoder(rng)
    a = arrive(sched, "a", 4, rng)
    land(sched, model, a)  # waits for a slot
    free = sched.block_manager.num_free_blocks
    one = arrive(sched, "one", 1, rng)  # max_tokens 1: token 0 is its last
    stop = Sequence("stop", rand_prompt(rng, 5), SamplingParams(max_tokens=4))
    assert sched.reserve_remote(stop) is not None
    assert land(sched, model, one).finish_reason == "length"
    assert land(sched, model, stop, first=EOS).finish_reason == "stop"
    for s in (one, stop):
        assert s.is_finished and not s.block_ids and sched.get(s.seq_id) is None
    assert sched.block_manager.num_free_blocks == free and sched.num_waiting == 2
    sched.check_invariants()
    adm = Admissions(sched)
    adm.drain(model)
    assert adm.order == ["r0", "r1", "a", "p"]


def test_overlap_plans_no_step_ahead_while_a_landed_sequence_could_join():
    rng = random.Random(5)
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2)
    model = FakeModel(sched)
    r0, r1, a = (arrive(sched, sid, n, rng) for sid, n in (("r0", 9), ("r1", 9), ("a", 9)))
    for s in (r0, r1, a):
        land(sched, model, s)
    out = sched.schedule()
    ahead = sched.schedule_ahead(out)  # full: a cannot join anyway
    assert ahead is not None and [c.seq_id for c in ahead.chunks] == ["r0", "r1"]
    sched.update(out, model.execute(out))
    assert sched.abort("r0") and sched.num_running == 1 and sched.num_waiting == 1
    assert sched.schedule_ahead(ahead) is None  # a slot is free: a joins, synchronously
    out = sched.schedule()
    assert [c.seq_id for c in out.chunks] == ["r1", "a"]


@pytest.mark.parametrize("seed", range(6))
def test_random_remote_workload_admits_landed_in_order(seed):
    """Arrivals, landings, prompts and aborts at random under block pressure (preemption):
    every landed sequence first runs in landing order, and everything drains."""
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=3, eos_token_ids=(EOS,),
                           max_num_batched_tokens=16)
    model = FakeModel(sched)
    adm = Admissions(sched)
    pending: list[Sequence] = []
    landed: list[str] = []  # landing order of those that did not end at token 0
    done: dict[str, Sequence] = {}
    for i in range(120):
        r = rng.random()
        if r < 0.3:
            seq = Sequence(f"x{i}", rand_prompt(rng, rng.randrange(2, 12)),
                           SamplingParams(max_tokens=rng.randrange(1, 10)))
            if sched.reserve_remote(seq) is not None:
                pending.append(seq)
        elif r < 0.55 and pending:
            seq = pending.pop(rng.randrange(len(pending)))
            if not land(sched, model, seq).is_finished:
                landed.append(seq.seq_id)
            adm.see()
        elif r < 0.62:
            sched.add(Sequence(f"p{i}", rand_prompt(rng, rng.randrange(2, 12)),
                               SamplingParams(max_tokens=rng.randrange(1, 6))))
        elif r < 0.67 and (sched.landed or sched.running):
            sched.abort(rng.choice([*sched.landed, *sched.running]))
        else:
            _, finished = step(sched, model)
            adm.see()
            done.update((s.seq_id, s) for s in finished)
        sched.check_invariants()
    for seq in pending:
        land(sched, model, seq)
        landed.append(seq.seq_id)
    done.update(adm.drain(model))
    ran = set(adm.order)
    assert [sid for sid in adm.order if sid.startswith("x")] == [s for s in landed if s in ran]
    assert sched.block_manager.num_free_blocks == 24
    for s in done.values():
        if s.finish_reason in ("stop", "length"):
            assert s.output_token_ids == reference(s.prompt_token_ids, s.params)

"""Scheduler on CPU with a fake model that really reads its context through the block tables.

FakeModel writes each scheduled token into a simulated KV pool at the slot given by the
chunk's block table, then "attends" by reading the whole context back through the block
table and hashing it into the next token. A wrong block table, a bad prefix-cache hit or
a broken recompute therefore changes the generated tokens, which the tests compare with
a reference computed directly from the prompt.
"""

from __future__ import annotations

import random
from array import array

import pytest
import xxhash

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput, make_scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus

EOS = 0
VOCAB = 40


def next_token(context: list[int]) -> int:
    return xxhash.xxh32_intdigest(array("q", context).tobytes()) % VOCAB


def reference(prompt: list[int], params: SamplingParams, max_model_len: int = 10**9) -> list[int]:
    ctx, out = list(prompt), []
    while True:
        t = next_token(ctx)
        ctx.append(t)
        out.append(t)
        if (t == EOS and not params.ignore_eos) or t in params.stop_token_ids:
            return out
        if len(out) >= params.max_tokens or len(ctx) >= max_model_len:
            return out


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[int, int] = {}  # slot -> token id

    def slot(self, block_ids: list[int], pos: int) -> int:
        bs = self.sched.block_size
        return block_ids[pos // bs] * bs + pos % bs

    def write(self, block_ids: list[int], start: int, tokens: list[int]) -> None:
        bm = self.sched.block_manager
        for k, t in enumerate(tokens):
            b = block_ids[(start + k) // self.sched.block_size]
            assert bm.refcount(b) == 1, "wrote into a shared block"
            self.kv[self.slot(block_ids, start + k)] = t

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for c in out.chunks:
            assert len(c.block_ids) * self.sched.block_size >= c.start_pos + c.num_tokens
            self.write(c.block_ids, c.start_pos, c.token_ids)
        sampled = {}
        for c in out.chunks:
            if c.sample:
                end = c.start_pos + c.num_tokens
                sampled[c.seq_id] = next_token([self.kv[self.slot(c.block_ids, p)] for p in range(end)])
        return sampled


def step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
    assert out.num_batched_tokens <= sched.cfg.max_num_batched_tokens
    finished = sched.update(out, model.execute(out))
    sched.check_invariants()
    return out, finished


def drain(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> dict[str, Sequence]:
    done: dict[str, Sequence] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return done
        _, finished = step(sched, model)
        done.update((s.seq_id, s) for s in finished)
    raise AssertionError("scheduler did not drain")


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def test_decode_outputs_match_reference():
    sched = make_scheduler(num_blocks=64, block_size=4, eos_token_ids=(EOS,))
    model, rng = FakeModel(sched), random.Random(0)
    prompts = {f"r{i}": rand_prompt(rng, rng.randrange(1, 20)) for i in range(8)}
    params = SamplingParams(max_tokens=12)
    for sid, p in prompts.items():
        sched.add(Sequence(sid, p, params))
    done = drain(sched, model)
    for sid, p in prompts.items():
        assert done[sid].output_token_ids == reference(p, params)
        assert done[sid].finish_reason in ("stop", "length")
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks


def test_long_prompt_is_chunked_and_samples_only_on_last_chunk():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=32)
    model = FakeModel(sched)
    prompt = list(range(1, 101))
    sched.add(Sequence("long", prompt, SamplingParams(max_tokens=3, ignore_eos=True)))
    chunks = []
    while sched.has_unfinished():
        out, _ = step(sched, model)
        chunks += out.chunks
    assert [c.num_tokens for c in chunks] == [32, 32, 32, 4, 1, 1]
    assert [c.start_pos for c in chunks] == [0, 32, 64, 96, 100, 101]
    assert [c.sample for c in chunks] == [False, False, False, True, True, True]
    assert [c.output_index for c in chunks if c.sample] == [0, 1, 2]
    assert sum((c.token_ids for c in chunks[:4]), []) == prompt


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make_scheduler(num_blocks=256, block_size=4, max_num_batched_tokens=20, max_num_seqs=3)
    model, rng = FakeModel(sched), random.Random(1)
    for i in range(10):
        sched.add(Sequence(f"r{i}", rand_prompt(rng, rng.randrange(5, 30)),
                           SamplingParams(max_tokens=5, ignore_eos=True)))
    saw_full_budget = False
    while sched.has_unfinished():
        out, _ = step(sched, model)  # step() asserts the budget
        assert len(out.chunks) <= 3 and sched.num_running <= 3
        saw_full_budget |= out.num_batched_tokens == 20
    assert saw_full_budget


def test_long_prefill_threshold_caps_chunks():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64,
                           long_prefill_threshold=8)
    sched.add(Sequence("a", list(range(1, 21)), SamplingParams(max_tokens=1)))
    out = sched.schedule()
    assert [c.num_tokens for c in out.chunks] == [8]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preemption_under_pressure_still_finishes_everything(seed):
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    model, rng = FakeModel(sched), random.Random(seed)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = {f"r{i}": rand_prompt(rng, rng.randrange(1, 12)) for i in range(6)}
    for sid, p in prompts.items():
        sched.add(Sequence(sid, p, params))
    preempted, done = [], {}
    while sched.has_unfinished():
        out, finished = step(sched, model)
        preempted += out.preempted
        done.update((s.seq_id, s) for s in finished)
    assert preempted, "the pool was meant to be too small for everyone"
    assert any(s.num_preemptions for s in done.values())
    for sid, p in prompts.items():
        assert done[sid].num_output_tokens == 20 and done[sid].finish_reason == "length"
        assert done[sid].output_token_ids == reference(p, params)
    assert sched.block_manager.num_free_blocks == 12


def test_preempted_sequence_recomputes_prompt_and_outputs():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64,
                           enable_prefix_caching=False)
    model = FakeModel(sched)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    sched.add(Sequence("old", [1, 2, 3, 4, 5], params))
    sched.add(Sequence("new", [6, 7, 8, 9, 10], params))
    while True:
        out, _ = step(sched, model)
        if out.preempted:
            break
    assert out.preempted == ["new"]
    new = sched.waiting["new"]
    assert new.status is SequenceStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.block_ids == [] and new.num_output_tokens > 0
    outputs = new.output_token_ids
    while "new" not in sched.running:
        step(sched, model)
    # once readmitted it is recomputed from position 0 over prompt + outputs so far
    done = drain(sched, model)
    assert done["new"].output_token_ids[:len(outputs)] == outputs
    assert done["new"].output_token_ids == reference([6, 7, 8, 9, 10], params)


def test_prefix_cache_hit_through_the_scheduler():
    sched = make_scheduler(num_blocks=32, block_size=4)
    model = FakeModel(sched)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks + 2
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    sched.add(Sequence("a", prompt, params))
    step(sched, model)
    b = Sequence("b", prompt, params)
    sched.add(b)
    out, _ = step(sched, model)
    (chunk,) = [c for c in out.chunks if c.seq_id == "b"]
    assert b.num_cached_tokens == 12 and chunk.start_pos == 12 and chunk.token_ids == [13, 14]
    a = sched.running["a"]
    shared = set(a.block_ids[:3])
    assert shared == set(b.block_ids[:3])
    assert all(sched.block_manager.refcount(x) == 2 for x in shared)
    done = drain(sched, model)
    assert done["a"].output_token_ids == done["b"].output_token_ids == reference(prompt, params)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_workload_with_aborts(seed):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=rng.choice([8, 16, 64]),
                           max_num_seqs=rng.choice([2, 4, 8]), eos_token_ids=(EOS,))
    model = FakeModel(sched)
    shared = [rand_prompt(rng, rng.randrange(1, 10)) for _ in range(3)]
    expected, aborted, done, n = {}, set(), {}, 0
    for _ in range(300):
        if rng.random() < 0.3:
            prompt = rng.choice(shared) + rand_prompt(rng, rng.randrange(0, 8))
            params = SamplingParams(max_tokens=rng.randrange(1, 16), ignore_eos=rng.random() < 0.3)
            sid = f"r{n}"
            n += 1
            sched.add(Sequence(sid, prompt, params))
            expected[sid] = reference(prompt, params)
        if rng.random() < 0.1 and expected:
            sid = rng.choice(list(expected))
            if sid not in done and sched.abort(sid):
                aborted.add(sid)
            sched.check_invariants()
        _, finished = step(sched, model)
        done.update((s.seq_id, s) for s in finished)
    for sid in list(sched.waiting)[::2]:
        assert sched.abort(sid)
        aborted.add(sid)
    done.update(drain(sched, model))
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_total_blocks
    for sid, want in expected.items():
        if sid not in aborted:
            assert done[sid].output_token_ids == want, sid
    assert not sched.abort("nope")


def test_abort_frees_blocks_everywhere():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=1)
    model = FakeModel(sched)
    params = SamplingParams(max_tokens=5)
    sched.add(Sequence("run", [1, 2, 3], params))
    sched.add(Sequence("wait", [4, 5, 6], params))
    step(sched, model)
    assert sched.reserve_remote(Sequence("remote", [7] * 9, params)) is not None
    sched.add(Sequence("pre", [8, 9], params, prefill_only=True))
    for sid in ("run", "wait", "remote"):
        assert sched.abort(sid)
        sched.check_invariants()
    drain(sched, model)
    assert sched.held_blocks("pre")
    assert sched.abort("pre") and not sched.abort("pre")
    sched.check_invariants()
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()


def test_add_rejects_requests_that_can_never_fit():
    sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=24)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(Sequence("a", [1] * 20, SamplingParams(max_tokens=5)))
    sched2 = make_scheduler(num_blocks=8, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="KV pool"):
        sched2.add(Sequence("a", [1] * 30, SamplingParams(max_tokens=5)))
    sched2.add(Sequence("ok", [1] * 30, SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="already in use"):
        sched2.add(Sequence("ok", [1], SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="empty"):
        Sequence("e", [])


def test_stop_tokens_and_max_model_len():
    sched = make_scheduler(num_blocks=16, block_size=4, eos_token_ids=(EOS,))
    model = FakeModel(sched)
    prompt = [3, 1, 4]
    free_run = reference(prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    stop = free_run[4]
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop,))
    sched.add(Sequence("s", prompt, params))
    done = drain(sched, model)
    assert done["s"].output_token_ids == free_run[: free_run.index(stop) + 1]
    assert done["s"].finish_reason == "stop"
    sched3 = make_scheduler(num_blocks=16, block_size=4, max_model_len=8)
    sched3.add(Sequence("m", prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
    done = drain(sched3, FakeModel(sched3))
    assert done["m"].num_tokens == 8 and done["m"].finish_reason == "length"


def test_remote_reserve_and_admit_decodes_like_colocated():
    bs = 4
    prompt = list(range(1, 13))  # exactly 3 blocks: the first token's slot needs a 4th
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    # prefill side: prefill_only finishes after the first token and keeps its blocks
    pre = make_scheduler(num_blocks=16, block_size=bs)
    pre_model = FakeModel(pre)
    pre.add(Sequence("x", prompt, params, prefill_only=True))
    done = drain(pre, pre_model)
    x = done["x"]
    assert x.status is SequenceStatus.FINISHED_PREFILL and x.finish_reason == "prefill_done"
    src = pre.held_blocks("x")
    assert len(src) == 3 and pre.block_manager.num_free_blocks == 13
    # decode side
    dec = make_scheduler(num_blocks=8, block_size=bs)
    dec_model = FakeModel(dec)
    seq = Sequence("x", prompt, params)
    dst = dec.reserve_remote(seq)
    assert dst is not None and len(dst) == 3
    assert seq.status is SequenceStatus.WAITING_FOR_REMOTE_KVS and dec.block_manager.num_free_blocks == 4
    assert dec.schedule().chunks == []  # nothing runs before the KV arrives
    dec.check_invariants()
    for pos in range(len(prompt)):  # the "transfer": copy block contents src -> dst
        dec_model.kv[dec_model.slot(dst, pos)] = pre_model.kv[pre_model.slot(src, pos)]
    assert pre.release("x") and not pre.release("x")
    assert pre.block_manager.num_free_blocks == 16
    admitted = dec.admit_remote("x", x.output_token_ids[0])
    assert admitted.status is SequenceStatus.RUNNING
    out = dec.schedule()
    (c,) = out.chunks
    assert (c.start_pos, c.token_ids, c.sample, c.output_index) == (12, x.output_token_ids, True, 1)
    dec.update(out, dec_model.execute(out))
    done = drain(dec, dec_model)
    assert done["x"].output_token_ids == reference(prompt, params)
    assert dec.block_manager.num_free_blocks == 8


def test_remote_reserve_refuses_without_room_and_admit_edge_cases():
    dec = make_scheduler(num_blocks=4, block_size=4, eos_token_ids=(EOS,), max_num_seqs=1)
    a = Sequence("a", [1] * 3, SamplingParams(max_tokens=4))
    b = Sequence("b", [2] * 3, SamplingParams(max_tokens=1))
    c = Sequence("c", [3] * 3, SamplingParams(max_tokens=4))
    d = Sequence("d", [4] * 3, SamplingParams(max_tokens=4))
    for s in (a, b, c):
        assert dec.reserve_remote(s) is not None
    assert dec.reserve_remote(d) is not None
    assert dec.reserve_remote(Sequence("big", [1] * 5, SamplingParams(max_tokens=1))) is None
    assert dec.block_manager.num_free_blocks == 0 and dec.abort("d")
    assert dec.admit_remote("b", 7).finish_reason == "length"  # max_tokens == 1
    assert dec.admit_remote("c", EOS).finish_reason == "stop"
    assert dec.block_manager.num_free_blocks == 3
    dec.check_invariants()
    with pytest.raises(KeyError):
        dec.admit_remote("c", 1)
    assert dec.reserve_remote(d) is not None
    model = FakeModel(dec)
    for s in (a, d):  # the "transfer" of the prompts' KV
        model.write(s.block_ids, 0, s.prompt_token_ids)
    dec.admit_remote("a", 5)
    dec.admit_remote("d", 5)  # max_num_seqs == 1: waits for a slot, holding its blocks
    assert a.status is SequenceStatus.RUNNING and d.status is SequenceStatus.WAITING
    dec.check_invariants()
    done = drain(dec, model)
    assert done["a"].num_output_tokens >= 1 and done["d"].num_output_tokens >= 1
    assert dec.block_manager.num_free_blocks == 4


def test_prefill_only_hits_prefix_cache_after_release():
    pre = make_scheduler(num_blocks=16, block_size=4)
    model = FakeModel(pre)
    prompt = list(range(1, 11))
    pre.add(Sequence("a", prompt, SamplingParams(max_tokens=8), prefill_only=True))
    drain(pre, model)
    assert pre.block_manager.num_free_blocks == 13
    assert pre.release("a")
    b = Sequence("b", prompt, SamplingParams(max_tokens=8), prefill_only=True)
    pre.add(b)
    drain(pre, model)
    assert b.num_cached_tokens == 8 and b.output_token_ids == reference(prompt, SamplingParams())[:1]

"""End to end on CPU (tiny preset, fp32): batching, chunked prefill, preemption and prefix
caching never change outputs; seeded sampling is batch-independent; bad input gives clear
errors; the KV pool is fully free once requests finish or are aborted."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.llm import LLM

PROMPT_LENS = (3, 11, 26, 37)
MAX_TOKENS = (20, 14, 9, 16)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                        ignore_eos=True)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(21)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def solo_llm() -> LLM:
    """Roomy pool, big budget, no prefix cache: each prompt is run alone on it."""
    return LLM("tiny", block_size=4, num_blocks=256, enable_prefix_caching=False)


def assert_pool_free(engine: LLMEngine) -> None:
    stats = engine.kv_stats()
    assert stats["free_blocks"] == stats["total_blocks"], stats
    assert stats["running"] == stats["waiting"] == 0 and not engine.has_unfinished()
    engine.scheduler.check_invariants()


def run_to_completion(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]):
    """Step the engine by hand; returns (sequences, preempted ids, chunked-prefill steps)."""
    seqs = [engine.add_request(p, sp) for p, sp in requests]
    preempted: list[str] = []
    partial_chunks = 0
    while engine.has_unfinished():
        out = engine.schedule()
        preempted += out.preempted
        partial_chunks += sum(1 for c in out.chunks if c.num_tokens > 1 and not c.sample)
        engine.run(out)
        engine.scheduler.check_invariants()
    return seqs, preempted, partial_chunks


def test_chunked_prefill_and_preemption_match_solo_runs(prompts, solo_llm) -> None:
    solo = [solo_llm.generate(p, greedy(n))[0].token_ids for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    assert [len(s) for s in solo] == list(MAX_TOKENS)

    # 8-token budget forces chunked prefill; 16 blocks of 4 hold 64 of the 136 tokens needed.
    llm = LLM("tiny", block_size=4, num_blocks=16, max_num_batched_tokens=8)
    seqs, preempted, partial = run_to_completion(
        llm.engine, [(p, greedy(n)) for p, n in zip(prompts, MAX_TOKENS, strict=True)])
    assert partial > 0, "no prompt was chunked"
    assert preempted and sum(s.num_preemptions for s in seqs) == len(preempted)
    assert [s.output_token_ids for s in seqs] == solo
    assert all(s.finish_reason == "length" for s in seqs)
    assert_pool_free(llm.engine)


def test_batched_generate_matches_solo_runs(prompts, solo_llm) -> None:
    params = [greedy(n) for n in MAX_TOKENS]
    solo = [solo_llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    outs = solo_llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == solo
    assert_pool_free(solo_llm.engine)


def test_prefix_cache_hit_gives_same_output(prompts) -> None:
    llm = LLM("tiny", block_size=4, num_blocks=64)
    prompt = prompts[3]  # 37 tokens: 9 full blocks
    first = llm.generate(prompt, greedy(12))[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(prompt, greedy(12))[0]
    assert again.num_cached_tokens == 36  # every full block; the last token is recomputed
    assert again.token_ids == first.token_ids
    # a longer prompt sharing the prefix, batched with an unrelated one
    longer = prompt + first.token_ids[:5]
    outs = llm.generate([longer, prompts[1]], greedy(6))
    assert outs[0].num_cached_tokens >= 36
    miss = LLM("tiny", block_size=4, num_blocks=64, enable_prefix_caching=False)
    assert outs[0].token_ids == miss.generate(longer, greedy(6))[0].token_ids
    assert_pool_free(llm.engine)


def test_seeded_sampling_is_batch_independent(prompts, solo_llm) -> None:
    prompt = prompts[2]
    alone = solo_llm.generate(prompt, SEEDED)[0].token_ids
    assert len(alone) == 16
    # batched with greedy and unseeded neighbours, under chunking and preemption
    llm = LLM("tiny", block_size=4, num_blocks=16, max_num_batched_tokens=8)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([prompts[0], prompt, prompts[3], prompts[1]],
                        [greedy(8), SEEDED, unseeded, SEEDED])
    assert outs[1].token_ids == alone
    assert outs[3].token_ids == solo_llm.generate(prompts[1], SEEDED)[0].token_ids
    other_seed = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=4321, max_tokens=16,
                                ignore_eos=True)
    assert solo_llm.generate(prompt, other_seed)[0].token_ids != alone
    assert_pool_free(llm.engine)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -3}, "seed"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_give_clear_errors(prompts) -> None:
    llm = LLM("tiny", block_size=4, num_blocks=64, max_model_len=64)
    ok = greedy(4)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], ok)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", ok)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate([1] * 70, ok)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate([1] * 60, greedy(10))  # prompt fits, prompt + max_tokens does not
    with pytest.raises(ValueError, match=r"out of range \[0, 384\)"):
        llm.generate([1, 2, 384], ok)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([1, -2], ok)
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 prompts"):
        llm.generate(prompts[:3], [ok, ok])
    assert_pool_free(llm.engine)
    assert len(llm.generate(prompts[0], ok)[0].token_ids) == 4  # still usable


def test_bad_prompt_in_a_batch_leaves_nothing_queued(prompts) -> None:
    llm = LLM("tiny", block_size=4, num_blocks=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([prompts[0], []], greedy(4))
    assert not llm.engine.has_unfinished(), "the good prompt before the bad one stayed queued"


def test_pool_free_after_aborts(prompts) -> None:
    llm = LLM("tiny", block_size=4, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=2)
    engine = llm.engine
    seqs = [engine.add_request(p, greedy(30)) for p in prompts]
    for _ in range(6):  # some prefill, some decode; max_num_seqs=2 keeps others waiting
        engine.step()
    assert engine.kv_stats()["free_blocks"] < engine.kv_stats()["total_blocks"]
    assert engine.kv_stats()["waiting"] > 0
    assert engine.abort(seqs[0].seq_id) and engine.abort(seqs[3].seq_id)  # running, waiting
    assert not engine.abort("no-such-request")
    engine.scheduler.check_invariants()
    while engine.has_unfinished():
        engine.step()
    assert seqs[0].finish_reason == seqs[3].finish_reason == "abort"
    assert seqs[1].finish_reason == seqs[2].finish_reason == "length"
    assert_pool_free(engine)
    # abort everything mid-flight
    seqs = [engine.add_request(p, greedy(30)) for p in prompts]
    for _ in range(3):
        engine.step()
    for s in seqs:
        assert engine.abort(s.seq_id)
    assert_pool_free(engine)


def test_warm_up_runs_prefill_and_decode_and_leaves_the_pool_free(prompts, solo_llm) -> None:
    llm = LLM(model="tiny", num_blocks=64)
    steps = llm.engine.warm_up(prompt_lens=(5, 40), decode_steps=2)
    assert steps >= 3  # one prefill step, then two decode steps at least
    assert_pool_free(llm.engine)
    # and the engine serves as before
    want = solo_llm.generate(prompts[0], greedy(4))[0].token_ids
    assert llm.generate(prompts[0], greedy(4))[0].token_ids == want

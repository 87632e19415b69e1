"""A migrated request's continuation (Sequence.output_offset): prompt + the outputs already
streamed, prefilled anew, gives the same remaining tokens as the undisturbed run, greedy and
seeded (the output index and max_tokens carry over)."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny")


def _continue(llm: LLM, prompt: list[int], done: list[int], params: SamplingParams) -> list[int]:
    eng = llm.engine
    seq = eng.make_sequence(prompt + done, params, output_offset=len(done))
    eng.scheduler.add(seq)
    while eng.has_unfinished():
        eng.step()
    assert seq.finish_reason == "length"
    return seq.output_token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, top_k=40, seed=7, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_continuation_equals_undisturbed_run(llm, params):
    prompt = [(5 * i + 3) % 250 for i in range(21)]
    full = llm.generate(prompt, params)[0].token_ids
    assert len(full) == 14
    for k in (1, 6, 13):
        assert full[:k] + _continue(llm, prompt, full[:k], params) == full, k


def test_continuation_validation(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="output_offset"):
        eng.make_sequence([1, 2], SamplingParams(max_tokens=4), output_offset=2)
    seq = eng.make_sequence([1, 2, 3], SamplingParams(max_tokens=2), output_offset=2)
    with pytest.raises(ValueError, match="already reached max_tokens"):
        eng.scheduler.validate(seq)

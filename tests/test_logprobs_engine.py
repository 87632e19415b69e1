"""Logprobs in the engine: the sampler's against torch.log_softmax of the same logits, tokens
unchanged when logprobs are asked for, nothing computed when nobody asks, limits, LLM."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine import sampler as sampler_mod
from pdserve.engine.sampler import Sampler, compute_logprobs

V = 300


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3.0


MIXED = [SamplingParams(temperature=0.0, logprobs=5),
         SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=0),
         SamplingParams(temperature=1.3, top_k=20, seed=8),  # does not ask
         SamplingParams(temperature=0.5, logprobs=20)]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    x = logits(4)
    out = Sampler(seed=1).sample_output(x, MIXED, [0, 1, 2, 3], ["a", "b", "c", "d"])
    ref = torch.log_softmax(x, dim=-1)
    assert set(out.logprobs) == {"a", "b", "d"}  # "c" did not ask
    for row, sid in ((0, "a"), (1, "b"), (3, "d")):
        lp, k = out.logprobs[sid], MIXED[row].logprobs
        tok = out.tokens[sid]
        assert lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-5)
        want_v, want_i = ref[row].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert lp.top_ids == want_i.tolist() and len(lp.top_ids) == k
        assert lp.top_logprobs == pytest.approx(want_v.tolist(), abs=1e-5)
    # greedy: the sampled token is the most likely one, with the same logprob
    assert out.logprobs["a"].top_ids[0] == out.tokens["a"]
    assert out.logprobs["a"].top_logprobs[0] == pytest.approx(out.logprobs["a"].logprob)


def test_asking_for_logprobs_never_changes_the_tokens():
    x = logits(64, seed=3)
    plain = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=s)
             for t, p, k, s in zip([0.0, 0.7, 1.0, 1.5] * 16, [1.0, 0.9, 0.5, 1.0] * 16,
                                   [0, 0, 10, 50] * 16, range(64))]
    asking = [SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                             seed=p.seed, logprobs=i % 4) for i, p in enumerate(plain)]
    idx = list(range(64))
    assert Sampler().sample(x, asking, idx) == Sampler().sample(x, plain, idx)
    ids = [str(i) for i in idx]
    a = Sampler().sample_output(x, asking, idx, ids)
    b = Sampler().sample_output(x, plain, idx, ids)
    assert a.tokens == b.tokens and len(a.logprobs) == 64 and not b.logprobs


def test_no_logprob_work_when_nobody_asks(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("logprobs computed for a batch where nobody asked")
    monkeypatch.setattr(sampler_mod, "compute_logprobs", boom)
    out = Sampler().sample_output(logits(3), [SamplingParams(temperature=0.0)] * 3, [0, 0, 0],
                                  ["x", "y", "z"])
    assert out.logprobs == {} and len(out.tokens) == 3


def test_k_larger_than_the_vocabulary_is_capped():
    x = logits(1)[:, :4]
    (lp,) = compute_logprobs(x, [SamplingParams(logprobs=20)], [2])
    assert len(lp.top_ids) == 4 and sorted(lp.top_ids) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_sampling_params_refuse_bad_logprobs(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny")


def test_llm_generate_logprobs(llm):
    prompt = [5, 17, 99, 3, 42, 8, 61]
    base = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = llm.generate(prompt, base)[0]
    got = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                              logprobs=3))[0]
    assert plain.logprobs is None
    assert got.token_ids == plain.token_ids and len(got.logprobs) == 6
    for tok, lp in zip(got.token_ids, got.logprobs):
        assert lp.top_ids[0] == tok and lp.logprob == pytest.approx(lp.top_logprobs[0])
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True) and lp.logprob <= 0
    with pytest.raises(ValueError, match="at most 20"):
        llm.generate(prompt, SamplingParams(logprobs=21))
    assert llm.engine.kv_stats()["running"] == 0


def test_cli_local_json_prints_logprobs(llm, capsys):
    import argparse
    import json

    from pdserve.generate_cli import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--local", "--model", "tiny", "--prompt-ids", "5,17,99",
                                  "--max-tokens", "3", "--temperature", "0", "--ignore-eos",
                                  "--json", "--logprobs", "2"])) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = llm.generate([5, 17, 99], SamplingParams(max_tokens=3, temperature=0.0,
                                                    ignore_eos=True, logprobs=2))[0]
    assert got["token_ids"] == want.token_ids and len(got["logprobs"]) == 3
    for g, w, t in zip(got["logprobs"], want.logprobs, want.token_ids):
        assert g["token_id"] == t and g["logprob"] == pytest.approx(w.logprob, abs=1e-5)
        assert [i for i, _ in g["top"]] == w.top_ids

"""Capstone workloads: length distributions, ShareGPT parsing, seeds, arrivals and burstiness."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest

from pdserve.benchmarks import capstone_workloads as cw


def test_fixed_and_uniform_lengths() -> None:
    rng = random.Random(0)
    w = cw.parse_workload("fixed:in=100,out=20")
    assert {w.sample(rng) for _ in range(20)} == {(100, 20)}
    u = cw.parse_workload("uniform:in=10-20,out=3-5")
    pairs = [u.sample(rng) for _ in range(500)]
    assert {i for i, _ in pairs} == set(range(10, 21)) and {o for _, o in pairs} == {3, 4, 5}


@pytest.mark.parametrize("bad", ["nope", "fixed:in", "fixed:in=0", "uniform:in=9-3",
                                 "fixed:foo=1", "sharegpt:x.json"])
def test_bad_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        cw.parse_workload(bad)


def test_heavy_mixes_lean_the_right_way() -> None:
    rng = random.Random(1)
    pre = [cw.parse_workload("prefill-heavy").sample(rng) for _ in range(200)]
    dec = [cw.parse_workload("decode-heavy").sample(rng) for _ in range(200)]
    assert all(i > 4 * o for i, o in pre) and all(o > 4 * i for i, o in dec)


def test_sharegpt_synth_matches_its_lognormal() -> None:
    w = cw.sharegpt_synth(max_in=10**9, max_total=10**9)
    pairs = cw.length_pairs(w, 20000, seed=3)
    ins = [i for i, _ in pairs]
    assert statistics.mean(ins) == pytest.approx(cw.SHAREGPT_MEAN_IN, rel=0.08)
    mu, sigma = cw.fit_lognormal(ins)
    assert mu == pytest.approx(cw.lognormal_mu(cw.SHAREGPT_MEAN_IN, cw.SHAREGPT_SIGMA_IN), abs=0.05)
    assert sigma == pytest.approx(cw.SHAREGPT_SIGMA_IN, abs=0.05)
    clipped = cw.length_pairs(cw.parse_workload("sharegpt-synth"), 5000, seed=3)
    assert all(4 <= i <= 1024 and i + o <= 2048 and o >= 1 for i, o in clipped)


def test_shared_prefix_requests_share_exactly_the_prefix() -> None:
    w = cw.parse_workload("shared-prefix:prefix=32,suffix=4-8,out=3")
    reqs = cw.make_requests(w, 20, 5.0, seed=2, vocab=1000)
    prefix = reqs[0].prompt[:32]
    assert all(r.prompt[:32] == prefix and 36 <= len(r.prompt) <= 40 for r in reqs)
    assert len({tuple(r.prompt[32:]) for r in reqs}) == 20


def test_requests_are_deterministic_per_seed_and_clipped() -> None:
    w = cw.parse_workload("uniform:in=8-64,out=4-16")
    a = cw.make_requests(w, 50, 4.0, seed=7, vocab=100)
    assert a == cw.make_requests(w, 50, 4.0, seed=7, vocab=100)
    assert a != cw.make_requests(w, 50, 4.0, seed=8, vocab=100)
    assert all(0 < t < 100 for r in a for t in r.prompt)
    # the same seed gives the same lengths at another rate (only arrivals change)
    b = cw.make_requests(w, 50, 8.0, seed=7, vocab=100)
    assert [r.prompt for r in a] == [r.prompt for r in b] and a[5].at_s != b[5].at_s
    short = cw.make_requests(w, 50, 4.0, seed=7, vocab=100, max_model_len=40)
    assert all(len(r.prompt) + r.output_len <= 40 for r in short)


def _block_hashes(prompt: list[int], block: int = 16) -> set[int]:
    """The prefix cache's keys of the prompt's full blocks (engine/block_manager.py)."""
    from pdserve.engine.block_manager import hash_block

    out, h = set(), 0
    for i in range(len(prompt) // block):
        h = hash_block(h, prompt[i * block:(i + 1) * block])
        out.add(h)
    return out


@pytest.mark.parametrize("spec", ["uniform:in=40-200,out=4-16",
                                  "shared-prefix:prefix=64,suffix=8-40,out=3"])
def test_salted_runs_share_no_cached_block_with_each_other(spec: str) -> None:
    """A run's salt changes only the first token of each prompt, and with it every block
    hash: the next run of a search finds nothing the last one left in the prefix cache,
    while a shared prefix is still shared inside a run."""
    w = cw.parse_workload(spec)
    plain = cw.make_requests(w, 30, 4.0, seed=5, vocab=1000)
    runs = {salt: cw.make_requests(w, 30, 4.0, seed=5, vocab=1000, salt=salt)
            for salt in (1, 2, 3)}
    for reqs in runs.values():
        assert [(r.at_s, len(r.prompt), r.output_len, r.prompt[1:]) for r in reqs] == \
            [(r.at_s, len(r.prompt), r.output_len, r.prompt[1:]) for r in plain]
        assert len({r.prompt[0] for r in reqs}) == 1  # one first token per run
    cached = {salt: set().union(*(_block_hashes(r.prompt) for r in reqs))
              for salt, reqs in runs.items()}
    assert cached[1] and not (cached[1] & cached[2]) and not (cached[2] & cached[3])
    assert not cached[1] & set().union(*(_block_hashes(r.prompt) for r in plain))
    if w.prefix_len:  # inside a run, every prompt's first 4 blocks are the same ones
        first4 = [_block_hashes(r.prompt[:64]) for r in runs[2]]
        assert all(h == first4[0] and len(h) == 4 for h in first4)
    assert cw.salt_token(5, 1, 1000) != cw.salt_token(5, 2, 1000)
    assert all(1 <= cw.salt_token(s, k, 7) < 7 for s in range(4) for k in range(1, 7))


def test_gamma_arrivals_mean_and_burstiness() -> None:
    for burst in (0.25, 1.0, 4.0):
        gaps = np.diff(cw.arrival_times(40000, 10.0, burst, random.Random(5)))
        assert gaps.mean() == pytest.approx(0.1, rel=0.05)
        # gamma(k, 1/(r k)): coefficient of variation 1/sqrt(k)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burst), rel=0.08)
    assert cw.arrival_times(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        cw.arrival_times(3, 1.0, 0.0, random.Random(0))


def test_sharegpt_file(tmp_path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "hello there, how are you"},
                           {"from": "gpt", "value": "fine thanks, and you?"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "system", "value": "s"},
                           {"from": "human", "value": "tell me a story please"},
                           {"from": "gpt", "value": "once upon a time there was"},
                           {"from": "human", "value": "more"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    assert len(cw.read_sharegpt(str(path))) == 3
    encode = lambda s: [ord(c) for c in s]  # noqa: E731 - byte-ish tokenizer
    w, pool = cw.load_sharegpt(str(path), encode)
    # "hi"/"x" is dropped (< 4 tokens); output length = tokens of the first gpt turn
    assert sorted(o for _, o in pool) == [len("fine thanks, and you?"),
                                          len("once upon a time there was")]
    assert w.name == "sharegpt" and "lognormal fit" in w.describe
    reqs = cw.make_requests(w, 10, 2.0, seed=0, vocab=256, pool=pool)
    assert {len(r.prompt) for r in reqs} <= {len(p) for p, _ in pool}

"""The colocated (mixed) step profile: colocated steps rebuilt from per-request token
times, split and warm steps left out, the least-absolute-deviation fit, and the simulator's
use of the profile (benchmarks/capstone_mixed.py, planner_sim.py)."""

from __future__ import annotations

import json
import os

import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import capstone_mixed as mixed
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_records import records_path
from pdserve.benchmarks.planner_sim import simulate

MIXED = {"c0": 8.0, "c_token": 0.02, "c_token2": 0.0, "knee_tokens": 400.0}
CAL = calib.Calibration(prefill={"c0": 18.0, "c_token": 0.025, "c_token2": 0.0,
                                 "knee_tokens": 700.0},
                        decode={"c0": 5.0, "c_seq": 0.05, "c_ctx_token": 1e-4},
                        transfer={"c0": 1.0, "ms_per_byte": 0.0}, kv_bytes_per_token=1.0,
                        max_batch=256, prefill_token_budget=8192, mixed=dict(MIXED))


def colocated_run(prompts: list[int], decoders: int = 4, late: int = -1) -> list[RequestResult]:
    """One colocated worker's run as the client records it: `decoders` sequences decode
    through every step; step s >= 1 also makes token 0 of a prompt of prompts[s - 1]
    tokens (output 1), lasting decode_step_ms + mixed_ms. At step `late` one decoder's
    token reaches the client 5 ms after the others' (a step delivered in two bursts)."""
    sv = {"decode_worker": "w", "prefill_worker": "w"}
    dec = [RequestResult(0.0, 16, [], server=dict(sv), target_tokens=len(prompts) + 1)
           for _ in range(decoders)]
    out = list(dec)
    t = 0.010
    for r in dec:
        r.chunks.append((t, 1))  # step 0: their token 0
    for s, n in enumerate(prompts, start=1):
        ctx = sum(r.prompt_tokens + s for r in dec)
        t += (CAL.decode_step_ms(decoders, ctx) + CAL.mixed_ms(n, n * n)) / 1e3
        for j, r in enumerate(dec):
            r.chunks.append((t + (0.005 if s == late and j == 0 else 0.0), 1))
        out.append(RequestResult(t - 0.001, n, [(t, 1)], server=dict(sv), target_tokens=1))
    return out


PROMPTS = [30, 200, 350, 500, 800, 1200, 1600, 2400, 3000, 4000] * 3


def test_mixed_steps_rebuild_what_prompts_add_to_a_decode_step() -> None:
    pts = mixed.mixed_steps(colocated_run(PROMPTS), CAL.decode_step_ms)
    assert [t for t, _, _ in pts] == PROMPTS
    for t, _, ms in pts:
        assert ms == pytest.approx(CAL.mixed_ms(t, 0.0), abs=1e-3)


def test_a_step_delivered_in_two_bursts_and_the_next_are_left_out() -> None:
    whole = mixed.mixed_steps(colocated_run(PROMPTS), CAL.decode_step_ms)
    split = mixed.mixed_steps(colocated_run(PROMPTS, late=5), CAL.decode_step_ms)
    # step 5's late token forms its own group: it and the step after it are not whole
    assert len(split) == len(whole) - 2
    assert all(ms == pytest.approx(CAL.mixed_ms(t, 0.0), abs=1e-3) for t, _, ms in split)


def test_warm_prompts_are_left_out() -> None:
    run = colocated_run(PROMPTS)
    # the decoders were sent first (t_send 0), so warm=4+3 covers them and 3 prompts
    pts = mixed.mixed_steps(run, CAL.decode_step_ms, warm=4 + 3)
    assert [t for t, _, _ in pts] == PROMPTS[3:]


def test_fit_recovers_the_profile_and_ignores_a_long_right_tail() -> None:
    pts = mixed.mixed_steps(colocated_run(PROMPTS), CAL.decode_step_ms)
    tokens = [t for t, _, _ in pts] * 2
    ms = [m for _, _, m in pts] + [m + (40.0 if i % 3 == 0 else 0.0)  # a third delayed
                                   for i, (_, _, m) in enumerate(pts)]
    fit = mixed.fit_knee_l1(tokens, ms)
    assert fit["c0"] == pytest.approx(MIXED["c0"], abs=0.5)
    assert fit["c_token"] == pytest.approx(MIXED["c_token"], rel=0.05)
    cal = calib.Calibration(decode=CAL.decode)
    assert mixed.fit_mixed(cal, [(colocated_run(PROMPTS), 0)])
    assert cal.mixed["c_token"] == pytest.approx(MIXED["c_token"], rel=0.05)  # knee: a quantile
    assert not mixed.fit_mixed(calib.Calibration(decode=CAL.decode),
                               [(colocated_run(PROMPTS[:5]), 0)])  # too few steps


def test_mixed_ms_falls_back_and_scales() -> None:
    old = calib.Calibration(prefill=CAL.prefill, decode=CAL.decode)
    assert old.mixed == {}
    assert old.mixed_ms(1000, 0.0) == pytest.approx(
        old.prefill_ms(1000, 0.0) - old.prefill["c0"] + old.mixed_fixed_ms)
    assert CAL.scaled(1.1).mixed_ms(1000, 0.0) == pytest.approx(1.1 * CAL.mixed_ms(1000, 0.0))
    assert CAL.scaled(1.1).mixed["knee_tokens"] == MIXED["knee_tokens"]


def test_a_colocated_step_lasts_the_decode_step_plus_the_mixed_profile() -> None:
    # A decodes alone; B (1000 tokens, 2 outputs) joins: one step carries its prompt
    # beside A's decode, the next decodes both; A ends later by exactly that much
    cal = calib.Calibration(prefill=CAL.prefill, decode={"c0": 5.0, "c_seq": 0.2,
                                                         "c_ctx_token": 0.0},
                            max_batch=256, prefill_token_budget=8192, mixed=dict(MIXED))
    alone = simulate(cal, 0, 0, 1, [0.0], [(16, 50)])[0]
    a, b = simulate(cal, 0, 0, 1, [0.0, 0.05], [(16, 50), (1000, 2)])
    assert (a.end - alone.end) * 1e3 == pytest.approx(cal.mixed_ms(1000, 1e6) + 0.2)
    assert b.output == 2 and b.end > b.first > b.arrival


H200 = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                    "capstone-2gpu-h200")


@pytest.mark.skipif(records_path(H200) is None,
                    reason="the 2 x H200 run directory is not in this checkout")
def test_the_validation_refits_the_mixed_profile_of_an_older_file(tmp_path) -> None:
    from test_planner_decode import _old_format

    with open(os.path.join(H200, "results.json")) as f:
        res = json.load(f)
    # the file as the run fitted it, before the mixed profile and the decode step's sync
    # part (a re-render refits both)
    with open(os.path.join(H200, "calibration.json")) as f:
        prefill = {**json.load(f)["prefill"], "mixed_c0": 8.239}
    old = _old_format(H200, tmp_path, mixed=None, prefill=prefill, decode_fit="token1",
                      decode={"c0": 4.586, "c_seq": 0.0563, "c_ctx_token": 0.0})
    assert calib.Calibration.load(os.path.join(old, "calibration.json")).mixed == {}
    cal = calib.run_calibration(old, res)
    m = cal.mixed
    # prompts under ~400 tokens add about 8 ms to a decode step, longer ones ~0.021 ms each
    assert 6.0 < m["c0"] < 11.0 and 0.015 < m["c_token"] < 0.03
    assert cal.mixed_ms(1000, 0.0) > cal.prefill_ms(1000, 0.0) - cal.prefill["c0"] + \
        cal.mixed_fixed_ms  # the old model's 1000-token step was too short


def test_runs_that_kept_up_include_those_missing_only_tpot() -> None:
    """The mixed profile's runs: those that held the target, and those whose misses were
    not a queue (TTFT p90 within its SLO): prompt interference with decodes, what the
    profile measures. A saturated run (TTFT p90 past the SLO) stays out."""
    slos = {"ttft": 750.0, "tpot": 20.0}
    assert mixed.steady({"slo_attainment": 0.95, "p90_ttft_ms": 2000.0}, slos, 0.9)
    assert mixed.steady({"slo_attainment": 0.82, "p90_ttft_ms": 120.0}, slos, 0.9)
    assert not mixed.steady({"slo_attainment": 0.82, "p90_ttft_ms": 900.0}, slos, 0.9)
    assert not mixed.steady({"slo_attainment": 0.82, "p90_ttft_ms": 120.0}, {"tpot": 20.0}, 0.9)
    assert not mixed.steady({}, slos, 0.9)

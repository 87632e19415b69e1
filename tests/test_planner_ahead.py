"""The step the engine launches ahead (engine/step_pipeline.py, engine_loop.py): a prompt
that reaches a worker while a steady decode step runs is added only after the step
launched behind it, as the simulator models it (planner_batching.launches_ahead,
planner_sim._Decoder)."""

from __future__ import annotations

import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks.planner_batching import SimReq, launches_ahead
from pdserve.benchmarks.planner_sim import simulate

CAL = calib.Calibration(prefill={"c0": 10.0, "c_token": 0.1, "c_token2": 0.0},
                        decode={"c0": 10.0, "c_seq": 0.2, "c_ctx_token": 0.0, "c_sync": 1.0},
                        transfer={"c0": 1.0, "ms_per_byte": 0.0}, kv_bytes_per_token=1.0,
                        max_batch=64, prefill_token_budget=2048)
PREFILL_S = CAL.prefill_ms(100, 100 ** 2) / 1e3  # a lone 100-token prompt: 20 ms


def running(*left: int) -> list[SimReq]:
    """Decoding requests with `left` tokens still to make each."""
    out = []
    for n in left:
        r = SimReq(0.0, 100, 10)
        r.generated = 10 - n
        out.append(r)
    return out


def test_launches_ahead_only_for_a_steady_decode_step() -> None:
    assert launches_ahead(running(5, 3), False, False, False)
    assert not launches_ahead(running(5, 1), False, False, False)  # one ends in it by length
    assert not launches_ahead(running(5), True, False, False)  # a prompt chunk runs
    assert not launches_ahead(running(5), False, True, False)  # a prompt waits
    assert launches_ahead(running(5), False, True, True)  # ... but max_num_seqs run
    assert not launches_ahead([], False, False, False)


def test_a_prompt_arriving_during_a_steady_step_waits_for_the_one_launched_behind_it() -> None:
    """A decodes from PREFILL_S in steps of `step`; B arrives in A's second decode step,
    which is steady (A has tokens left), so the engine has launched the third: B's prompt
    runs in the fourth, beside A's decode."""
    sync = CAL.decode_step_ms(1, 0.0, sync=True) / 1e3
    step = CAL.decode_step_ms(1, 0.0) / 1e3
    arrive = PREFILL_S + sync + step / 2
    a, b = simulate(CAL, 0, 0, 1, [0.0, arrive], [(100, 20), (100, 2)])
    assert a.first == pytest.approx(PREFILL_S)
    mixed_s = (CAL.mixed_ms(100, 100 ** 2) + CAL.decode_step_ms(1, 0.0, sync=True)) / 1e3
    assert b.first == pytest.approx(PREFILL_S + sync + 2 * step + mixed_s)


def test_a_prompt_arriving_when_the_step_ends_a_sequence_joins_the_next_one() -> None:
    """A's second decode step makes its last token: the engine launches nothing ahead of
    it, so B's prompt runs right after it (alone: a prefill step)."""
    sync = CAL.decode_step_ms(1, 0.0, sync=True) / 1e3
    step = CAL.decode_step_ms(1, 0.0) / 1e3
    arrive = PREFILL_S + sync + step / 2
    a, b = simulate(CAL, 0, 0, 1, [0.0, arrive], [(100, 3), (100, 2)])
    assert a.end == pytest.approx(PREFILL_S + sync + step)
    assert b.first == pytest.approx(a.end + PREFILL_S)

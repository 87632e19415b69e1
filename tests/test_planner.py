"""`pdserve plan`: calibration fits and file format, the simulator's sanity (monotonic in
load and in resources, colocated interference), the P:D recommendation, and the
validation error computation."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import plan, plan_report
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_workloads import arrival_times
from pdserve.benchmarks.planner_metrics import sim_attainment, sim_summary
from pdserve.benchmarks.planner_setups import Setup, parse_setup, setup_name
from pdserve.benchmarks.planner_sim import SimRun, simulate, simulate_setup

CAL = calib.Calibration(prefill={"c0": 10.0, "c_token": 0.1, "c_token2": 0.0},
                        decode={"c0": 10.0, "c_seq": 0.2, "c_ctx_token": 0.0},
                        transfer={"c0": 1.0, "ms_per_byte": 1e-6}, kv_bytes_per_token=1000.0,
                        max_batch=64, prefill_token_budget=2048)
SLOS = {"ttft": 500.0, "tpot": 30.0}


def lengths(n: int = 200, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(100, 400), rng.randint(20, 60)) for _ in range(n)]


def test_parse_setup() -> None:
    assert parse_setup("1P3D") == Setup(1, 3, 0) and parse_setup("4both") == Setup(0, 0, 4)
    cond = parse_setup("1P1D-cond512")
    assert cond == Setup(1, 1, 0, 512) and cond.name == "1P1D-cond512"
    assert (cond.kind, cond.gpus, parse_setup("2P2D").kind) == ("conditional", 2, "P/D")
    assert setup_name(2, 2, 0) == "2P2D" and setup_name(0, 0, 3) == "3both"
    for bad in ("0P1D", "1P", "both", "2x2", "1P1D-cond0", "1P1D+1both+cond512"):
        with pytest.raises(ValueError):
            parse_setup(bad)


def test_single_request_latency_matches_the_profiles() -> None:
    r, = simulate(CAL, 1, 1, 0, [0.0], [(100, 3)])
    # token 0 leaves with the prefill reply, before the KV transfer (as pdserve emits it)
    ttft = CAL.prefill_ms(100, 100 ** 2)
    assert r.ttft_ms() == pytest.approx(ttft)
    # then the transfer, and tokens 1 and 2 from two decode steps (batch 1): TPOT pays it
    step1 = CAL.decode_step_ms(1, 101)
    step2 = CAL.decode_step_ms(1, 102)
    xfer = CAL.transfer_ms(100 * 1000)
    assert r.e2el_ms() == pytest.approx(ttft + xfer + step1 + step2)
    assert r.tpot_ms() == pytest.approx((xfer + step1 + step2) / 2)
    c, = simulate(CAL, 0, 0, 1, [0.0], [(100, 3)])
    assert c.ttft_ms() == pytest.approx(CAL.prefill_ms(100, 100 ** 2))


def attain(setup: tuple[int, int, int], rate: float) -> float:
    ls = lengths()
    times = arrival_times(len(ls), rate, 1.0, random.Random(1))
    return sim_attainment(simulate(CAL, *setup, times, ls), SLOS)


def test_conditional_setup_routes_by_prompt_length() -> None:
    ls = [(50, 5), (500, 5)]
    out = simulate_setup(CAL, Setup(1, 1, 0, 100), [0.0, 0.0], ls)
    # the short prompt is prefilled on the decode worker (no transfer), the long one P/D
    assert out[0].local and not out[1].local
    assert out[0].ttft_ms() == pytest.approx(CAL.prefill_ms(50, 50 ** 2))
    assert out[1].ttft_ms() == pytest.approx(CAL.prefill_ms(500, 500 ** 2))
    assert out[1].end - out[1].first > CAL.transfer_ms(500 * CAL.kv_bytes_per_token) / 1e3
    assert [r.prompt for r in out] == [50, 500]
    plain = simulate_setup(CAL, Setup(1, 1, 0), [0.0, 0.0], ls)
    assert plain[0].ttft_ms() == pytest.approx(out[0].ttft_ms())
    assert plain[0].end > out[0].end  # P/D: its tokens wait for the transfer


def test_attainment_falls_with_load_and_rises_with_gpus() -> None:
    rates = [1, 4, 16, 64]
    a = [attain((1, 1, 0), r) for r in rates]
    assert all(x >= y - 1e-9 for x, y in zip(a, a[1:])) and a[0] > 0.9 and a[-1] < 0.5
    assert attain((2, 2, 0), 16) >= attain((1, 1, 0), 16)
    assert attain((0, 0, 4), 16) >= attain((0, 0, 2), 16)


def test_colocated_prefill_stalls_decode() -> None:
    ls = lengths()
    times = arrival_times(len(ls), 8.0, 1.0, random.Random(1))
    pd = simulate(CAL, 1, 1, 0, times, ls)
    co = simulate(CAL, 0, 0, 2, times, ls)
    tpot = lambda rs: float(np.mean([r.tpot_ms() for r in rs]))  # noqa: E731
    assert tpot(co) > tpot(pd)  # decode steps of colocated workers include prefills


def test_plan_recommends_and_predictions_are_monotonic_in_gpus() -> None:
    ls = lengths(150)
    rows4 = plan.plan(CAL, 4, ls, SLOS)
    assert {r["setup"] for r in rows4} == {"1P3D", "2P2D", "3P1D", "4both"}
    goodputs = [r["predicted_goodput_rps"] for r in rows4]
    assert goodputs == sorted(goodputs, reverse=True) and goodputs[0] > 0
    best2 = plan.plan(CAL, 2, ls, SLOS)[0]["predicted_goodput_rps"]
    assert goodputs[0] >= best2
    assert len(plan.splits(64)) <= 13
    assert plan.splits(3, colocated=False) == [Setup(1, 2, 0), Setup(2, 1, 0)]


def test_validation_error() -> None:
    assert plan.validation_error(11.0, 10.0) == pytest.approx(0.1)
    assert plan.validation_error(8.0, 10.0) == pytest.approx(-0.2)
    assert math.isnan(plan.validation_error(1.0, 0.0))
    rows = [{"error": 0.1}, {"error": -0.3}, {"error": math.nan}]
    assert plan_report.mean_abs_error(rows) == pytest.approx(0.2)


def test_validate_against_a_run_directory(tmp_path) -> None:
    ls = lengths(120)
    search = plan.predict(CAL, Setup(1, 1, 0), ls, SLOS, start_rate=2.0, max_runs=5, rel_tol=0.15)
    runs = []
    for rate, _ in search.runs:  # "measured" = simulated: errors must be 0
        times = arrival_times(len(ls), rate, 1.0, random.Random(0 + 7919))
        att, good = sim_summary(simulate(CAL, 1, 1, 0, times, ls), SLOS)
        runs.append({"setup": "1P1D", "workload": "w", "request_rate": rate,
                     "request_goodput": good, "slo_attainment": att})
    doc = {"slos": SLOS, "target": 0.9, "burstiness": 1.0, "seed": 0, "runs": runs,
           "search": {"start_rate": 2.0, "max_runs": 5, "rel_tol": 0.15},
           "window": {"warmup": 0.1, "cooldown": 0.1},
           "setups": [{"setup": "1P1D", "by_workload": {"w": {
               "max_rate": search.max_rate, "lengths": ls, "bracketed": True,
               "search_runs": search.runs}}}]}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    CAL.save(str(tmp_path / "calibration.json"))
    per_run, per_search = plan.validate(str(tmp_path))
    assert len(per_run) == len(search.runs)
    assert all(r["error"] == pytest.approx(0.0) for r in per_run if not math.isnan(r["error"]))
    assert per_search[0]["error"] == pytest.approx(0.0)
    text = "\n".join(plan_report.validation_lines(per_run, per_search))
    assert "Mean |error| of goodput: 0.0%" in text


def test_calibration_fit_recovers_linear_profiles(tmp_path) -> None:
    results = []
    for i in range(40):
        n = 50 + 10 * i
        r = RequestResult(float(i), n, chunks=[(i + 0.5, 1), (i + 0.6, 1), (i + 0.7, 1),
                                                         (i + 0.8, 1)])
        r.server = {"prefill_ms": 5.0 + 0.2 * n, "kv_bytes": 2048 * n,
                    "transfer_ms": 0.5 + 1e-5 * 2048 * n, "decode_worker": "d0"}
        results.append(r)
    cal = calib.fit([results])
    assert cal.prefill["c_token"] == pytest.approx(0.2, rel=1e-3)
    assert cal.prefill["c0"] == pytest.approx(5.0, rel=1e-2)
    assert cal.transfer["ms_per_byte"] == pytest.approx(1e-5, rel=1e-3)
    assert cal.kv_bytes_per_token == 2048 and "measured" in cal.source["prefill"]
    assert "measured" in cal.source["decode"]
    path = cal.save(str(tmp_path / "c.json"))
    assert calib.Calibration.load(path).prefill == cal.prefill
    assert json.loads((tmp_path / "c.json").read_text())["format"] == calib.FORMAT
    empty = calib.fit([[]])
    assert empty.source["prefill"] == "default"


def test_nonneg_lstsq_drops_negative_terms() -> None:
    x = np.stack([np.ones(20), np.arange(20.0)], 1)
    y = 100 - 0.0 * np.arange(20.0) + np.linspace(0, -1, 20)  # slightly decreasing
    c = calib.nonneg_lstsq(x, y)
    assert c[1] == 0.0 and c[0] > 0


def test_layerwise_transfers_queue_at_the_decode_workers_receiver() -> None:
    import dataclasses

    cal = dataclasses.replace(CAL, prefill_token_budget=4096)
    # the first prompt has the worker to itself; the next two share a step of 2400 tokens,
    # pushed layer by layer
    ls = [(1200, 4)] * 3
    one = simulate(cal, 1, 1, 0, [0.0] * 3, ls)
    fwd = cal.prefill_ms(1200, 1200 ** 2) - cal.prefill["c0"]  # a prompt's share of the step
    tail = cal.transfer_ms(1200 * cal.kv_bytes_per_token)
    assert one[1].first == one[2].first  # token 0 of both with their step
    # one receiver: the third push waits for the second
    assert (one[2].landed - one[1].landed) * 1e3 == pytest.approx(fwd + tail)
    two = simulate(cal, 1, 2, 0, [0.0] * 3, ls)  # the two share no receiver
    assert two[1].landed == pytest.approx(two[2].landed)
    assert two[2].landed < one[2].landed


# -- prefill batching as prefill/batching.py and engine/scheduler.py do it --------------------
def test_batching_shares_one_step_as_the_profile_says() -> None:
    # four prompts that arrive while the worker runs a step run together in the next one,
    # of their total tokens: each costs a quarter of it, less than a step of its own (the
    # fixed part is paid once)
    out = simulate(CAL, 1, 1, 0, [0.0] + [0.001] * 4, [(400, 2)] * 5)
    alone, step = CAL.prefill_ms(400, 400 ** 2), CAL.prefill_ms(1600, 4 * 400 ** 2)
    assert out[0].ttft_ms() == pytest.approx(alone)
    assert [r.ttft_ms() for r in out[1:]] == pytest.approx([alone - 1 + step] * 4)
    assert step / 4 < alone


def test_a_prompt_past_the_budget_is_chunked_and_its_token0_waits_for_its_last_chunk() -> None:
    # two prompts queued behind a short one; budget 2048: the next step = 1500 + the first
    # 548 tokens of the second prompt, the one after = its other 952, which attend to the
    # 548 before them (n (2 s + n))
    _, a, b = simulate(CAL, 1, 1, 0, [0.0, 0.001, 0.001], [(100, 2), (1500, 2), (1500, 2)])
    s0 = CAL.prefill_ms(100, 100 ** 2)
    s1 = CAL.prefill_ms(2048, 1500 ** 2 + 548 ** 2)
    s2 = CAL.prefill_ms(952, 952 * (2 * 548 + 952))
    assert a.ttft_ms() == pytest.approx(s0 - 1 + s1)
    assert b.ttft_ms() == pytest.approx(s0 - 1 + s1 + s2)


def test_a_single_prefill_worker_saturates_where_the_profile_says() -> None:
    # full steps of 2048 tokens: 2048 / prefill_ms(2048) tokens per second, whatever the
    # prompts (chunking fills every step); past that rate the queue (and TTFT) grows
    p = 256
    cap = 2048 / (CAL.prefill_ms(2048, 8 * p ** 2) / 1e3) / p  # prompts per second
    cal = calib.Calibration(prefill=CAL.prefill,
                            decode={"c0": 0.1, "c_seq": 0.0, "c_ctx_token": 0.0},
                            transfer={"c0": 0.0, "ms_per_byte": 0.0}, kv_bytes_per_token=1.0,
                            max_batch=1024, prefill_token_budget=2048)
    n = 4000

    def served(rate: float) -> tuple[float, float]:
        times = [i / rate for i in range(n)]
        out = simulate(cal, 1, 1, 0, times, [(p, 2)] * n)
        last = max(r.first for r in out)
        return n / last, out[-1].ttft_ms()
    under, ttft_under = served(0.9 * cap)
    over, ttft_over = served(1.2 * cap)
    assert under == pytest.approx(0.9 * cap, rel=0.01) and ttft_under < 1000
    assert over == pytest.approx(cap, rel=0.02)  # served at the profile's capacity
    assert ttft_over > 10 * ttft_under  # and the rest queues
    # one-prompt steps would serve fewer: batching is what reaches `cap`
    assert 1e3 / CAL.prefill_ms(p, p ** 2) < 0.8 * cap


def test_colocated_steps_share_the_budget_with_decodes() -> None:
    # budget 2048, 48 sequences decoding: a 2048-token prompt gets 2000 tokens in that step
    cal = calib.Calibration(prefill=CAL.prefill, decode=CAL.decode, transfer=CAL.transfer,
                            kv_bytes_per_token=1.0, max_batch=256, prefill_token_budget=2048)
    ls = [(16, 400)] * 48 + [(2048, 2)]
    out = simulate(cal, 0, 0, 1, [0.0] * 48 + [1.0], ls)
    long = out[-1]
    assert long.ttft_ms() > cal.prefill_ms(2000, 2000 ** 2)  # two steps: 2000, then 48
    steps_2 = simulate(cal, 0, 0, 1, [1.0], [(2048, 2)])[0]
    assert steps_2.ttft_ms() == pytest.approx(cal.prefill_ms(2048, 2048 ** 2))


def sim_as_run(cal: calib.Calibration, setup: Setup, times, ls) -> tuple[list, SimRun]:
    """A simulated run recorded as the capstone records one: token 0 and the last token on
    the client's clock, prefill_ms and the workers as the coordinator reports them."""
    info = SimRun()
    reqs = simulate_setup(cal, setup, times, ls, info=info)
    names: dict[int, str] = {}
    out = []
    for r in reqs:
        rr = RequestResult(r.arrival, r.prompt, chunks=[(r.first, 1)] + (
            [(r.end, r.output - 1)] if r.output > 1 else []), target_tokens=r.output)
        pre = names.setdefault(id(r.pre), f"p{len(names)}")
        rr.server = {"prefill_ms": (r.first - r.scheduled) * 1e3, "prefill_worker": pre,
                     "decode_worker": f"d{id(r.dec)}", "kv_bytes": 1000 * r.prompt,
                     "transfer_ms": (r.landed - r.first) * 1e3}
        out.append(rr)
    return out, info


def test_prefill_steps_are_rebuilt_from_per_request_timings_and_fitted() -> None:
    cal = calib.Calibration(prefill={"c0": 20.0, "c_token": 0.02, "c_token2": 2e-6},
                            decode=CAL.decode, transfer=CAL.transfer, kv_bytes_per_token=1000.0,
                            max_batch=256, prefill_token_budget=4096)
    rng = random.Random(3)
    ls = [(rng.randint(256, 2048), 4) for _ in range(600)]
    times = arrival_times(len(ls), 40.0, 1.0, random.Random(4))  # loaded: batched, chunked
    results, info = sim_as_run(cal, Setup(2, 2, 0), times, ls)
    steps = calib.prefill_steps(results, budget=4096)
    assert max(t for t, _, _ in steps) == 4096  # full, chunked steps were seen
    simulated = sorted((t, round(ms, 6)) for t, ms in info.prefill_steps)
    rebuilt = sorted((t, round(ms, 6)) for t, _, ms in steps)
    assert set(rebuilt) <= set(simulated) and len(rebuilt) >= 0.9 * len(simulated)
    for t, sq, ms in steps:  # the attention term too
        assert ms == pytest.approx(cal.prefill_ms(t, sq), rel=1e-6)
    fitted = calib.fit([results], prefill_token_budget=4096)
    for k, v in cal.prefill.items():
        assert fitted.prefill[k] == pytest.approx(v, rel=1e-3)
    assert fitted.meta["prefill_fit"] == "steps" and fitted.meta["prefill_max_tokens"] == "4096"


def test_per_prompt_timing_jitter_makes_no_fake_full_steps() -> None:
    """The prompts of one step report prefill_ms a few tenths of a ms to 2 ms apart (the
    worker stamps each one); taking those for chunked prompts made steps of the whole
    budget that lasted half a full step, which pulled the fitted per-token cost down."""
    cal = calib.Calibration(prefill={"c0": 8.0, "c_token": 0.024, "c_token2": 0.0},
                            decode=CAL.decode, transfer=CAL.transfer, kv_bytes_per_token=1000.0,
                            max_batch=256, prefill_token_budget=8192)
    rng = random.Random(5)
    ls = [(rng.randint(256, 2048), 4) for _ in range(700)]
    times = arrival_times(len(ls), 60.0, 1.0, random.Random(6))
    results, _ = sim_as_run(cal, Setup(2, 2, 0), times, ls)
    for r in results:
        r.server["prefill_ms"] += rng.uniform(0.0, 2.0)
    steps = calib.prefill_steps(results, budget=8192)
    assert steps and max(t for t, _, _ in steps) <= 8192
    for t, _, ms in steps:  # every rebuilt step lasts what its tokens take, within the jitter
        assert ms == pytest.approx(cal.prefill_ms(t, 0.0), abs=2.5)
    prof, _ = calib.fit_prefill_steps(steps)
    assert prof["c_token"] == pytest.approx(0.024, rel=0.03)


def test_a_stalled_step_is_left_out_of_the_prefill_fit() -> None:
    steps = [(t, float(t * t), 10 + 0.01 * t + 1e-6 * t * t) for t in range(100, 4000, 50)]
    steps.append((1024, 1024.0 ** 2, 1500.0))  # a kernel compiled on first use
    prof, dropped = calib.fit_prefill_steps(steps)
    assert dropped == 1 and prof["c_token"] == pytest.approx(0.01, rel=1e-3)


# -- validation: the sensitivity band and the profiled range -----------------------------------
def test_edge_note_flags_predictions_that_a_small_profile_error_moves() -> None:
    assert plan.edge_note(30.0, (29.0, 31.0)) == ""
    assert plan.edge_note(30.0, (12.0, 31.0)) == "edge"
    assert plan.edge_note(0.0, (0.0, 0.0)) == "" and plan.edge_note(0.0, (0.0, 2.0)) == "edge"


def test_scaled_calibration_and_decode_range() -> None:
    slow = CAL.scaled(1.1)
    assert slow.prefill_ms(100, 1e4) == pytest.approx(1.1 * CAL.prefill_ms(100, 1e4))
    assert slow.decode_step_ms(8, 800) == pytest.approx(1.1 * CAL.decode_step_ms(8, 800))
    assert slow.transfer_ms(1e6) == pytest.approx(1.1 * CAL.transfer_ms(1e6))
    assert math.isnan(CAL.decode_max_batch)
    cal = calib.Calibration(meta={"decode_max_batch": "30.5"})
    assert cal.decode_max_batch == 30.5
    info = SimRun()
    simulate(CAL, 1, 1, 0, [i * 0.01 for i in range(200)], [(100, 60)] * 200, info=info)
    assert 1 < info.mean_decode_batch <= CAL.max_batch


def test_a_colocated_worker_runs_at_most_max_batch_sequences() -> None:
    cal = calib.Calibration(prefill=CAL.prefill, decode=CAL.decode, transfer=CAL.transfer,
                            kv_bytes_per_token=1.0, max_batch=4, prefill_token_budget=2048)
    out = simulate(cal, 0, 0, 1, [0.0] + [0.001] * 9, [(50, 20)] * 10)
    events = sorted([(r.first, 1) for r in out] + [(r.end, -1) for r in out])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    assert peak <= 4 and all(r.end > 0 for r in out)

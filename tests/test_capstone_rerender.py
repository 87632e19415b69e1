"""`pdserve bench capstone --report-from DIR`, and the planner's validation against a small
recorded run (a synthetic results.json, not GPU data)."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from pdserve.benchmarks import capstone, plan, plan_report
from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks import capstone_rerender as rr
from pdserve.benchmarks.capstone_calibration import Calibration
from pdserve.benchmarks.capstone_metrics import CUT, RequestResult, Window, summarize
from pdserve.benchmarks.capstone_workloads import arrival_times
from pdserve.benchmarks.planner_sim import simulate

CAL = Calibration(prefill={"c0": 4.0, "c_token": 0.02, "c_token2": 0.0},
                  decode={"c0": 6.0, "c_seq": 0.2, "c_ctx_token": 1e-4},
                  transfer={"c0": 2.0, "ms_per_byte": 1e-6}, kv_bytes_per_token=1000.0,
                  max_batch=64, prefill_token_budget=2048,
                  source={"prefill": "measured", "decode": "measured", "transfer": "measured"},
                  meta={"decode_fit": "token1"})
SLOS = {"ttft": 300.0, "tpot": 25.0}
SEED, N = 0, 120


def _lengths() -> list[tuple[int, int]]:
    rng = random.Random(3)
    return [(rng.randint(100, 500), rng.randint(10, 40)) for _ in range(N)]


def _recorded(rate: float, limit_s: float) -> list[RequestResult]:
    """A 'measured' run: the requests' timelines as the client would record them, from a
    simulation with the true profiles, cut at the run's time limit like capstone_budget."""
    ls = _lengths()
    times = arrival_times(N, rate, 1.0, random.Random(SEED + 7919))
    out = []
    for s in simulate(CAL, 1, 1, 0, times, ls, horizon_s=limit_s):
        r = RequestResult(s.arrival, s.prompt, target_tokens=s.output,
                          server={"prefill_worker": "p", "decode_worker": "d"})
        if not math.isnan(s.first):
            r.chunks.append((s.first, 1))
        if not math.isnan(s.end) and s.output > 1:
            r.chunks.append((s.end, s.output - 1))
        elif math.isnan(s.end):
            if s.generated > 1:
                r.chunks.append((s.last, s.generated - 1))
            r.error = CUT
        out.append(r)
    return out


def _write_run(d, rates: list[float]) -> list[dict]:
    runs, search_runs = [], []
    for rate in rates:
        limit_s = N / rate + 0.3  # the send span and a grace, as a budgeted run
        summ = summarize(_recorded(rate, limit_s), SLOS, Window())
        summ["time_limit_s"] = limit_s
        runs.append({"setup": "1P1D", "workload": "w", "request_rate": rate,
                     "max_concurrency": None, **summ})
        search_runs.append([rate, summ["slo_attainment"]])
    doc = {"meta": {"device": "synthetic"}, "slos": SLOS, "target": 0.9, "seed": SEED,
           "burstiness": 1.0, "num_prompts": N,
           "search": {"start_rate": rates[0], "max_runs": len(rates), "rel_tol": 0.25},
           "window": {"warmup": 0.1, "cooldown": 0.1},
           "workloads": {"w": {"describe": "synthetic", "params": {}}}, "runs": runs,
           "setups": [{"setup": "1P1D", "workers": "prefill@cpu, decode@cpu", "pools": {},
                       "gpu": [], "gpu_note": "no GPU", "by_workload": {"w": {
                           "max_rate": max((r for r, a in search_runs if a >= 0.9), default=0.0),
                           "search_runs": search_runs, "bracketed": True, "cut": False,
                           "send_durations_s": [None] * len(rates),
                           "lengths": [list(x) for x in _lengths()]}}}]}
    (d / "results.json").write_text(json.dumps(doc))
    CAL.save(str(d / "calibration.json"))
    return runs


def test_validation_reproduces_a_recorded_run(tmp_path) -> None:
    # a light, a loaded and an overloaded rate (requests cut at the time limit)
    runs = _write_run(tmp_path, [4.0, 16.0, 200.0])
    # the overloaded run: requests cut at its time limit, goodput well under the rate
    assert runs[-1]["failed"] > 0 and runs[-1]["steady_goodput"] < 0.5 * 200.0
    per_run, _ = plan.validate(str(tmp_path))
    assert len(per_run) == 3
    for r in per_run:  # the same arrivals, window, time limit and goodput definition
        assert r["predicted_goodput_rps"] == pytest.approx(r["measured_goodput_rps"], rel=0.15)
        assert r["predicted_attainment"] == pytest.approx(r["measured_attainment"], abs=0.05)
    assert "within 15% of measured in 3 of 3 runs" in "\n".join(plan_report.within_lines(per_run))


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    capstone.add_arguments(p)
    return p.parse_args(list(argv))


def test_report_from_renders_every_section(tmp_path) -> None:
    src, out = tmp_path / "run", tmp_path / "again"
    src.mkdir()
    _write_run(src, [4.0, 8.0])
    rc = capstone.run(_args("--report-from", str(src), "--out", str(out), "--meta",
                            "commit=abc1234", "--extrapolate", "4"))
    assert rc == 0
    text = (out / "report.md").read_text()
    for section in ("## Results", "## Max rate at target attainment", "### Transfer",
                    "### Planner validation", "### Extrapolation", "re-rendered with"):
        assert section in text
    assert "- commit: abc1234" in text
    assert "per-request data" in text  # what a run without requests.json.gz cannot answer
    assert json.loads((out / "results.json").read_text())["runs"]  # copied beside it


def test_requests_file_round_trips(tmp_path) -> None:
    s = report.SetupResult("1P1D", "w", {"prefill": [0]})
    w = report.WorkloadRuns("wl", "d")
    reqs = _recorded(4.0, 30.0)[:5]
    w.runs.append(report.Run(4.0, 0, reqs, {"request_rate": 4.0}))
    s.by_workload["wl"] = w
    s.gpu = {0: [(1.0, 50.0, 10.0)]}
    rr.write_requests(str(tmp_path), [s])
    (tmp_path / "results.json").write_text(json.dumps({
        "slos": SLOS, "target": 0.9, "seed": 0, "burstiness": 1.0, "num_prompts": 5,
        "runs": [{"setup": "1P1D", "workload": "wl", "request_rate": 4.0,
                  "max_concurrency": None}],
        "setups": [{"setup": "1P1D", "workers": "w", "pools": {"prefill": [0]},
                    "by_workload": {"wl": {"lengths": []}}}]}))
    setups, _, _, have = rr.load(str(tmp_path))
    got = setups[0].by_workload["wl"].runs[0].results
    assert have and len(got) == 5 and setups[0].gpu == {0: [(1.0, 50.0, 10.0)]}
    t0 = reqs[0].t_send
    for a, b in zip(reqs, got):  # times relative to the run's first send
        assert b.t_send == pytest.approx(a.t_send - t0, abs=1e-5)
        assert b.ttft_s == pytest.approx(a.ttft_s, abs=1e-5) and b.error == a.error


def test_transfers_that_queued_are_left_out_of_the_fit() -> None:
    from pdserve.benchmarks.capstone_calibration import unqueued_transfers

    def req(t0: float, xfer_ms: float, dec: str) -> RequestResult:
        return RequestResult(t0 - 0.05, 1000, chunks=[(t0, 1), (t0 + 0.2, 3)], server={
            "kv_bytes": 1000, "transfer_ms": xfer_ms, "prefill_ms": 20.0,
            "prefill_worker": f"p-{dec}", "decode_worker": dec})
    alone = req(0.0, 10.0, "d0")
    a, b = req(1.0, 50.0, "d1"), req(1.03, 80.0, "d1")  # b's prefill overlaps a's transfer
    other = req(1.03, 10.0, "d2")  # the same time, another pair: not queued
    assert unqueued_transfers([alone, a, b, other]) == [alone, other]


def test_gpu_summary_states_clock_and_power_when_recorded() -> None:
    s = report.SetupResult("1P1D", "w", {"prefill": [0], "decode": [1]})
    # (time, util %, memory GiB, SM clock MHz, power W): busy samples (util >= 50) count
    s.gpu = {0: [(0.0, 10.0, 9.0, 1980.0, 120.0), (1.0, 95.0, 10.0, 1500.0, 690.0),
                 (2.0, 90.0, 10.0, 1700.0, 650.0)],
             1: [(0.0, 60.0, 5.0)]}  # an older run: no clock, no power
    rows = {r["pool"]: r for r in report.gpu_summary(s)}
    assert rows["prefill"]["busy_mean_sm_mhz"] == pytest.approx(1600.0)
    assert rows["prefill"]["busy_min_sm_mhz"] == 1500.0
    assert rows["prefill"]["busy_max_power_w"] == 690.0
    assert "busy_mean_sm_mhz" not in rows["decode"] and rows["decode"]["max_mem_gib"] == 5.0


def test_gpu_sampler_reads_clock_and_power_through_nvml() -> None:
    from types import SimpleNamespace

    from pdserve.benchmarks.capstone_client import GpuSampler

    def no_power(h):
        raise RuntimeError("NVMLError_NotSupported")
    nv = SimpleNamespace(
        NVML_CLOCK_SM=1, nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=80),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2 * 2**30),
        nvmlDeviceGetClockInfo=lambda h, kind: 1410 + h,
        nvmlDeviceGetPowerUsage=lambda h: 650_000 if h == 0 else no_power(h))
    s = GpuSampler([])
    s.source, s._nvml, s._handles = "NVML", nv, {0: 0, 1: 1}
    got = s._read()
    assert got[0] == (80.0, 2.0, 1410.0, 650.0)
    assert got[1][:3] == (80.0, 2.0, 1411.0) and math.isnan(got[1][3])

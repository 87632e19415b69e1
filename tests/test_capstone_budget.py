"""The capstone's time budget and run sizing, steady-state rates, cut requests, the
search's early stop, and the report's computed answers, on synthetic data (no timing in
any assert: clocks are only read to size runs)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from pdserve.benchmarks import capstone_findings as cf
from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks.capstone_budget import Budget, RunSizer, run_size
from pdserve.benchmarks.capstone_client import run_load
from pdserve.benchmarks.capstone_metrics import (
    CUT,
    RequestResult,
    Window,
    meets,
    steady_rates,
    summarize,
)
from pdserve.benchmarks.capstone_search import find_max_rate
from pdserve.benchmarks.capstone_workloads import Request


def test_run_size_fills_the_duration() -> None:
    assert run_size(10.0, 16, 0.0) == 16  # no duration: a fixed count
    assert run_size(10.0, 16, 20.0) == 200
    assert run_size(0.5, 16, 20.0) == 16  # the count is the minimum
    assert run_size(math.inf, 16, 20.0) == 16  # fixed concurrency


def test_budget_shares_and_sizer() -> None:
    assert not Budget().limited and math.isinf(Budget().deadline(3))
    b = Budget(100.0, start_s=time.monotonic() - 40.0)  # 60 s left
    share = b.deadline(3, reserve_s=15.0) - time.monotonic()
    assert 14.0 <= share <= 15.0  # (60 - 15) / 3
    s = RunSizer(time.monotonic() + 30.0, runs_left=3, drain_s=2.0)
    assert s.can_run() and 7.0 <= s.duration_s() <= 8.0  # 30 / 3 - 2
    s.ran(wall_s=11.0, duration_s=8.0)  # drained for 3 s
    assert s.runs_left == 2 and s.drain_s == 3.0
    capped = RunSizer(time.monotonic() + 300.0, 3, 1.0, max_duration_s=20.0)
    assert capped.duration_s() == 20.0
    late = RunSizer(time.monotonic() + 5.0, 3, drain_s=2.0)  # < min_run_s + drain left
    assert not late.can_run()
    free = RunSizer(math.inf, 2, 1.0, max_duration_s=0.0)
    assert free.can_run() and free.duration_s() == 0.0 and math.isinf(free.stop_at(1.0))


def test_search_stops_when_the_budget_says_so() -> None:
    calls = []
    res = find_max_rate(lambda r: calls.append(r) or 1.0, 2.0, max_runs=6,
                        can_run=lambda: len(calls) < 2)
    assert calls == [2.0, 4.0] and res.cut and res.max_rate == 4.0
    assert "cut by the time budget" in res.describe()
    full = find_max_rate(lambda r: 1.0, 2.0, max_runs=3, can_run=lambda: True)
    assert not full.cut and len(full.runs) == 3


def test_steady_rates_and_cut_requests() -> None:
    # 10 requests sent 1 s apart; each finishes 0.5 s later, the even ones within SLO
    ends = [(i + 0.5, i % 2 == 0) for i in range(10)]
    thr, good = steady_rates(0.0, 9.0, ends)
    assert thr == pytest.approx(9 / 9.0) and good == pytest.approx(5 / 9.0)
    assert all(math.isnan(x) for x in steady_rates(1.0, 1.0, ends))
    cut = RequestResult(0.0, 8, chunks=[(0.1, 1), (0.2, 1)], error=CUT)
    assert cut.cut and not cut.ok and meets(cut, {"ttft": 500, "tpot": 200})
    assert not meets(cut, {"ttft": 50})  # judged on what was seen
    never = RequestResult(0.0, 8, error=CUT)
    assert not never.cut and not meets(never, {"ttft": 500})
    s = summarize([cut, RequestResult(0.0, 8, chunks=[(0.1, 1), (0.3, 2)])], {"ttft": 500},
                  Window(0.0, 0.0))
    assert s["completed"] == 1 and s["slo_attainment"] == 1.0


class _Slow:
    name = "slow"

    async def stream(self, req, timeout_s):
        yield 1, None
        await asyncio.sleep(30)
        yield 1, None

    async def close(self) -> None:
        pass


def test_run_load_cuts_at_the_time_limit() -> None:
    reqs = [Request(0.0, [1, 2], 4), Request(0.0, [3], 4)]
    res = asyncio.run(run_load(_Slow(), reqs, 60.0, time_limit_s=0.2))
    assert [r.error for r in res] == [CUT, CUT] and all(r.cut for r in res)


def _setup(name: str, rate_att: dict[float, tuple[float, float, float]],
           transfer: bool = False, local: float = math.nan) -> report.SetupResult:
    """rate -> (ttft ms, tpot ms, itl p99 ms) for 20 identical requests per run."""
    s = report.SetupResult(name, "w")
    w = report.WorkloadRuns("wl", "d")
    for rate, (ttft, tpot, itl) in rate_att.items():
        results = []
        for i in range(20):
            t0 = i / rate
            r = RequestResult(t0, 100 * (i + 1), target_tokens=5)
            r.chunks = [(t0 + ttft / 1e3 + k * tpot / 1e3, 1) for k in range(5)]
            if transfer:
                r.server = {"transfer_ms": 1.0 + 0.01 * r.prompt_tokens,
                            "kv_bytes": 1000 * r.prompt_tokens,
                            "prefill_worker": "p", "decode_worker": "d"}
            results.append(r)
        summ = summarize(results, {"ttft": 500, "tpot": 20}, Window())
        summ["p99_itl_ms"] = itl
        summ["local_prefill_fraction"] = local
        w.runs.append(report.Run(rate, 0, results, summ))
    s.by_workload["wl"] = w
    return s


def test_findings_are_computed_from_the_numbers() -> None:
    pd = _setup("1P1D", {4.0: (100, 10, 12), 8.0: (100, 15, 16)}, transfer=True)
    co = _setup("2both", {4.0: (50, 30, 40), 8.0: (50, 60, 80)})
    cond = _setup("1P1D-cond512", {4.0: (80, 12, 14)}, local=0.25)
    ctx = report.Context({"ttft": 500.0, "tpot": 20.0}, 0.9, Window(), 1.0, 0, 4.0, 20, {})
    text = "\n".join(cf.findings([pd, co, cond], ctx))
    # transfer = 1 ms + 0.01 ms/token exactly (1000 B per token): a line with R^2 1, and
    # no two transfers overlap, so every request counts as one that did not queue
    assert "from 40 requests whose prefill and transfer overlapped no other" in text
    assert "1 ms + bytes / (0.1 GB/s), fixed >= 0, R^2 1.00: linear" in text
    assert "0.0952 GB/s effective" in text  # 2 MB in 21 ms: the 1 ms fixed part included
    assert "the per-byte rate (0.1 GB/s) sets it" in text  # fixed part 5% at 2000 tokens
    # tight TPOT (20 ms): P/D holds 8 req/s, colocated none; loose (80 ms): both hold 8
    assert "tight TPOT (<= 20 ms): 1P1D holds 8 req/s, 2both 0 req/s" in text
    assert "loose TPOT (<= 80 ms): 1P1D holds 8 req/s, 2both 8 req/s" in text
    assert "neither wins" in text
    assert "at 4 req/s: TTFT p90 100 ms (1P1D) vs 50 ms (2both): P/D worsens TTFT; " \
           "ITL p99 12 vs 40 ms: P/D improves ITL" in text
    assert "conditional 1P1D-cond512: 25% of requests were prefilled on their decode worker" in text
    assert "holds 4 req/s against 8 for 1P1D" in text
    assert "not measured" in text  # no GPU samples


def test_linear_fit() -> None:
    a, b, r2 = cf.linear_fit([(0, 1.0), (1, 3.0), (2, 5.0)])
    assert (a, b, r2) == pytest.approx((1.0, 2.0, 1.0))
    assert all(math.isnan(v) for v in cf.linear_fit([(0, 1.0)]))

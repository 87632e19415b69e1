"""Capstone metrics on synthetic timelines: TTFT/TPOT/ITL (multi-token chunks), percentiles,
goodput and attainment, the measurement window, and the rate search against a synthetic
attainment function."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.benchmarks import capstone_metrics as cm
from pdserve.benchmarks.capstone_metrics import RequestResult, Window
from pdserve.benchmarks.capstone_search import find_max_rate


def req(send: float, ttft: float, gap: float, n: int, per_chunk: int = 1,
        error: str = "") -> RequestResult:
    r = RequestResult(send, 10)
    if error:
        r.error = error
        return r
    t, left = send + ttft, n
    r.chunks.append((t, 1))
    left -= 1
    while left > 0:
        k = min(per_chunk, left)
        t += gap * k
        r.chunks.append((t, k))
        left -= k
    return r


def test_itl_spreads_multi_token_chunks() -> None:
    r = RequestResult(0.0, 4, chunks=[(1.0, 2), (1.3, 3), (1.4, 1)])
    assert r.ttft_s == 1.0 and r.output_tokens == 6 and r.e2el_s == pytest.approx(1.4)
    assert r.itls_s() == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.1])
    assert sum(r.itls_s()) == pytest.approx(r.tpot_s * (r.output_tokens - 1))
    one = RequestResult(0.0, 4, chunks=[(0.5, 1)])
    assert one.itls_s() == [] and math.isnan(one.tpot_s)


def test_parse_goodput() -> None:
    assert cm.parse_goodput(["ttft:500", "TPOT:50", "e2el:9000"]) == \
        {"ttft": 500.0, "tpot": 50.0, "e2el": 9000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:0"]):
        with pytest.raises(ValueError):
            cm.parse_goodput(bad)


def test_summary_fields_percentiles_and_goodput() -> None:
    rs = [req(0.0, 0.1, 0.01, 11), req(1.0, 0.3, 0.01, 11), req(2.0, 0.2, 0.06, 11),
          req(3.0, 0.05, 0.0, 1), req(4.0, 0, 0, 0, error="DEADLINE_EXCEEDED")]
    s = cm.summarize(rs, {"ttft": 250, "tpot": 50}, Window(0, 0))
    assert (s["completed"], s["failed"], s["measured"]) == (4, 1, 5)
    for key in ("request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "std_ttft_ms"):
        assert key in s
    assert s["duration"] == pytest.approx(3.05)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["request_goodput"] == pytest.approx(2 / 3.05)
    assert s["output_throughput"] == pytest.approx(34 / 3.05)
    assert s["median_ttft_ms"] == pytest.approx(150.0)
    assert s["p99_ttft_ms"] == pytest.approx(float(np.percentile([100, 300, 200, 50], 99)))
    itls = [g * 1e3 for r in rs if r.ok for g in r.itls_s()]
    assert s["p90_itl_ms"] == pytest.approx(float(np.percentile(itls, 90)))
    assert s["mean_itl_ms"] == pytest.approx(float(np.mean(itls)))
    # e2el SLO on its own
    assert cm.attainment(rs, {"e2el": 350}, Window(0, 0)) == pytest.approx(2 / 5)


def test_chunked_stream_keeps_tpot_and_mean_itl() -> None:
    a, b = req(0.0, 0.1, 0.02, 21, per_chunk=1), req(0.0, 0.1, 0.02, 21, per_chunk=4)
    assert a.tpot_s == pytest.approx(b.tpot_s)
    assert np.mean(a.itls_s()) == pytest.approx(np.mean(b.itls_s()))


def test_window_excludes_ramp_up_and_drain() -> None:
    rs = [req(float(i), 5.0 if i in (0, 9) else 0.1, 0.01, 5) for i in range(10)]
    w = Window(0.1, 0.1)
    sel = w.select(list(reversed(rs)))
    assert [r.t_send for r in sel] == [float(i) for i in range(1, 9)]
    assert cm.attainment(rs, {"ttft": 1000}, w) == 1.0
    assert cm.attainment(rs, {"ttft": 1000}, Window(0, 0)) == pytest.approx(0.8)
    assert "ramp-up" in w.describe()


def test_cdf() -> None:
    xs, ys = cm.cdf([3.0, 1.0, math.nan, 2.0])
    assert xs == [1.0, 2.0, 3.0] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_rate_search_finds_the_knee() -> None:
    calls = []

    def attain(rate: float) -> float:  # holds 100% up to 7.3 req/s, then collapses
        calls.append(rate)
        return 1.0 if rate <= 7.3 else max(0.0, 1 - (rate - 7.3))
    res = find_max_rate(attain, start_rate=1.0, target=0.9, max_runs=12, rel_tol=0.05)
    assert res.bracketed and 7.3 / 1.06 <= res.max_rate <= 7.3 + 0.1
    assert len(calls) <= 12 and [r for r, _ in res.runs] == calls
    assert res.max_rate in calls  # a measured point, not an interpolation


def test_rate_search_is_bounded_and_reports_failure() -> None:
    res = find_max_rate(lambda r: 0.0, start_rate=4.0, max_runs=4)
    assert res.max_rate == 0.0 and len(res.runs) == 4 and "no measured rate" in res.describe()
    res = find_max_rate(lambda r: 1.0, start_rate=1.0, max_runs=3)
    assert res.max_rate == 4.0 and not res.bracketed and "ran out" in res.describe()
    res = find_max_rate(lambda r: 1.0 if r < 0.3 else 0.0, start_rate=2.0, max_runs=10)
    assert 0.2 <= res.max_rate < 0.3 and res.bracketed
    with pytest.raises(ValueError):
        find_max_rate(lambda r: 1.0, start_rate=0.0)


def test_a_guess_brackets_the_max_rate_where_doubling_runs_out() -> None:
    def knee(at: float):
        return lambda r: 1.0 if r <= at else 0.2
    for true in (40.0, 25.0, 60.0):  # the guess right, too high, a little low
        plain = find_max_rate(knee(true), start_rate=8.0, max_runs=3, rel_tol=0.25)
        steered = find_max_rate(knee(true), start_rate=8.0, max_runs=3, rel_tol=0.25,
                                guess=46.0)
        assert steered.bracketed and (plain.bracketed == (true < 32))
        assert steered.runs[0][0] == 8.0  # the common start rate first
        assert steered.runs[1][0] == pytest.approx(46.0 * 1.25)  # then just past the guess
        assert steered.max_rate <= true and steered.guess == 46.0
        assert "steered by a predicted 46" in steered.describe()
    # the start fails: the next run goes under the guess, not just halves
    res = find_max_rate(knee(5.0), start_rate=16.0, max_runs=3, rel_tol=0.25, guess=6.0)
    assert res.runs[1][0] == pytest.approx(6.0 / 1.25) and res.bracketed
    assert res.max_rate == pytest.approx(4.8)


def test_grpc_target_keeps_the_reserve_wait() -> None:
    """The capstone records how long token 0 waited for the decode worker's Reserve
    (reserve_wait_ms) and the coordinator's own TTFT (ttft_ms), beside the other server
    timings, from the final chunk's metrics; other metrics are not kept."""
    import asyncio
    from types import SimpleNamespace

    from pdserve.benchmarks.capstone_client import SERVER_KEYS, GrpcTarget

    assert "reserve_wait_ms" in SERVER_KEYS
    metrics = {"queue_ms": 0.0, "prefill_ms": 20.0, "reserve_wait_ms": 310.5, "ttft_ms": 1.0,
               "tpot_ms": 7.0}

    class Client:
        async def stream(self, **_kw):
            yield SimpleNamespace(finished=False, metrics=None, token_ids=[1])
            yield SimpleNamespace(finished=True, metrics=metrics, token_ids=[2, 3])

    target = GrpcTarget.__new__(GrpcTarget)
    target._client = Client()

    async def run() -> list:
        req = SimpleNamespace(prompt=[1, 2], output_len=3)
        return [x async for x in target.stream(req, 1.0)]
    got = asyncio.run(run())
    assert got[0] == (1, None)
    assert got[1] == (2, {"queue_ms": 0.0, "prefill_ms": 20.0, "reserve_wait_ms": 310.5,
                          "ttft_ms": 1.0})

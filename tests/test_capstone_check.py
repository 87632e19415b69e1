"""The planner's out-of-sample check (capstone_check.py): the two rates around a
prediction, the verdict they give, the report's section, and the capstone running it."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from fake_worker import Cluster, LoopThread
from test_capstone_smoke import FAST, check_report, parse

from pdserve.benchmarks import capstone
from pdserve.benchmarks import capstone_check as check
from pdserve.benchmarks.capstone_records import records_path
from pdserve.benchmarks.capstone_search import HIGH, LOW, NOISE, NOT_RUN, WITHIN, SearchResult


def knee(m: float):
    """Attainment of a server whose true max rate is m: every request meets its SLOs up to
    m, half of them past it."""
    return lambda rate: 1.0 if rate <= m else 0.5


@pytest.mark.parametrize("predicted, verdict", [(10.0, WITHIN), (11.4, WITHIN), (8.6, WITHIN),
                                                (12.0, HIGH), (8.0, LOW)])
def test_verdict_says_whether_the_max_rate_is_within_15_percent(predicted, verdict) -> None:
    s = check.run_check(knee(10.0), predicted, 0.9)
    lo, hi = check.check_rates(predicted)
    assert [r for r, _ in s.runs] == pytest.approx([lo, hi])
    assert s.verdict() == verdict
    # the verdict is what |p - m| <= 15% of m says, m = 10
    assert (verdict == WITHIN) == (abs(predicted - 10.0) <= 0.15 * 10.0)
    assert s.guess == predicted and s.check_tol == check.CHECK_TOL
    assert s.max_rate == max((r for r, a in s.runs if a >= 0.9), default=0.0)
    assert "plan check: predicted" in s.describe()


def test_not_monotone_cut_and_bad_input() -> None:
    flip = iter([0.5, 1.0])
    s = check.run_check(lambda rate: next(flip), 10.0, 0.9)
    assert s.verdict() == NOISE and "not monotone" in s.describe()
    s = check.run_check(knee(10.0), 10.0, 0.9, can_run=lambda: False)
    assert s.cut and len(s.runs) == 1 and s.verdict() == NOT_RUN
    assert SearchResult(0.0, 0.9, check_tol=0.15).verdict() == NOT_RUN
    with pytest.raises(ValueError):
        check.check_rates(0.0)
    with pytest.raises(ValueError):
        check.check_rates(10.0, 1.0)


def test_report_lines_count_the_predictions_within() -> None:
    good = check.run_check(knee(10.0), 10.0, 0.9)
    bad = check.run_check(knee(10.0), 14.0, 0.9)
    text = "\n".join(check.report_lines([("1P1D", "w", good), ("2both", "w", bad)], "X"))
    assert "Planner check (out of sample)" in text and "Predicted from X" in text
    assert "1 of 2 predictions within 15%" in text
    lo_rate, lo_att = sorted(bad.runs)[0]
    assert f"2both w (predicted too high: {lo_att:.3g} at {lo_rate:.3g} req/s)" in text
    assert "knife edge" not in text  # knee(10) fails far from the target
    # a miss decided by an attainment near the target says so
    edge = SearchResult(0.0, 0.9, runs=[(8.0, 0.95), (12.0, 0.92)], guess=10.2, check_tol=0.15)
    text = "\n".join(check.report_lines([("4both", "w", edge)], "X"))
    assert "predicted too low: 0.92 at 12 req/s" in text and "1 of these 1 rest on" in text
    assert check.report_lines([], "X") == []


def test_report_lines_give_the_host_path_busy_at_each_prediction() -> None:
    good = check.run_check(knee(10.0), 10.0, 0.9)
    plain = "\n".join(check.report_lines([("1P1D", "w", good)], "X"))
    assert "host_path_busy" not in plain  # no relay probe: no column
    seen = []

    def busy(setup: str, wname: str, rate: float) -> float:
        seen.append((setup, wname, rate))
        return 0.987

    text = "\n".join(check.report_lines([("1P1D", "w", good)], "X", busy))
    assert seen == [("1P1D", "w", 10.0)]  # asked at the predicted rate
    header = next(ln for ln in text.splitlines() if ln.startswith("| setup"))
    assert "| host_path_busy | verdict |" in header
    assert "| 0.987 | within |" in text and "the host path, not the GPUs" in text


def test_a_verdict_resting_on_a_short_held_run_is_not_decided() -> None:
    """A run the budget cut to a few seconds can hold at a rate the GPUs cannot sustain:
    a verdict that rests on it (the lower run of `within`, the higher one of `too low`)
    is not decided; a failed run decides whatever its length."""
    from pdserve.benchmarks.capstone_report import Run
    from pdserve.benchmarks.capstone_search import SHORT, SHORT_FRAC

    def res(lo: float, hi: float, span_lo: float, span_hi: float) -> SearchResult:
        return SearchResult(0.0, 0.9, runs=[(8.7, lo), (11.8, hi)], guess=10.0, check_tol=0.15,
                            run_s=15.0, spans={8.7: span_lo, 11.8: span_hi})

    short, long_ = SHORT_FRAC * 15.0 - 0.1, SHORT_FRAC * 15.0 + 0.1
    assert res(1.0, 1.0, long_, short).verdict() == SHORT
    assert res(1.0, 1.0, short, long_).verdict() == LOW  # the higher run decides
    assert res(1.0, 0.2, short, long_).verdict() == SHORT
    assert res(1.0, 0.2, long_, short).verdict() == WITHIN  # the short one failed: decides
    assert res(0.5, 0.1, short, short).verdict() == HIGH
    assert dataclasses.replace(res(1.0, 0.2, short, long_), run_s=0.0).verdict() == WITHIN
    assert "not decided" in res(1.0, 1.0, long_, short).describe()  # the run's own line too
    # spans come from the runs' request counts: requests / rate
    runs = [Run(8.7, 0, [], {"num_prompts": 87}), Run(11.8, 0, [], {"num_prompts": 59})]
    assert check.spans(runs) == pytest.approx({8.7: 10.0, 11.8: 5.0})
    text = "\n".join(check.report_lines([("1P1D", "w", res(1.0, 1.0, 10.0, 5.0))], "X"))
    assert "0 of 1 predictions within" in text and SHORT in text and "| 5 |" in text


def test_a_checks_runs_are_as_long_as_the_predicted_ones() -> None:
    import time

    from pdserve.benchmarks.capstone_budget import MIN_RUN_S, RunSizer
    from pdserve.benchmarks.capstone_search import SHORT_FRAC
    from pdserve.benchmarks.capstone_sweep import run_bounds

    assert run_bounds(20.0, True) == (check.PREDICTED_RUN_S, SHORT_FRAC * check.PREDICTED_RUN_S)
    assert run_bounds(6.0, True) == (6.0, MIN_RUN_S)  # shorter runs asked for: as asked
    assert run_bounds(20.0, False) == (20.0, MIN_RUN_S)  # a search: as before
    assert run_bounds(0.0, True) == (0.0, MIN_RUN_S)  # no --run-duration: a request count
    # a check starts a workload only when both its runs fit
    sizer = RunSizer(time.monotonic() + 20.0, 2, 2.0, *run_bounds(20.0, True))
    assert sizer.can_run(1) and not sizer.can_run(2)


def test_args_and_source(tmp_path) -> None:
    from pdserve.benchmarks.capstone_calibration import Calibration

    assert "no such file" in capstone.check_args(parse("--plan-check-from", "/no/such"))
    Calibration(meta={"device": "2 x GPU", "commit": "abc"}).save(str(tmp_path / "calibration.json"))
    assert "--base-url" in capstone.check_args(parse("--plan-check-from", str(tmp_path),
                                                     "--base-url", "http://x:1"))
    assert check.source(str(tmp_path)) == f"the calibration of {tmp_path.name} (device 2 x GPU, commit abc)"


def test_capstone_plan_check_against_fake_coordinator(tmp_path) -> None:
    from pdserve.benchmarks.capstone_calibration import Calibration

    Calibration(prefill={"c0": 5.0, "c_token": 0.5, "c_token2": 0.0}).save(str(tmp_path / "cal.json"))
    out = tmp_path / "out"
    lt = LoopThread()
    cluster = Cluster(lt)
    cluster.add("prefill")
    cluster.add("decode")
    try:
        rc = capstone.run(parse("--coordinator", cluster.address, *FAST, "--out", str(out),
                                "--plan-check-from", str(tmp_path / "cal.json")))
    finally:
        cluster.stop()
        lt.close()
    assert rc == 0
    res = check_report(out, ["1P1D"])
    (w,) = res["setups"][0]["by_workload"].values()
    p = w["search_guess"]
    assert p > 0 and w["check_tol"] == check.CHECK_TOL
    assert [r for r, _ in w["search_runs"]] == pytest.approx(list(check.check_rates(p)))
    assert len(res["runs"]) == 2 and "plan check from" in res["meta"]
    md = (out / "report.md").read_text()
    assert "### Planner check (out of sample)" in md and "predictions within 15%" in md
    assert "nothing to extrapolate from" in md and "No max-rate search to compare" in md
    again = tmp_path / "again"
    assert capstone.run(parse("--report-from", str(out), "--out", str(again))) == 0
    assert "### Planner check (out of sample)" in (again / "report.md").read_text()
    (w2,) = json.loads((again / "results.json").read_text())["setups"][0]["by_workload"].values()
    assert w2["check_tol"] == check.CHECK_TOL and w2["search_runs"] == w["search_runs"]


RUN_530 = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                       "capstone-4gpu-530b4d8")


@pytest.mark.skipif(records_path(RUN_530) is None,
                    reason="the 4 x H100 run directory is not in this checkout")
def test_plan_calibration_of_a_run_is_refitted_as_the_check_fits_it() -> None:
    """`pdserve plan --calibration RUN_DIR` (e.g. with --validate of another run) uses the
    profiles --plan-check-from predicted with: refitted from RUN_DIR's records (this run's
    file predates the relay profile, which the refit adds)."""
    from pdserve.benchmarks import plan
    from pdserve.benchmarks.capstone_calibration import Calibration

    saved = Calibration.load(os.path.join(RUN_530, "calibration.json"))
    got = plan.load_calibration(RUN_530)
    assert not saved.relay and got.relay["t_tok"] > 0
    assert plan.load_calibration(os.path.join(RUN_530, "calibration.json")).relay == saved.relay

"""`pdserve bench serve`: argument handling, workload generation and summary math
(percentiles, TPOT, goodput) on synthetic latencies, plus one tiny run against the in-process
fake cluster. No timing assertions."""

from __future__ import annotations

import argparse
import math
import os
import random

import numpy as np
import pytest
from fake_worker import Cluster, LoopThread

from pdserve.benchmarks import cli as bench_cli
from pdserve.benchmarks import serve as bs
from pdserve.benchmarks import serve_workload as sw
from pdserve.benchmarks.serve_workload import Record


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bs.add_arguments(p)
    return p.parse_args(list(argv))


def test_length_and_rate_specs() -> None:
    assert bs.length_spec("128") == (128, 128) and bs.length_spec("64:256") == (64, 256)
    assert bs.rate_list("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("0", "5:4", "a", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bs.length_spec(bad)
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bs.rate_list(bad)


@pytest.mark.parametrize(("argv", "word"), [
    (["--coordinator", "h:1", "--compare"], "--compare"),
    (["--compare", "--prefill", "0", "--decode", "0", "--both", "2"], "--compare"),
    (["--prefill", "0", "--decode", "0"], "no workers"),
    (["--num-requests", "0"], "--num-requests"),
    (["--slo-tpot-ms", "0"], "--slo"),
])
def test_check_args(argv, word) -> None:
    assert word in bs.check_args(parse(*argv))


def test_defaults_are_valid_and_setups_for_compare() -> None:
    assert bs.check_args(parse()) is None
    assert bs.setups(parse()) == [("1P1D", 1, 1, 0)]
    assert bs.setups(parse("--compare")) == [("1P1D", 1, 1, 0), ("2both", 0, 0, 2)]
    assert bs.setups(parse("--prefill", "0", "--decode", "0", "--both", "3"))[0][0] == "3both"


def test_dispatcher_passes_arguments_and_exit_status(capsys) -> None:
    ns = argparse.Namespace(name="serve", rest=["--compare", "--coordinator", "h:1"])
    assert bench_cli.run(ns) == 2
    assert "--compare" in capsys.readouterr().err


def test_percentile_matches_numpy() -> None:
    rng = random.Random(3)
    xs = [rng.lognormvariate(3, 1) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 100):
        assert sw.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert sw.percentile([5.0], 99) == 5.0
    assert math.isnan(sw.percentile([], 50)) and sw.percentile([1.0, math.nan, 3.0], 50) == 2.0
    with pytest.raises(ValueError):
        sw.percentile([1.0], 101)


def rec(send: float, ttft: float, tpot: float, n: int, error: str = "") -> Record:
    r = Record(t_send=send, prompt_tokens=8)
    if error:
        r.error = error
        return r
    r.t_first = send + ttft
    r.t_end = r.t_first + tpot * (n - 1)
    r.output_tokens = n
    return r


def test_record_metrics() -> None:
    r = rec(1.0, 0.2, 0.01, 11)
    assert r.ok and r.ttft_s == pytest.approx(0.2) and r.tpot_s == pytest.approx(0.01)
    assert r.e2e_s == pytest.approx(0.3)
    assert math.isnan(rec(0.0, 0.1, 0.0, 1).tpot_s)
    assert not rec(0.0, 0, 0, 0, error="UNAVAILABLE: x").ok


def test_summary_and_goodput() -> None:
    records = [
        rec(0.0, 0.100, 0.020, 11),  # good
        rec(1.0, 0.300, 0.020, 11),  # TTFT 300 ms > 250: miss
        rec(2.0, 0.200, 0.060, 11),  # TPOT 60 ms > 50: miss
        rec(3.0, 0.050, 0.0, 1),     # one token: no TPOT, good
        rec(4.0, 0, 0, 0, error="DEADLINE_EXCEEDED: late"),  # failed: miss
    ]
    s = sw.summarize(records, slo_ttft_ms=250, slo_tpot_ms=50)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["duration_s"] == pytest.approx(3.05)  # first send 0.0 -> last finish 3.0 + 0.05
    assert s["throughput_rps"] == pytest.approx(4 / 3.05)
    assert s["output_tok_s"] == pytest.approx(34 / 3.05)
    assert s["ttft_p50_ms"] == pytest.approx(150.0)  # of 50, 100, 200, 300
    assert s["ttft_p99_ms"] == pytest.approx(float(np.percentile([50, 100, 200, 300], 99)))
    assert s["tpot_p50_ms"] == pytest.approx(20.0) and s["tpot_p90_ms"] == pytest.approx(52.0)
    assert s["e2e_p50_ms"] == pytest.approx(float(np.percentile([300, 500, 800, 50], 50)))
    assert s["goodput"] == pytest.approx(2 / 5) and s["goodput_rps"] == pytest.approx(2 / 3.05)
    assert sw.summarize(records, 1e9, 1e9)["goodput"] == pytest.approx(4 / 5)


def test_summary_when_everything_failed() -> None:
    s = sw.summarize([rec(0.0, 0, 0, 0, error="x")], 100, 100)
    assert s["completed"] == 0 and s["goodput"] == 0.0 and math.isnan(s["ttft_p50_ms"])


def test_poisson_arrivals_and_jobs() -> None:
    times = sw.arrival_times(4000, 8.0, random.Random(1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.1)  # seeded: deterministic
    assert sw.arrival_times(3, math.inf, random.Random(1)) == [0.0, 0.0, 0.0]
    a = sw.make_jobs(50, 4.0, (8, 32), (4, 4), vocab=100, seed=7)
    assert a == sw.make_jobs(50, 4.0, (8, 32), (4, 4), vocab=100, seed=7)
    assert a != sw.make_jobs(50, 4.0, (8, 32), (4, 4), vocab=100, seed=8)
    assert all(8 <= len(j.prompt) <= 32 and j.output_len == 4 for j in a)
    assert all(0 < t < 100 for j in a for t in j.prompt)


def test_write_results(tmp_path) -> None:
    args = parse("--compare", "--rate", "1,inf", "--out", str(tmp_path), "--name", "smoke",
                 "--label", "CPU smoke run")
    rows = []
    for setup in ("1P1D", "2both"):
        for rate in args.rate:
            s = sw.summarize([rec(0.0, 0.1, 0.01, 5), rec(0.5, 0.2, 0.02, 5)], 1000, 100)
            rows.append({"setup": setup, "rate": rate, **s, "workers": "prefill@cpu"})
    meta = {"run": "CPU smoke run", "device": "cpu", "date": "2026-01-01T00:00:00", "commit": "x"}
    names = {os.path.basename(p) for p in bs.write_results(args, rows, meta)}
    assert {"smoke.csv", "smoke.md"} <= names
    md = (tmp_path / "smoke.md").read_text()
    assert "CPU smoke run" in md and "| 2both | inf |" in md and "Poisson" in md


def test_bench_setup_against_fake_cluster() -> None:
    lt = LoopThread()
    cluster = Cluster(lt)
    try:
        cluster.add("prefill")
        cluster.add("decode")
        args = parse("--rate", "50,inf", "--num-requests", "6", "--input-len", "4:12",
                     "--output-len", "5", "--warmup", "1", "--timeout", "20")
        rows = bs.bench_setup(cluster.address, args)
    finally:
        cluster.stop()
        lt.close()
    assert [r["setup"] for r in rows] == ["1P1D", "1P1D"] and [r["rate"] for r in rows] == [50, math.inf]
    assert all(r["completed"] == 6 and r["failed"] == 0 for r in rows)
    assert all(r["output_tok_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)

"""`pdserve bench host_knee`: the TTFT split per rate (accept, handler, delivery), on CPU
with fake workers."""

from __future__ import annotations

import argparse

import pytest

from pdserve.benchmarks import host_knee
from pdserve.benchmarks.capstone_metrics import RequestResult


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    host_knee.add_arguments(p)
    return p.parse_args(list(argv))


def test_split_adds_up_to_the_ttft() -> None:
    rs = []
    for i in range(10):
        r = RequestResult(t_send=float(i), prompt_tokens=8, chunks=[(i + 0.1 * (i + 1), 1),
                                                                    (i + 2.0, 3)])
        r.server = {"accept_ms": 50.0 * (i + 1), "ttft_ms": 40.0}
        rs.append(r)
    rs.append(RequestResult(t_send=0.0, prompt_tokens=8, error="boom"))
    s = host_knee.split(rs)
    assert s["requests"] == 10 and s["errors"] == 1
    assert s["accept_ms_p50"] == 300.0 and s["handler_ms_p50"] == 40.0
    assert s["ttft_ms_p50"] == pytest.approx(600.0)
    assert s["delivery_ms_p50"] == pytest.approx(600.0 - 300.0 - 40.0)
    assert s["messages_per_s"] == pytest.approx(20 / 11.0)
    assert s["tokens_per_s"] == pytest.approx(40 / 11.0)


def test_bad_arguments_are_refused(capsys) -> None:
    assert host_knee.run(_parse("--step-ms", "0")) == 2
    assert host_knee.run(_parse("--decode", "0")) == 2
    assert "error:" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # not a positive integer list
        _parse("--tokens-per-message", "0")


def test_a_short_run_on_fake_workers(tmp_path) -> None:
    args = _parse("--rates", "5", "--tokens-per-message", "1,4", "--seconds", "1",
                  "--step-ms", "2", "--workload", "uniform:in=4-8,out=8-12",
                  "--out", str(tmp_path))
    assert host_knee.run(args) == 0
    rows = (tmp_path / "host_knee.csv").read_text().splitlines()
    assert rows[0].split(",") == host_knee.COLUMNS and len(rows) == 3
    for line in rows[1:]:
        r = dict(zip(host_knee.COLUMNS, line.split(",")))
        assert int(r["requests"]) >= 3 and r["errors"] == "0"
        assert float(r["accept_ms_p50"]) >= -5 and float(r["handler_ms_p50"]) > 0
        # k tokens a message: about k times fewer messages than tokens
        k = int(r["tokens_per_msg"])
        assert float(r["messages_per_s"]) <= float(r["tokens_per_s"]) / k * 1.5
    assert "TTFT split" in (tmp_path / "host_knee.md").read_text()

"""PDSERVE_KV_TRACE: both processes of `bench transfer` write their timelines, and
transfer_trace reads them back into per-request steps in order."""

from __future__ import annotations

import argparse

import pytest

from pdserve.benchmarks import transfer, transfer_trace
from pdserve.kvtransfer import trace

STEPS = {"staged": ("tx.start", "tx.posted", "rx.recv_posted", "rx.finish", "tx.rx_done"),
         "peer_copy": ("tx.start", "tx.rx_grant", "tx.peer_copy", "tx.peer_copy_done", "rx.rx_end",
                       "rx.finish", "tx.rx_done")}


@pytest.mark.parametrize("path", list(STEPS))
def test_bench_transfer_writes_a_timeline_of_both_sides(tmp_path, monkeypatch, capsys, path):
    prefix = str(tmp_path / "tr")
    monkeypatch.setenv("PDSERVE_KV_TRACE", prefix)  # the receiver process reads it at import
    monkeypatch.setattr(trace, "PREFIX", prefix)
    monkeypatch.setattr(trace, "_events", [])
    p = argparse.ArgumentParser()
    transfer.add_arguments(p)
    args = p.parse_args(["--input-lens", "64", "--iters", "2", "--warmup", "0",
                         "--out", str(tmp_path / "out")]
                        + (["--no-peer-copy"] if path == "staged" else []))
    assert transfer.run(args) == 0
    trace.dump()
    events = transfer_trace.load(prefix)
    assert {e["role"] for e in events} >= {"tx", "rx", "base"}
    steps = transfer_trace.timelines(events)[4]  # 64 tokens: 4 blocks of 16
    for name in STEPS[path]:
        assert len(steps[name]) >= 2, name  # both timed requests
    assert min(steps["tx.rx_done"]) > 0
    # --start ahead (the default): start() 2 ms before the finish() call, the clock's start
    fin = transfer_trace.timelines(events, "finish_call")[4]
    assert max(fin["tx.start"]) < -1.0 and min(fin["tx.rx_done"]) > 0
    assert transfer_trace.main([prefix]) == 0
    assert "median ms from tx.start, from tx.finish_call" in capsys.readouterr().out


def test_off_by_default_records_nothing(monkeypatch):
    monkeypatch.setattr(trace, "PREFIX", None)
    monkeypatch.setattr(trace, "_events", [])
    trace.mark("tx", "start", 1)
    assert trace.gpu_begin() is None
    assert trace._events == []

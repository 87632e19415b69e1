"""The planner's order of landed requests waiting for a decode slot against the engine's:
since branch fifo, engine/scheduler.py admit_remote admits them in landing order (FIFO);
before it, newest first. A run records it in its meta ("landed_order"); a run without it
(every committed capstone run) is simulated newest first, a new plan FIFO. Simulated times
only: nothing here is timed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections import deque

import pytest
from test_planner_push import CAL, _run_dir, new_plan_predict_kwargs

from pdserve.benchmarks import plan
from pdserve.benchmarks.capstone_guess import kv_push_meta
from pdserve.benchmarks.planner_batching import join_landed
from pdserve.benchmarks.planner_setups import LANDED_ORDER, landed_fifo
from pdserve.benchmarks.planner_sim import simulate


@pytest.mark.parametrize("fifo, order", [(True, "abcd"), (False, "dcba")])
def test_join_landed_follows_the_engine(fifo, order) -> None:
    running, held = ["r0"], deque()
    join_landed(deque("ab"), held, running, 1, fifo)  # the batch is full: both wait
    join_landed(deque("cd"), held, running, 1, fifo)  # so do c and d, landed later
    assert running == ["r0"] and len(held) == 4
    running.clear()
    joined = []
    for _ in range(4):  # one slot frees at a time
        join_landed(deque(), held, running, 1, fifo)
        joined.append(running.pop())
    assert "".join(joined) == order


def test_fifo_bounds_the_oldest_wait_in_the_simulator() -> None:
    """Decode-bound: 40 requests landing over ~0.2 s into a batch of 4; newest first lets
    the earliest wait for nearly the whole backlog, FIFO only for those before it."""
    cal = dataclasses.replace(CAL, max_batch=4)
    arrivals = [i * 0.005 for i in range(40)]
    lengths = [(16, 40)] * 40
    waits = {}
    for fifo in (False, True):
        reqs = simulate(cal, 1, 1, 0, arrivals, lengths, landed_fifo=fifo)
        assert all(r.end == r.end for r in reqs)  # every request finished
        waits[fifo] = [r.end - r.landed for r in reqs]
    assert max(waits[True]) < max(waits[False])
    assert waits[True][4] < waits[False][4]  # the first to wait is no longer starved


@pytest.mark.parametrize("run_meta, cal_meta, fifo", [
    ({"device": "x"}, {}, False),  # every committed run: newest first
    ({}, {"landed_order": "fifo"}, True),  # results.json without it: its calibration's
    ({"landed_order": "fifo"}, {}, True),
    ({"landed_order": "newest-first"}, {"landed_order": "fifo"}, False),  # results.json first
])
def test_the_validation_simulates_the_order_the_run_recorded(tmp_path, monkeypatch, run_meta,
                                                             cal_meta, fifo) -> None:
    _run_dir(tmp_path, run_meta, cal_meta)
    seen: list[bool] = []
    real = plan.simulate_setup

    def spy(*a, **kw):
        seen.append(kw["landed_fifo"] if "landed_fifo" in kw else a[10])
        return real(*a, **kw)
    monkeypatch.setattr(plan, "simulate_setup", spy)
    with open(tmp_path / "results.json") as f:
        assert plan.run_landed_fifo(str(tmp_path), json.load(f)) is fifo
    per_run, per_search = plan.validate(str(tmp_path))
    assert len(per_run) == 1 and len(per_search) == 1
    assert seen and all(s is fifo for s in seen)  # runs, band and search
    assert ("landing order" in plan.simulated_with(str(tmp_path))) is fifo


def test_a_new_plan_and_a_new_run_use_fifo(monkeypatch, capsys) -> None:
    assert LANDED_ORDER == "fifo"
    seen = new_plan_predict_kwargs(monkeypatch, "landed_fifo")
    assert seen == [True] and "landing order (FIFO)" in capsys.readouterr().out
    # the capstone records it for the workers it starts, nothing for a server it measures
    ns = argparse.Namespace(coordinator=None, base_url=None, worker_arg=[])
    assert kv_push_meta(ns)["landed_order"] == "fifo" and landed_fifo(kv_push_meta(ns))
    assert not landed_fifo(kv_push_meta(argparse.Namespace(coordinator="h:1", base_url=None)))


def test_committed_capstone_runs_read_as_recorded_else_newest_first() -> None:
    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    dirs = sorted(p.parent for p in root.glob("capstone-*/results.json"))
    assert dirs
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        recorded = "landed_order" in plan._run_meta(str(d), res, "landed_order")
        assert plan.run_landed_fifo(str(d), res) is recorded, d  # every record says fifo
    assert any(d.name.endswith("-530b4d8") for d in dirs)

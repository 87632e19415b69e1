"""The decode step profile with its synchronous-step part: the points rebuilt from
per-request token times, the fit, the simulator's use of it, and the validation's refit
(benchmarks/capstone_decode.py, capstone_calibration.py, planner_sim.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import capstone_decode as dec
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_records import records_path
from pdserve.benchmarks.planner_sim import simulate

DECODE = {"c0": 6.0, "c_seq": 0.02, "c_ctx_token": 0.0, "c_sync": 2.5, "c_sync_seq": 0.04}


def cal(decode: dict) -> calib.Calibration:
    return calib.Calibration(prefill={"c0": 10.0, "c_token": 0.0, "c_token2": 0.0},
                             decode=dict(decode), transfer={"c0": 1.0, "ms_per_byte": 0.0},
                             kv_bytes_per_token=1.0, max_batch=256, prefill_token_budget=8192)


def pd_request(t1: float, step_ms: float, out: int, worker: str = "d") -> RequestResult:
    """A P/D request whose token 0 comes at t1 - 0.02 and tokens 1.. every step_ms."""
    chunks = [(t1 - 0.02, 1)] + [(t1 + k * step_ms / 1e3, 1) for k in range(out - 1)]
    return RequestResult(t1 - 0.05, 32, chunks, server={"decode_worker": worker,
                                                        "prefill_worker": "p"})


def test_a_step_whose_batch_changed_costs_the_sync_part() -> None:
    c = cal(DECODE)
    assert c.decode_step_ms(10, 0.0) == pytest.approx(6.2)
    assert c.decode_step_ms(10, 0.0, sync=True) == pytest.approx(6.2 + 2.5 + 0.4)
    old = cal({"c0": 6.0, "c_seq": 0.02, "c_ctx_token": 0.0})  # a file without the part
    assert old.decode_step_ms(10, 0.0, sync=True) == old.decode_step_ms(10, 0.0)


def test_decode_points_count_the_joins_and_leaves_of_the_same_worker() -> None:
    alone = dec.decode_points([pd_request(1.0, 10.0, 102)])
    assert len(alone) == 1 and alone[0][2] == 0.0 and alone[0][3] == pytest.approx(10.0)
    # two others join and leave inside the first one's 100 steps on its worker; one more
    # on another worker does not count
    run = [pd_request(1.0, 10.0, 102), pd_request(1.2, 10.0, 12), pd_request(1.5, 10.0, 12),
           pd_request(1.3, 10.0, 12, worker="e")]
    batch, _ctx, share, ms = dec.decode_points(run)[0]
    assert share == pytest.approx(1 - math.exp(-4 / 100))
    assert batch == pytest.approx(1 + 2 * 0.1) and ms == pytest.approx(10.0)


def test_fit_decode_separates_the_sync_part_from_the_batch() -> None:
    # points as the model makes them: mean step = overlapped + share x sync part
    pts = []
    for b in (2.0, 20.0, 60.0, 120.0, 240.0):
        for f, ctx in ((0.1, 100.0), (0.5, 400.0), (0.9, 150.0)):
            ms = 6.0 + 0.02 * b + f * (2.5 + 0.04 * b)
            pts.append((b, b * ctx, f, ms))
    got = dec.fit_decode(pts)
    for k in ("c0", "c_seq", "c_ctx_token", "c_sync", "c_sync_seq"):
        assert got[k] == pytest.approx(DECODE[k], rel=1e-6, abs=1e-9)
    assert got["max_batch"] == 240.0
    # a line without the share (the old fit), through steady small batches and saturated
    # large ones (nearly every step changed), charges a steady batch of 60 more than it costs
    low = [p for p in pts if (p[0] <= 60 and p[2] == 0.1) or (p[0] > 60 and p[2] == 0.9)]
    line = calib.nonneg_lstsq(np.array([[1.0, p[0]] for p in low]), np.array([p[3] for p in low]))
    assert line[0] + line[1] * 60 > 6.0 + 0.02 * 60 + 0.1 * (2.5 + 0.04 * 60)


def test_fit_decode_weighs_each_run_the_same() -> None:
    # two runs at the same batch disagree (10 ms and 20 ms a step); the run with 100x the
    # requests must not outweigh the other
    pts = [(10.0, 1000.0, 0.5, 10.0)] * 1000 + [(10.0, 1000.0, 0.5, 20.0)] * 10
    ids = [0] * 1000 + [1] * 10

    def step(fit: dict) -> float:
        return (fit["c0"] + fit["c_seq"] * 10 + fit["c_ctx_token"] * 1000
                + 0.5 * (fit["c_sync"] + fit["c_sync_seq"] * 10))
    assert step(dec.fit_decode(pts)) == pytest.approx(10.1, abs=0.01)
    assert step(dec.fit_decode(pts, ids)) == pytest.approx(15.0, abs=0.01)


def test_the_simulator_charges_the_sync_part_only_when_the_batch_changed() -> None:
    c, base = cal(DECODE), cal({k: v for k, v in DECODE.items() if "sync" not in k})
    r = simulate(c, 1, 1, 0, [0.0], [(16, 11)])[0]
    r0 = simulate(base, 1, 1, 0, [0.0], [(16, 11)])[0]
    # alone: its first decode step (it joined) is synchronous, the next nine are not
    assert (r.end - r.landed) - (r0.end - r0.landed) == pytest.approx((2.5 + 0.04) / 1e3)
    # a second request that ends early makes the first one's next step synchronous too
    a, b = simulate(c, 1, 1, 0, [0.0, 0.0], [(16, 11), (16, 3)])
    a0, b0 = simulate(base, 1, 1, 0, [0.0, 0.0], [(16, 11), (16, 3)])
    assert (a.end - a.landed) - (a0.end - a0.landed) > (r.end - r.landed) - (r0.end - r0.landed)


RUN = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "capstone-2gpu")


def _old_format(run_dir: str, tmp, **fields) -> str:
    """A copy of a run directory whose calibration.json has the given fields of an older
    fit (the profiles a re-render refits), whatever the committed file holds now; meta
    keys of fields go into "meta"."""
    with open(os.path.join(run_dir, "calibration.json")) as f:
        cal = json.load(f)
    for k, v in fields.items():
        if k.endswith("_fit"):
            cal.setdefault("meta", {})[k] = v
        elif v is None:
            cal.pop(k, None)
        else:
            cal[k] = v
    with open(os.path.join(tmp, "calibration.json"), "w") as f:
        json.dump(cal, f)
    for name in ("results.json", os.path.basename(records_path(run_dir))):
        os.symlink(os.path.abspath(os.path.join(run_dir, name)), os.path.join(tmp, name))
    return str(tmp)


@pytest.mark.skipif(records_path(RUN) is None,
                    reason="the 2 x H100 run directory is not in this checkout")
def test_the_validation_refits_a_decode_profile_without_the_sync_part(tmp_path) -> None:
    with open(os.path.join(RUN, "results.json")) as f:
        res = json.load(f)
    old = _old_format(RUN, tmp_path, decode={"c0": 6.26, "c_seq": 0.064, "c_ctx_token": 0.0},
                      decode_fit="token1")  # as the run itself fitted it (a re-render refits)
    assert "c_sync" not in calib.Calibration.load(os.path.join(old, "calibration.json")).decode
    c = calib.run_calibration(old, res)
    assert c.meta["decode_fit"] == dec.DECODE_FIT
    d = c.decode
    # an unchanged batch: ~6 ms + ~0.02 ms a sequence; a changed one adds a few ms more
    assert 5.0 < d["c0"] < 7.0 and 0.01 < d["c_seq"] < 0.035
    assert d["c_sync"] + d["c_sync_seq"] * 100 > 2.0
    # the steady 1P1D decode-heavy run at 40.5 req/s: ~79 sequences, 10.1 ms a step
    # measured, of which about half changed the batch; the file's line said 11.3
    assert c.decode_step_ms(79, 0.0) < 10.1 < c.decode_step_ms(79, 0.0, sync=True)
    assert c.mixed and "refitted decode step" in c.source["mixed"]

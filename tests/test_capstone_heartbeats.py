"""Heartbeat records of `pdserve bench capstone` (benchmarks/capstone_heartbeats.py) and
their replay in the planner's simulator: when the coordinator received each worker's
heartbeat decides when its routing of colocated requests flips between workers.
(The tiny-model smoke run that records them: tests/test_capstone_smoke.py.)"""

from __future__ import annotations

import random

import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks.capstone_heartbeats import HeartbeatRecorder, routed_times, run_record
from pdserve.benchmarks.planner_sim import HEARTBEAT_S, simulate

CAL = calib.Calibration(prefill={"c0": 10.0, "c_token": 0.1, "c_token2": 0.0},
                        decode={"c0": 10.0, "c_seq": 0.2, "c_ctx_token": 0.0},
                        transfer={"c0": 1.0, "ms_per_byte": 1e-6}, kv_bytes_per_token=1000.0,
                        max_batch=64, prefill_token_budget=2048)


def status(wid: str, role: str, ago: float, free: int = 100) -> dict:
    """A ListWorkers entry as coordinator/client.py `list_workers` gives it."""
    return {"info": {"worker_id": wid, "role": role}, "last_seen_s": ago,
            "load": {"free_blocks": free, "running": 0, "waiting": 0,
                     "queued_prefill_tokens": 0}}


def test_polls_of_one_heartbeat_narrow_it_and_a_later_one_is_new() -> None:
    rec = HeartbeatRecorder(None)
    # the coordinator answered somewhere in [sent, replied]: the heartbeat landed then - ago
    rec.observe(10.000, 10.010, [status("both-1", "both", 0.300)])  # in [9.700, 9.710]
    rec.observe(10.100, 10.102, [status("both-1", "both", 0.401)])  # in [9.699, 9.701]
    assert rec.beats["both-1"] == [pytest.approx([9.700, 9.701, 100, 0, 0, 0])]
    rec.observe(11.000, 11.001, [status("both-1", "both", 0.200)])  # same load, later: new
    rec.observe(11.050, 11.060, [status("both-1", "both", 0.260, free=90)])  # new load: new
    assert [round(b[0], 3) for b in rec.beats["both-1"]] == [9.7, 10.8, 10.79]
    assert rec.polls == 4 and rec.roles == {"both-1": "both"}
    rec.observe(12.0, 12.0, [{"info": {}, "load": {}}])  # no id: ignored
    assert list(rec.beats) == ["both-1"]
    with HeartbeatRecorder(None) as idle:  # no coordinator (--base-url): records nothing
        pass
    assert idle.beats == {} and idle.note


def test_run_record_is_on_the_runs_clock_and_routed_times_pick_the_role() -> None:
    beats = {"both-10": [[4.0, 4.002, 5, 1, 0, 0], [5.0, 5.002, 5, 1, 0, 0],
                         [9.0, 9.0, 5, 0, 0, 0]],
             "both-2": [[0.5, 0.6, 7, 0, 0, 0], [4.5, 4.5, 7, 2, 0, 0]],
             "prefill-1": [[4.2, 4.2, 9, 0, 0, 0]]}
    roles = {"both-10": "both", "both-2": "both", "prefill-1": "prefill"}
    rec = run_record(beats, roles, 0.1, t0=5.0, t_end=6.5)  # kept: [3.0, 7.5] around the run
    w = rec["workers"]
    assert rec["poll_s"] == 0.1 and w["both-10"]["role"] == "both"
    assert w["both-10"]["beats"] == [[-0.999, 0.001, 5, 1, 0, 0], [0.001, 0.001, 5, 1, 0, 0]]
    assert w["both-2"]["beats"] == [[-0.5, 0.0, 7, 2, 0, 0]]
    # worker ids in natural order (both-2 before both-10); only the routed role
    assert routed_times(rec, "both", 2) == [[-0.5], [-0.999, 0.001]]
    assert routed_times(rec, "decode", 1) is None  # no such worker
    assert routed_times(rec, "both", 3) is None  # a worker missing: keep the assumption
    assert routed_times(None, "both", 2) is None


def switches(reqs) -> list[float]:
    """Arrival times at which the coordinator's choice moved to another worker."""
    order = sorted(reqs, key=lambda r: r.arrival)
    return [b.arrival for a, b in zip(order, order[1:]) if a.worker != b.worker]


def colocated_run(heartbeats=None, seed: int = 0, until_s: float = 6.0):
    rng = random.Random(seed)
    arrivals = [i / 40 for i in range(int(until_s * 40))]  # 40 req/s, evenly
    ls = [(rng.randint(50, 300), rng.randint(100, 200)) for _ in arrivals]
    return simulate(CAL, 0, 0, 2, arrivals, ls, heartbeats=heartbeats)


def since_beat(t: float, phase: float) -> float:
    """Seconds from the last heartbeat of `phase` (every 1 s) to `t`."""
    d = (t - phase) % 1.0
    return 0.0 if d > 1 - 1e-6 else d


GAP = 1 / 40 + 1e-6  # the arrivals' spacing


def flip_phases(reqs, phases: set[float]) -> set[float]:
    """The phases whose heartbeats the flips after the first second follow; asserts that
    each flip is the first arrival after a heartbeat of one of `phases`."""
    seen = set()
    for t in (t for t in switches(reqs) if t >= 1.0):  # before it both snapshots are empty
        near = [p for p in phases if since_beat(t, p) <= GAP]
        assert near, f"a flip at {t:.3f} s, no heartbeat of {sorted(phases)} just before"
        seen.update(near)
    return seen


def test_recorded_heartbeat_phases_decide_when_colocated_routing_flips() -> None:
    """Nothing is reserved on a colocated worker, so its load as the coordinator sees it
    changes only at its heartbeats: the choice can flip only when one lands. Workers that
    heartbeat in step flip at most once a second and take whole seconds of requests; the
    default even stagger flips at both half seconds; recorded phases 0.0 and 0.3 at those."""
    ticks = [float(k) for k in range(7)]
    in_step = colocated_run([ticks, ticks])
    staggered = colocated_run()
    phased = colocated_run([ticks, [t + 0.3 for t in ticks]])
    assert flip_phases(in_step, {0.0}) == {0.0}
    assert flip_phases(staggered, {0.0, HEARTBEAT_S / 2}) == {0.0, 0.5}
    assert flip_phases(phased, {0.0, 0.3}) == {0.0, 0.3}
    assert len(switches(in_step)) < len(switches(staggered))  # longer runs on one worker
    with pytest.raises(ValueError, match="heartbeats for 1 workers"):
        colocated_run([ticks])


def test_recorded_heartbeats_go_on_every_period_after_the_last_one() -> None:
    """A record that ends before the run's last arrival (the recorder stopped, or a worker
    was late) continues every HEARTBEAT_S from its last heartbeat; times before the first
    arrival or after the last are not events (the loads before clock 0 are empty)."""
    short = colocated_run([[-0.7, 0.0, 1.0], [-0.2, 0.3, 1.3]])  # then 2.0, 3.0 and 2.3, 3.3
    phased = colocated_run([[float(k) for k in range(7)], [k + 0.3 for k in range(7)]])
    assert [r.worker for r in short] == [r.worker for r in phased]


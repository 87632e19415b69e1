"""The relay profile (capstone_relay.py: the host path's cost per token message and per
request set up, measured on a run's records) and the simulator's relay
(planner_relay.py: requests set up one at a time in arrival order with what the token
messages leave). Simulated and synthetic times only: nothing here is timed."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import pytest
from test_planner_push import CAL

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import capstone_decode as dec
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_relay import (
    fit_relay,
    fit_relay_points,
    relay_windows,
    saturated_windows,
    token_peak,
)
from pdserve.benchmarks.planner_batching import Loop
from pdserve.benchmarks.planner_relay import Relay
from pdserve.benchmarks.planner_setups import parse_setup
from pdserve.benchmarks.planner_sim import simulate

PROFILE = {"t_tok": 0.1, "t_req_pd": 5.0, "t_req_local": 2.0}  # ms


def _beats(running: int, waiting: int = 0, queued: int = 0, until: float = 12.0) -> dict:
    rows = [[t - 0.5, 0.001, 1000, running, waiting, queued] for t in range(int(until) + 1)]
    return {"poll_s": 0.1, "workers": {"decode-0": {"role": "decode", "beats": rows}}}


def _saturated_run() -> list[RequestResult]:
    """Sent at 100/s for 10 s; token 0 comes at 20/s in send order (a backlog that grows)
    until 10 s, every admitted request then streams 150 one-token messages 10 ms apart."""
    out = []
    for i in range(1000):
        t0 = 0.05 * i + 0.01
        out.append(RequestResult(0.01 * i, 32, [(t0 + 0.01 * k, 1) for k in range(150)]
                                 if t0 < 10 else [], target_tokens=150))
    return out


def test_saturated_windows_need_a_backlog_and_free_engines() -> None:
    run, setup = _saturated_run(), parse_setup("1P1D")
    windows = relay_windows(run, setup, _beats(running=20), max_batch=256)
    assert len(windows) >= 8  # from the first backlog of 0.5 s on
    assert all(w[0] >= 0.5 for w in windows) and all(w[3] == 0 for w in windows)
    assert all(18 <= w[2] <= 22 for w in windows if w[0] < 9)  # P/D set-ups: 20 a second
    # engines with a queue (or a full batch) are what the requests wait for: no window
    assert relay_windows(run, setup, _beats(running=20, waiting=30), 256) == []
    assert relay_windows(run, setup, _beats(running=256), 256) == []
    assert relay_windows(run, setup, _beats(running=20, queued=50_000), 256) == []
    assert relay_windows(run, setup, None, 256) == []  # no heartbeats: cannot tell
    # colocated: the same requests are local set-ups
    assert all(w[2] == 0 and w[3] > 0 for w in
               relay_windows(run, parse_setup("2both"), _beats(running=20), 256) if w[0] < 9)


def test_fit_splits_tokens_from_set_ups() -> None:
    """Windows made from a known profile give it back (t_tok from the token peak)."""
    t_tok, pd, local = 0.08, 6.0, 2.0
    pts = [(int((1000 - pd * n) / t_tok), n, 0) for n in (40, 50, 60)]
    pts += [(int((1000 - local * n) / t_tok), 0, n) for n in (50, 70)]
    fit = fit_relay_points(pts, peak_msgs=int(1000 / t_tok))
    assert fit["t_tok"] == pytest.approx(t_tok)
    assert fit["t_req_pd"] == pytest.approx(pd, rel=1e-3)
    assert fit["t_req_local"] == pytest.approx(local, rel=1e-3)
    # one kind measured: the other gets its cost
    only = fit_relay_points(pts[:3], peak_msgs=int(1000 / t_tok))
    assert only["t_req_local"] == only["t_req_pd"] == pytest.approx(pd, rel=1e-3)


def test_token_peak_counts_only_windows_without_token_0() -> None:
    run = [RequestResult(0.0, 8, [(0.5, 1)] + [(1.0 + k / 300, 1) for k in range(300)]),
           RequestResult(1.5, 8, [(3.2, 1)] + [(3.3, 1)] * 5)]
    assert token_peak(run) == 300  # window 1; window 3 holds a token 0


def test_fit_relay_reads_a_run_directory(tmp_path) -> None:
    rows = [r.to_json() for r in _saturated_run()]
    key = "1P1D|decode-heavy|100.0|0"
    doc = {"runs": {key: rows}, "heartbeats": {key: _beats(running=20)}}
    with gzip.open(tmp_path / "requests.json.gz", "wt") as f:
        json.dump(doc, f)
    cal = calib.Calibration()
    assert fit_relay(cal, str(tmp_path))
    assert set(cal.relay) == {"t_tok", "t_req_pd", "t_req_local"}
    assert cal.relay["t_tok"] == pytest.approx(1000 / token_peak(_saturated_run()))
    assert "measured" in cal.source["relay"]
    cal.save(str(tmp_path / "calibration.json"))  # stored and read back
    assert calib.Calibration.load(str(tmp_path / "calibration.json")).relay == cal.relay
    doc["heartbeats"] = {}  # a run without heartbeat records: no profile
    with gzip.open(tmp_path / "requests.json.gz", "wt") as f:
        json.dump(doc, f)
    assert not fit_relay(calib.Calibration(), str(tmp_path))


def test_an_older_calibration_has_no_relay(tmp_path) -> None:
    path = tmp_path / "calibration.json"
    d = CAL.to_json()
    del d["relay"]
    path.write_text(json.dumps(d))
    old = calib.Calibration.load(str(path))
    assert old.relay == {} and old.scaled(1.05).relay == {}
    arrivals = [0.01 * i for i in range(200)]
    lengths = [(64, 20)] * 200
    a = simulate(old, 1, 1, 0, arrivals, lengths)
    b = simulate(CAL, 1, 1, 0, arrivals, lengths)
    assert [(r.first, r.end) for r in a] == [(r.first, r.end) for r in b]


def test_relay_sets_requests_up_in_order_after_the_tokens() -> None:
    loop = Loop()
    relay = Relay(loop, PROFILE)
    done: list[tuple[str, float]] = []
    for name in "abc":
        relay.admit(name == "c", lambda n=name: done.append((n, loop.now)))
    loop.at(0.001, lambda: done.append(("tok", relay.deliver(100))))  # 10 ms of tokens
    loop.run()
    # a starts at 0, is paused at 1 ms by the tokens (to 11 ms), ends at 15 ms; then b
    # (5 ms, P/D) and c (2 ms, local)
    assert [n for n, _ in done] == ["tok", "a", "b", "c"]
    assert done[0][1] == pytest.approx(0.011)
    assert [t for _, t in done[1:]] == pytest.approx([0.015, 0.020, 0.022])


def test_relay_backlog_delays_token_0_not_the_running_streams() -> None:
    """Past the relay's capacity requests wait for set-up, in arrival order, and the wait
    grows; the requests admitted keep a TPOT near the decode step."""
    cal = dataclasses.replace(CAL, relay={"t_tok": 0.05, "t_req_pd": 20.0, "t_req_local": 20.0})
    arrivals = [0.01 * i for i in range(300)]  # 100 req/s against 50 set-ups a second
    reqs = simulate(cal, 1, 1, 0, arrivals, [(32, 20)] * 300)
    ttft = [r.ttft_ms() for r in reqs]
    assert ttft[-1] > 2000 > ttft[0]  # about 3 s behind at the end
    firsts = [r.first for r in reqs]
    assert firsts == sorted(firsts)  # set up in arrival order
    free = simulate(CAL, 1, 1, 0, arrivals, [(32, 20)] * 300)
    assert max(r.ttft_ms() for r in free) < 500
    tpot = [r.tpot_ms() for r in reqs if not math.isnan(r.end)]
    assert sum(tpot) / len(tpot) < 2 * max(r.tpot_ms() for r in free)


def test_relay_cuts_what_the_client_saw_after_the_limit() -> None:
    cal = dataclasses.replace(CAL, relay={"t_tok": 0.05, "t_req_pd": 20.0, "t_req_local": 20.0})
    reqs = simulate(cal, 1, 1, 0, [0.01 * i for i in range(300)], [(32, 20)] * 300,
                    horizon_s=2.0)
    assert all(math.isnan(r.first) or r.first <= 2.0 for r in reqs)
    assert all(math.isnan(r.end) or r.end <= 2.0 for r in reqs)
    assert any(math.isnan(r.first) for r in reqs)


def _steady_run() -> list[RequestResult]:
    """Sent at 10/s, nothing waits: 50 tokens 8 ms apart each (the decode step)."""
    return [RequestResult(0.1 * i, 32, [(0.1 * i + 0.02 + 0.008 * k, 1) for k in range(50)],
                          target_tokens=50) for i in range(20)]


def test_the_decode_fit_leaves_out_the_requests_that_decoded_in_saturated_windows(tmp_path
                                                                                  ) -> None:
    sat, steady = "1P1D|decode-heavy|100.0|0", "1P1D|decode-heavy|10.0|0"
    doc = {"runs": {sat: [r.to_json() for r in _saturated_run()],
                    steady: [r.to_json() for r in _steady_run()]},
           "heartbeats": {sat: _beats(running=20), steady: _beats(running=20)}}
    with gzip.open(tmp_path / "requests.json.gz", "wt") as f:
        json.dump(doc, f)
    windows = saturated_windows(str(tmp_path), 256, kind="P/D")
    assert set(windows) == {sat} and all(hi - lo == 1.0 for lo, hi in windows[sat])
    assert saturated_windows(str(tmp_path), 256, kind="colocated") == {}
    cal = calib.Calibration()
    cal.relay = dict(PROFILE)
    assert calib.fit_decode_unsaturated(cal, str(tmp_path), always=False)
    # every admitted request of the saturated run (token 0 before 10 s: 200) decoded in a
    # saturated window
    assert cal.meta["decode_left_out"] == "200" and "200 requests left out" in cal.source["decode"]
    for sync in (False, True):  # the steady run's step
        assert cal.decode_step_ms(28, 3000, sync) == pytest.approx(8.0, abs=0.5)
    every = calib.Calibration()  # no relay profile: nothing is left out, the 10 ms steps count
    assert not calib.fit_decode_unsaturated(every, str(tmp_path), always=False)
    assert calib.fit_decode_unsaturated(every, str(tmp_path))
    assert every.meta["decode_left_out"] == "0"
    assert every.decode_step_ms(28, 3000) > 9.5  # the saturated run: 10 ms at its batch


def test_the_decode_fit_keeps_a_run_s_requests_outside_its_saturated_windows() -> None:
    """A run whose relay backs up late: its requests before the window (8 ms a step) count,
    those decoding in it (their tokens 20 ms apart at the client) do not."""
    def req(t0: float, step_ms: float) -> RequestResult:
        return RequestResult(t0, 32, [(t0 + 0.01 + step_ms / 1e3 * k, 1) for k in range(40)],
                             target_tokens=40)
    early = [req(0.05 * i, 8.0) for i in range(40)]  # done by 2.3 s
    late = [req(3.0 + 0.05 * i, 20.0) for i in range(40)]
    cal = calib.Calibration()
    assert dec.fit_runs(cal, [early + late], [[(3.0, 4.0), (4.0, 5.0)]])
    assert cal.meta["decode_left_out"] == "40"
    assert cal.decode_step_ms(4, 300) == pytest.approx(8.0, abs=0.5)
    kept_all = calib.Calibration()
    assert dec.fit_runs(kept_all, [early + late])
    late_batch = float(kept_all.meta["decode_max_batch"])  # the late requests' batch
    assert late_batch > 12 > float(cal.meta["decode_max_batch"])
    assert kept_all.decode_step_ms(late_batch, late_batch * 52) > 15.0


def test_relay_works_at_the_host_costs_until_a_backlog_builds() -> None:
    """Below its knee the relay costs what the host probe measured; once a request has
    waited over BACKLOG_S to be set up, what the saturated windows measured (the collapse
    the records show), and the host's again once the backlog is gone."""
    from pdserve.benchmarks.planner_relay import BACKLOG_S

    host = {"t_tok": 0.05, "t_req_pd": 2.0, "t_req_local": 1.0}
    loop = Loop()
    relay = Relay(loop, PROFILE, host)
    done: list[float] = []
    relay.admit(False, lambda: done.append(loop.now))
    loop.run()
    assert done == pytest.approx([0.002])  # the host's 2 ms, not the profile's 5
    # 400 P/D requests at once: 0.8 s of set-ups at the host's cost; past BACKLOG_S the
    # queue's head has waited too long and the rest costs the profile's 5 ms each
    t0 = loop.now
    for _ in range(400):
        relay.admit(False, lambda: done.append(loop.now))
    loop.at(t0 + BACKLOG_S + 0.1, lambda: done.append(-relay.deliver(10)))
    loop.run()
    after = [t for t in done[1:] if t > 0]
    steps = [b - a for a, b in zip(after, after[1:])]
    assert steps[0] == pytest.approx(0.002)
    assert steps[-1] == pytest.approx(0.005)
    assert -min(done) == pytest.approx(t0 + BACKLOG_S + 0.1 + 10 * 0.1e-3, abs=0.006)
    # drained: the host's costs again
    relay.admit(True, lambda: done.append(loop.now))
    start = loop.now
    loop.run()
    assert done[-1] - start == pytest.approx(0.001)


def test_a_relay_with_one_profile_keeps_its_costs() -> None:
    for profile, host in ((PROFILE, None), (None, PROFILE)):
        loop = Loop()
        relay = Relay(loop, profile, host)
        done: list[float] = []
        for _ in range(300):  # 1.5 s of set-ups: a backlog past BACKLOG_S
            relay.admit(False, lambda d=done, lp=loop: d.append(lp.now))
        loop.run()
        assert done[-1] == pytest.approx(300 * 0.005)
    with pytest.raises(ValueError):
        Relay(Loop(), None, None)
    cal = dataclasses.replace(CAL, relay_host=dict(PROFILE))
    reqs = simulate(cal, 1, 1, 0, [0.01 * i for i in range(50)], [(32, 20)] * 50)
    assert all(r.first > r.arrival + 0.005 for r in reqs)  # set up by the host's relay


def test_a_stream_interval_sends_fewer_token_messages() -> None:
    """Workers streaming 4 tokens a message after a stream's first (`stream interval`) load
    the relay with about a quarter of the token messages: a token-bound relay that makes
    token 0 wait seconds with one token a message keeps up with four."""
    from pdserve.benchmarks.planner_batching import SimReq

    # which tokens go out: P/D (token 0 came with the prefill reply) and local streams
    r = SimReq(0.0, 8, 10)
    sent = []
    for g in range(1, 10):
        r.generated = g
        sent.append(r.sends(4, local=False))
    assert [g for g, s in zip(range(1, 10), sent) if s] == [1, 5, 9]  # first, +4, the last
    r = SimReq(0.0, 8, 7)
    sent = [g for g in range(1, 7) if (setattr(r, "generated", g) or r.sends(3, local=True))]
    assert sent == [3, 6]  # token 0 went with the prompt's step; then every 3rd, the last

    relay = {"t_tok": 0.7, "t_req_pd": 0.1, "t_req_local": 0.1}  # 1,430 messages a second
    arrivals = [0.01 * i for i in range(300)]  # 100 req/s x 20 tokens: 2,000 tokens a second
    one = dataclasses.replace(CAL, relay=relay, meta={})
    four = dataclasses.replace(CAL, relay=relay, meta={"stream interval": "4"})
    slow = simulate(one, 1, 1, 0, arrivals, [(32, 20)] * 300)
    fast = simulate(four, 1, 1, 0, arrivals, [(32, 20)] * 300)
    assert max(r.ttft_ms() for r in slow) > 1000 > 100 > max(r.ttft_ms() for r in fast)
    assert all(not math.isnan(r.end) for r in fast)
    # without a relay the interval changes nothing the client sees
    plain = [dataclasses.replace(CAL, meta=m) for m in ({}, {"stream interval": "4"})]
    a, b = (simulate(c, 1, 1, 0, arrivals[:50], [(32, 20)] * 50) for c in plain)
    assert [(x.first, x.end) for x in a] == [(x.first, x.end) for x in b]


def test_the_mixed_fit_and_the_message_count_follow_the_workers_stream_interval() -> None:
    from pdserve.benchmarks.capstone_guess import kv_push_meta, stream_interval
    from pdserve.benchmarks.capstone_mixed import fit_mixed

    assert stream_interval([]) == 1
    assert stream_interval(["--no-layerwise", "--stream-interval", "4"]) == 4
    assert stream_interval(["--stream-interval=2"]) == 2
    import argparse

    ns = argparse.Namespace(coordinator=None, base_url=None,
                            worker_arg=["--stream-interval=4"])
    assert kv_push_meta(ns)["stream interval"] == "4"
    cal = calib.Calibration(meta={"stream interval": "4"})
    assert not fit_mixed(cal, []) and "several tokens a message" in cal.source["mixed"]

"""The simulated coordinator routes as pdserve's does: with `KVPush.counts_generate` (the
coordinator since session 12) a colocated request's prompt counts against its worker until
the next heartbeat, so requests between two heartbeats spread; without (every run before)
they all go to the worker that looked freest at the last one. With `KVPush.counts_release`
(since session 13) a request that ended gives its blocks back until then."""

from __future__ import annotations

import pytest

from pdserve.benchmarks.capstone_calibration import Calibration
from pdserve.benchmarks.planner_setups import KVPush
from pdserve.benchmarks.planner_sim import simulate


def _workers(push: KVPush, both: int = 0, decode: int = 0, cond: int = 0) -> list[str]:
    """The workers of 12 short prompts arriving over 0.3 s after one of 1024 tokens went to
    the first worker; both workers' heartbeats, at 0 and 0.2 s, report it there."""
    arrivals = [0.01] + [0.25 + 0.025 * i for i in range(12)]
    reqs = simulate(Calibration(), 1 if decode else 0, decode, both, arrivals,
                    [(1024, 400)] + [(256, 8)] * 12, cond_tokens=cond, push=push,
                    heartbeats=[[0.0, 0.2]] * 2)
    assert reqs[0].worker.endswith("-0")
    return [r.worker for r in reqs[1:]]


@pytest.mark.parametrize("setup", [{"both": 2}, {"decode": 2, "cond": 2048}])
def test_generates_between_heartbeats_spread_when_counted(setup) -> None:
    old = _workers(KVPush(), **setup)
    new = _workers(KVPush(counts_generate=True), **setup)
    assert len(set(old)) == 1, old  # the freest at the last heartbeat takes them all
    # counted: the second worker until it holds about as much as the first, then both
    assert new[:4] == old[:4] and 3 <= sum(w.endswith("-0") for w in new) <= 6, new


def test_counts_generate_is_recorded_and_replayed() -> None:
    assert KVPush.current().counts_generate  # the installed coordinator counts them
    assert not KVPush.from_meta({}).counts_generate  # a run that did not record it: the old
    cur = KVPush.current()
    assert KVPush.from_meta(cur.meta()) == cur


def _short_ones(push: KVPush) -> list[str]:
    """The workers of 8 short requests, one every 0.1 s, each done before the next comes,
    after a long one went to the first worker; heartbeats at 0 s only (the next at 1 s)."""
    arrivals = [0.01] + [0.05 + 0.1 * i for i in range(8)]
    reqs = simulate(Calibration(), 0, 0, 2, arrivals, [(1024, 400)] + [(256, 8)] * 8,
                    push=push, heartbeats=[[0.0]] * 2)
    assert reqs[0].worker.endswith("-0")
    assert all(a.end < b.arrival for a, b in zip(reqs[1:], reqs[2:]))  # one at a time
    return [r.worker for r in reqs[1:]]


def test_ended_requests_give_their_blocks_back_when_counted() -> None:
    held = _short_ones(KVPush(counts_generate=True))
    released = _short_ones(KVPush(counts_generate=True, counts_release=True))
    # counted until the heartbeat, the short ones fill the second worker's count past the
    # long one's and then take turns; given back, the second worker stays the freer one
    assert any(w.endswith("-0") for w in held), held
    assert all(w.endswith("-1") for w in released), released


def test_counts_release_is_recorded_and_replayed() -> None:
    assert KVPush.current().counts_release  # the installed coordinator gives them back
    assert not KVPush.from_meta({}).counts_release
    assert KVPush.from_meta(KVPush(counts_release=True).meta()).counts_release

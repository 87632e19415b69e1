"""Failure handling through fake workers: every request ends, migration keeps the stream
whole, failures are charged to the side that failed, circuit breakers, counters."""

from __future__ import annotations

import threading

import grpc
import pytest
from fake_worker import Knobs, assert_no_leaks, fake_outputs, wait_until

from pdserve.coordinator.client import Client, ClientError
from pdserve.coordinator.config import FailureConfig
from pdserve.coordinator.health import HealthBook
from pdserve.proto import pdserve_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def ids_of(c) -> set[str]:
    return {w.worker_id for w in c.coord.orch.registry.workers()}


def stream_all(address: str, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    with Client(address, timeout_s=20) as cl:
        out: list[int] = []
        for chunk in cl.stream(prompt_token_ids=prompt, max_tokens=max_tokens, **kw):
            out += chunk.token_ids
        return out


def test_decode_death_mid_stream_migrates_with_no_gap_or_repeat(make_cluster):
    c = make_cluster()
    c.add("prefill")
    bad = c.add("decode", knobs=Knobs(chunk_tokens=2, chunk_delay_s=0.01, die_after_chunks=3))
    good = c.add("decode", num_blocks=32)  # fewer free blocks: least_loaded tries `bad` first
    assert stream_all(c.address, [1, 2], 30) == fake_outputs([1, 2], 30)[0]
    with Client(c.address) as cl:
        s = cl.stats()
        assert s["requests_migrated"] == 1 and s["requests_finished"] == 1
        assert s["requests_active"] == 0
    assert bad.dead and bad.worker_id not in ids_of(c) and good.worker_id in ids_of(c)
    assert_no_leaks(c)


def test_stalled_stream_is_migrated_and_its_worker_suspect(make_cluster):
    c = make_cluster(failure=FailureConfig(stall_timeout_s=0.4))
    c.add("prefill")
    slow = c.add("decode", knobs=Knobs(chunk_tokens=3, stall_after_chunks=2))
    c.add("decode", num_blocks=32)
    got = stream_all(c.address, [5], 20, seed=3, temperature=0.7)
    assert got == fake_outputs([5], 20)[0]
    health = c.coord.orch.registry.health
    h = c.coord.orch.registry.workers(pb.ROLE_DECODE)
    assert health.is_suspect(slow.worker_id, next(w for w in h if w is not None
                                                  and w.worker_id == slow.worker_id).last_seen)
    # While suspect, new requests go to the healthy decode worker, though `slow` has more room.
    with Client(c.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[9], max_tokens=4)
        assert r.token_ids == fake_outputs([9], 4)[0] and r.metrics["decode_worker"] != slow.worker_id
    assert_no_leaks(c)


def test_dropped_worker_ends_or_migrates_every_in_flight_stream(make_cluster):
    """The original hang: dropping a worker closes its channel, which cancels every call
    on it; each of those requests must migrate (or end with a status), never hang."""
    c = make_cluster()
    c.add("prefill")
    d1 = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02))
    c.add("decode", num_blocks=32)
    out: dict[int, list[int] | BaseException] = {}

    def one(i: int) -> None:
        try:
            out[i] = stream_all(c.address, [i + 1], 40)
        except BaseException as e:  # noqa: BLE001
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(d1.calls.count(("DecodeStream", r)) for _, r in d1.calls) >= 1
               and len(d1.reqs) >= 4, what="streams on d1")
    reg = c.coord.orch.registry
    c.lt.loop.call_soon_threadsafe(reg.drop, d1.worker_id, "test: dropped")
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert all(out[i] == fake_outputs([i + 1], 40)[0] for i in range(8)), out
    with Client(c.address) as cl:
        s = cl.stats()
        assert s["requests_active"] == 0 and s["requests_migrated"] >= 1


def test_unreachable_decode_kv_endpoint_is_charged_to_decode(make_cluster):
    c = make_cluster()
    p1, p2 = c.add("prefill"), c.add("prefill")
    bad = c.add("decode", knobs=Knobs(bad_kv_address=True))
    c.add("decode", num_blocks=32)
    with Client(c.address, timeout_s=10) as cl:
        for i in range(6):
            r = cl.generate(prompt_token_ids=[i + 1], max_tokens=3)
            assert r.token_ids == fake_outputs([i + 1], 3)[0]
        assert cl.stats()["requests_failed"] == 0
    health = c.coord.orch.registry.health
    assert {p1.worker_id, p2.worker_id} <= ids_of(c)  # healthy prefill workers kept
    assert health.charged(p1.worker_id) == health.charged(p2.worker_id) == 0
    assert health.charged(bad.worker_id) >= 1
    assert_no_leaks(c)


def test_only_decode_dies_after_tokens_fails_with_a_clear_status(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02, die_after_chunks=5))
    with pytest.raises(ClientError) as e:
        stream_all(c.address, [1], 50)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "tokens were streamed" in e.value.details and "no decode worker" in e.value.details
    with Client(c.address) as cl:
        assert cl.stats()["requests_active"] == 0


def test_stats_count_cancelled_and_rejected_apart(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.05))
    with Client(c.address) as cl:
        with pytest.raises(ClientError):
            cl.generate(prompt_token_ids=[1], temperature=-1.0)  # rejected
        with pytest.raises(ClientError):
            cl.generate(prompt_token_ids=[1], max_tokens=100, timeout_s=0.3)  # deadline
        wait_until(lambda: cl.stats()["requests_active"] == 0, what="deadline noticed")
        s = cl.stats()
        assert s["requests_failed"] == 1  # the deadline; a rejection is not a server failure
        assert s["requests_rejected"] == 1 and s["requests_cancelled"] == 0


def test_circuit_breaker_opens_then_closes():
    now = [100.0]
    h = HealthBook(FailureConfig(breaker_failures=3, breaker_window_s=10, breaker_open_s=5),
                   heartbeat_s=1.0, clock=lambda: now[0])
    for _ in range(5):  # one crash failing many requests at once is one event
        h.charge("d1", "boom")
    assert not h.broken("d1")
    for _ in range(2):
        now[0] += 2
        h.charge("d1", "boom")
    assert h.broken("d1") and not h.broken("d2")
    now[0] += 5.1
    assert not h.broken("d1")
    for _ in range(2):  # failures spread wider than the window never open it
        now[0] += 11
        h.charge("d2", "slow")
    assert not h.broken("d2")


def test_colocated_worker_death_mid_stream_migrates(make_cluster):
    c = make_cluster()
    c.add("both", knobs=Knobs(chunk_tokens=3, chunk_delay_s=0.01, die_after_chunks=2))
    c.add("both", num_blocks=32)
    assert stream_all(c.address, [40, 41], 25, seed=9, temperature=1.0) == \
        fake_outputs([40, 41], 25)[0]
    with Client(c.address) as cl:
        assert cl.stats()["requests_migrated"] == 1
    assert_no_leaks(c)


def test_registered_but_silent_worker_gets_no_work_while_others_serve(make_cluster):
    """A Register from something that never heartbeats (a dead address) is not routed to
    while workers that heartbeat exist."""
    c = make_cluster()
    c.add("prefill")
    c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        wait_until(lambda: all(w.heartbeats for w in c.coord.orch.registry.workers()),
                   what="first heartbeats")
        info = pb.WorkerInfo(role=pb.ROLE_PREFILL, address="127.0.0.1:1", model="fake-model")
        ghost = c.lt.run(_register(c, info))
        for i in range(5):
            assert cl.generate(prompt_token_ids=[i + 1], max_tokens=2).token_ids == \
                fake_outputs([i + 1], 2)[0]
        assert cl.stats()["requests_retried"] == 0
    assert ghost in ids_of(c)  # never tried, so never dropped (the reaper will)


async def _register(c, info: pb.WorkerInfo) -> str:
    return c.coord.orch.registry.register(info).worker_id


def test_routable_skips_open_circuits_unless_all_are_open():
    from pdserve.coordinator.registry import Registry, WorkerHandle

    reg = Registry(health=HealthBook(FailureConfig(breaker_failures=1), heartbeat_s=1.0))
    for wid in ("d1", "d2"):
        h = WorkerHandle(info=pb.WorkerInfo(worker_id=wid, role=pb.ROLE_DECODE, address="x:1"),
                         channel=None, stub=None)
        h.heartbeats = 1
        reg._workers[wid] = h
    reg.health.charge("d1", "boom")
    assert [w.worker_id for w in reg.routable(pb.ROLE_DECODE)] == ["d2"]
    reg.health.charge("d2", "boom")  # every circuit open: use them all rather than none
    assert sorted(w.worker_id for w in reg.routable(pb.ROLE_DECODE)) == ["d1", "d2"]
    assert [w.worker_id for w in reg.routable(pb.ROLE_DECODE, excluded={"d1"})] == ["d2"]

"""Coordinator end to end through fake workers: flows, streaming, cancellation, liveness."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from fake_worker import Knobs, assert_no_leaks, fake_outputs, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.coordinator.client import AsyncClient, Client, ClientError

pytestmark = pytest.mark.timeout(30)



def test_health_and_reflection(make_cluster):
    c = make_cluster()
    w = c.add("decode")
    for addr, service in ((c.address, "pdserve.v1.Coordinator"), (w.address, "pdserve.v1.Worker")):
        with grpc.insecure_channel(addr) as ch:
            h = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names
            req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
            (resp,) = list(refl.ServerReflectionInfo(iter([req]), timeout=5))
            assert resp.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("n_p,n_d", [(1, 1), (2, 2)])
def test_disaggregated_tokens_in_order(make_cluster, n_p, n_d):
    c = make_cluster()
    ps = [c.add("prefill") for _ in range(n_p)]
    ds = [c.add("decode", knobs=Knobs(chunk_tokens=3)) for _ in range(n_d)]
    with Client(c.address, timeout_s=10) as cl:
        for i in range(6):
            prompt = [5 + i, 6, 7 + i]
            chunks = list(cl.stream(prompt_token_ids=prompt, max_tokens=10))
            expected, reason = fake_outputs(prompt, 10)
            assert chunks[0].token_ids == expected[:1]  # the first token comes from prefill
            assert [t for ch in chunks for t in ch.token_ids] == expected
            assert chunks[-1].finished and chunks[-1].finish_reason == reason == "length"
            assert all(not ch.finished for ch in chunks[:-1])
            m = chunks[-1].metrics
            assert m["completion_tokens"] == 10 and m["prompt_tokens"] == 3 and m["kv_bytes"] > 0
        r = cl.generate("abc", max_tokens=4)
        assert r.text == "defg" and r.finish_reason == "length"
    used_p = {rid for w in ps for rpc, rid in w.calls if rpc == "Prefill"}
    assert len(used_p) == 7
    if n_p == 2:  # least_loaded spreads over both pools
        assert all(any(rpc == "Prefill" for rpc, _ in w.calls) for w in ps)
        assert all(any(rpc == "Reserve" for rpc, _ in w.calls) for w in ds)
    assert_no_leaks(c)


def test_stop_token_and_single_token_requests(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[10], max_tokens=20, stop_token_ids=[15])
        assert r.token_ids == [11, 12, 13, 14, 15] and r.finish_reason == "stop"
        r = cl.generate(prompt_token_ids=[10], max_tokens=1)  # finished by the prefill reply
        assert r.token_ids == [11] and r.finish_reason == "length"
        r = cl.generate(prompt_token_ids=[997], max_tokens=5)  # EOS (999) stops
        assert r.token_ids == [998, 999] and r.finish_reason == "stop"
    assert_no_leaks(c)


def test_colocated_only_both_workers(make_cluster):
    c = make_cluster()
    ws = [c.add("both"), c.add("both")]
    with Client(c.address, timeout_s=10) as cl:
        for i in range(4):
            r = cl.generate(prompt_token_ids=[1, 2, i], max_tokens=9)
            assert r.token_ids == fake_outputs([1, 2, i], 9)[0]
            assert r.metrics["prefill_worker"] == r.metrics["decode_worker"]
    assert all(rpc == "Generate" for w in ws for rpc, _ in w.calls)
    assert sum(len(w.calls) for w in ws) == 4
    # With prefill and decode workers present, the disaggregated path is used.
    c.add("prefill")
    c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[3], max_tokens=3)
        assert r.metrics["prefill_worker"].startswith("prefill")
    assert_no_leaks(c)


def test_colocated_requests_between_heartbeats_spread(make_cluster):
    """Between two heartbeats the coordinator's view of a worker's free blocks is the last
    one reported less what it routed there since: a Generate's prompt blocks count, so
    requests spread instead of all going to the worker that looked freest (64 blocks
    against 60 here, both idle: every request went to the first)."""
    c = make_cluster(heartbeat_s=5.0)  # no heartbeat after registration during the test
    slow = Knobs(chunk_tokens=1, chunk_delay_s=0.05)  # every stream open while all route
    big, small = c.add("both", num_blocks=64, knobs=slow), c.add("both", num_blocks=60, knobs=slow)
    prompts = [[7] * 40 + [i] for i in range(8)]  # 3 blocks each

    async def main():
        async with AsyncClient(c.address, timeout_s=20) as cl:
            async def one(p):
                return [t async for ch in cl.stream(prompt_token_ids=p, max_tokens=8)
                        for t in ch.token_ids]
            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == [fake_outputs(p, 8)[0] for p in prompts]
    served = [sum(rpc == "Generate" for rpc, _ in w.calls) for w in (big, small)]
    assert sum(served) == 8 and min(served) >= 3, served
    assert_no_leaks(c)


def test_requests_that_ended_between_heartbeats_free_their_worker(make_cluster):
    """A request that ended gives its blocks back to the coordinator's count until the
    next heartbeat: one after another, every request finds the larger worker (64 blocks
    against 60) as free as at its heartbeat. Before, the ended requests' blocks stayed
    counted, and from the third request on the two workers took turns."""
    c = make_cluster(heartbeat_s=5.0)  # no heartbeat after registration during the test
    big, small = c.add("both", num_blocks=64), c.add("both", num_blocks=60)
    with Client(c.address, timeout_s=10) as cl:
        for i in range(8):
            r = cl.generate(prompt_token_ids=[7] * 40 + [i], max_tokens=2)  # 3 blocks each
            assert r.token_ids == fake_outputs([7] * 40 + [i], 2)[0]
    served = [sum(rpc == "Generate" for rpc, _ in w.calls) for w in (big, small)]
    assert served == [8, 0], served
    assert_no_leaks(c)


def test_fifty_concurrent_streams(make_cluster):
    c = make_cluster()
    for role in ("prefill", "prefill", "decode", "decode"):
        c.add(role, num_blocks=512, knobs=Knobs(chunk_tokens=5, chunk_delay_s=0.001))

    async def main():
        async with AsyncClient(c.address, timeout_s=20) as cl:
            async def one(i):
                prompt = [i, i + 1]
                got = []
                async for ch in cl.stream(prompt_token_ids=prompt, max_tokens=40):
                    got += ch.token_ids
                return got == fake_outputs(prompt, 40)[0]

            return await asyncio.gather(*(one(i) for i in range(50)))

    assert all(asyncio.run(main()))
    with Client(c.address) as cl:
        s = cl.stats()
    assert s["requests_finished"] == 50 and s["requests_active"] == 0
    assert s["tokens_total"] == 50 * 40 and s["tokens_per_s"] > 0
    assert_no_leaks(c)


def test_cancel_mid_stream_aborts_both_workers(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=2, chunk_delay_s=0.02))
    with Client(c.address, timeout_s=10) as cl:
        it = cl.stream(prompt_token_ids=[1, 2, 3], max_tokens=200, request_id="cancel-me")
        first, second = next(it), next(it)
        assert first.token_ids == [4] and second.token_ids == [5, 6]
        assert d.free < d.total
        it.close()  # the client cancels the RPC
        wait_until(lambda: "cancel-me" in d.aborts and "cancel-me" in p.aborts, what="Abort")
        assert_no_leaks(c)
        live = cl.stats(live=True)
        assert all(w["load"]["free_blocks"] == w["load"]["total_blocks"] for w in live["workers"])
        wait_until(lambda: cl.stats()["requests_active"] == 0, what="request closed")
        assert cl.generate(prompt_token_ids=[1], max_tokens=3).token_ids == [2, 3, 4]


def test_abort_rpc_cancels_a_request(make_cluster):
    c = make_cluster()
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02))
    with Client(c.address, timeout_s=10) as cl:
        it = cl.stream(prompt_token_ids=[1], max_tokens=500, request_id="r-abort")
        next(it)
        assert cl.abort("r-abort") is True
        with pytest.raises(ClientError) as e:
            list(it)
        assert e.value.code == grpc.StatusCode.CANCELLED and "aborted" in e.value.details
        assert cl.abort("no-such-request") is False
        wait_until(lambda: "r-abort" in d.aborts, what="Abort on decode")
    assert_no_leaks(c)


def test_dead_worker_is_dropped_after_timeout(make_cluster):
    c = make_cluster(worker_timeout_s=0.3)
    c.add("prefill")
    c.add("decode")
    d2 = c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        assert len(cl.list_workers()) == 3
        t0 = time.monotonic()
        c.lt.run(d2.kill())
        wait_until(lambda: d2.worker_id not in {w["info"]["worker_id"] for w in cl.list_workers()},
                   what="dead worker dropped")
        assert time.monotonic() - t0 >= 0.25
        assert len(cl.list_workers()) == 2
        assert cl.generate(prompt_token_ids=[1], max_tokens=3).token_ids == [2, 3, 4]


def test_silent_but_alive_worker_is_dropped_and_reregisters(make_cluster):
    c = make_cluster(worker_timeout_s=0.3)
    w = c.add("both")
    with Client(c.address, timeout_s=10) as cl:
        w.link.paused = True
        wait_until(lambda: not cl.list_workers(), what="silent worker dropped")
        w.link.paused = False  # HeartbeatReply.known = false -> registers again
        wait_until(lambda: len(cl.list_workers()) == 1, what="re-registered")
        assert cl.generate(prompt_token_ids=[1], max_tokens=2).token_ids == [2, 3]


def test_prefill_death_before_first_token_is_retried(make_cluster):
    c = make_cluster()
    bad = c.add("prefill", knobs=Knobs(die_on_prefill=True))
    good = c.add("prefill", knobs=Knobs(extra_queued_tokens=10**6))  # least_loaded picks `bad`
    d = c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[1, 2], max_tokens=6, request_id="retry-me")
        assert r.token_ids == fake_outputs([1, 2], 6)[0]
        assert r.metrics["prefill_worker"] == good.worker_id
        assert ("Prefill", "retry-me") in bad.calls
        assert "retry-me" in d.aborts  # the first attempt's reservation was released
        wait_until(lambda: bad.worker_id not in {w["info"]["worker_id"] for w in cl.list_workers()},
                   what="failed prefill worker dropped")
    assert_no_leaks(c)


def test_decode_death_after_tokens_fails_cleanly(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.05))
    with Client(c.address, timeout_s=10) as cl:
        it = cl.stream(prompt_token_ids=[1], max_tokens=100)
        next(it)
        c.lt.run(d.kill())
        with pytest.raises(ClientError) as e:
            list(it)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "decode worker" in e.value.details and "not retried" in e.value.details
        wait_until(lambda: p.free == p.total, what="prefill blocks freed")
        assert cl.stats()["requests_failed"] == 1


def test_queued_request_runs_when_capacity_appears(make_cluster):
    c = make_cluster(max_queue=4)
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(refuse_reserve=True))
    out = {}

    def go():
        with Client(c.address, timeout_s=10) as cl:
            out["r"] = cl.generate(prompt_token_ids=[7], max_tokens=3)

    t = threading.Thread(target=go)
    t.start()
    with Client(c.address) as cl:
        wait_until(lambda: cl.stats()["requests_queued"] == 1, what="request queued")
    d.knobs.refuse_reserve = False
    t.join(10)
    assert out["r"].token_ids == [8, 9, 10] and out["r"].metrics["queue_ms"] > 0

"""Reserve and Prefill at once (coordinator/pd_attempt.py), through fake workers: the prefill
starts before the reservation returns and gets it by SetKvTarget; a reservation refused or
failing after the Prefill was sent aborts the Prefill (no KV blocks held on the prefill
worker while the request queues) and falls back to the sequential path."""

from __future__ import annotations

import threading

import grpc
import pytest
from fake_worker import Knobs, assert_no_leaks, fake_outputs, wait_until

from pdserve.coordinator.client import Client, ClientError
from pdserve.coordinator.request import worker_request_id
from pdserve.proto.convert import MAX_REQUEST_ID_CHARS

pytestmark = pytest.mark.timeout(30)


def test_prefill_runs_while_the_decode_worker_reserves(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(reserve_delay_s=0.3))
    with Client(c.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[3, 4, 5], max_tokens=6, request_id="both-at-once")
    assert r.token_ids == fake_outputs([3, 4, 5], 6)[0] and r.finish_reason == "length"
    # token 0 was ready before the reservation: it waited for it at the coordinator
    assert r.metrics["reserve_wait_ms"] > 0 and r.metrics["queue_ms"] == 0
    assert [rpc for rpc, rid in p.calls if rid == "both-at-once"] == ["Prefill", "SetKvTarget"]
    assert [rpc for rpc, rid in d.calls if rid == "both-at-once"] == ["Reserve", "DecodeStream"]
    assert_no_leaks(c)


def test_refused_reservation_frees_the_prefill_while_queued(make_cluster):
    c = make_cluster(max_queue=4)
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(refuse_reserve=True))
    out: dict = {}

    def go() -> None:
        with Client(c.address, timeout_s=10) as cl:
            out["r"] = cl.generate(prompt_token_ids=[7, 8], max_tokens=4, request_id="waits")

    t = threading.Thread(target=go)
    t.start()
    with Client(c.address) as cl:
        wait_until(lambda: cl.stats()["requests_queued"] == 1, what="request queued")
    wait_until(lambda: "waits" in p.aborts and p.free == p.total, what="prefill aborted")
    assert ("Prefill", "waits") in p.calls and not p.reqs
    d.knobs.refuse_reserve = False
    t.join(10)
    r = out["r"]
    assert r.token_ids == fake_outputs([7, 8], 4)[0] and r.metrics["queue_ms"] > 0
    assert r.metrics["reserve_wait_ms"] == 0  # the sequential path: reserved before prefill
    # the sequential attempt runs under its own worker request id, with the target in it
    assert ("Prefill", "waits-q") in p.calls and ("SetKvTarget", "waits-q") not in p.calls
    assert_no_leaks(c)


def test_failing_reservation_aborts_the_prefill(make_cluster):
    c = make_cluster(max_queue=4)
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(fail_reserve=True))
    with Client(c.address) as cl:
        with pytest.raises(ClientError) as e:
            cl.generate(prompt_token_ids=[1, 2], max_tokens=3, request_id="no-room",
                        timeout_s=1.0)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # it queued, asking again while the failures lasted, with no prefill blocks held
        assert sum(rpc == "Reserve" for rpc, _ in d.calls) >= 2
        wait_until(lambda: "no-room" in p.aborts, what="prefill aborted")
        assert_no_leaks(c)
        d.knobs.fail_reserve = False
        r = cl.generate(prompt_token_ids=[1, 2], max_tokens=3)
        assert r.token_ids == fake_outputs([1, 2], 3)[0]
    assert_no_leaks(c)


def test_no_decode_worker_left_aborts_the_prefill(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(reserve_delay_s=0.3))
    reg = c.coord.orch.registry

    def drop_soon() -> None:
        wait_until(lambda: ("Reserve", "lonely") in d.calls, what="Reserve sent")
        c.lt.loop.call_soon_threadsafe(reg.drop, d.worker_id, "test: dropped")

    t = threading.Thread(target=drop_soon)
    t.start()
    with Client(c.address, timeout_s=10) as cl, pytest.raises(ClientError) as e:
        cl.generate(prompt_token_ids=[4], max_tokens=3, request_id="lonely")
    t.join(5)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "decode" in e.value.details
    wait_until(lambda: "lonely" in p.aborts and p.free == p.total, what="prefill aborted")


def test_worker_request_ids_stay_within_the_limit():
    assert worker_request_id("r1", "-q") == "r1-q"
    a, b = "x" * 255 + "a", "x" * 255 + "b"
    ids = {worker_request_id(base, suffix) for base in (a, b) for suffix in ("-q", "-a1")}
    assert len(ids) == 4 and all(len(i) <= MAX_REQUEST_ID_CHARS for i in ids)
    assert all(i.endswith(("-q", "-a1")) for i in ids)

"""The coordinator warms a new worker's P/D pairs before registering it (coordinator/warmup.py)."""

from __future__ import annotations

from fake_worker import Knobs

from pdserve.coordinator.client import Client


def rpcs(worker) -> list[str]:
    return [rpc for rpc, rid in worker.calls if rid.startswith("warm-up-")]


def test_new_workers_are_warmed_with_each_peer_before_they_register(make_cluster):
    c = make_cluster(warm_up_s=5.0)
    d1 = c.add("decode")
    assert rpcs(d1) == []  # nobody to pair with yet
    p = c.add("prefill")  # warmed with d1 before it shows up
    assert rpcs(p) == ["Prefill"] and sorted(rpcs(d1)) == ["DecodeStream", "Reserve"]
    d2 = c.add("decode")  # warmed with p
    assert sorted(rpcs(d2)) == ["DecodeStream", "Reserve"] and rpcs(p) == ["Prefill", "Prefill"]
    assert all(free == total for free, total in c.loads())  # warm-ups leave nothing held
    with Client(c.address, timeout_s=10) as cl:
        assert len(cl.list_workers()) == 3
        assert cl.generate(prompt_token_ids=[1, 2], max_tokens=3).token_ids


def test_a_failing_warm_up_does_not_keep_a_worker_out(make_cluster):
    c = make_cluster(warm_up_s=2.0)
    full = c.add("decode", knobs=Knobs(refuse_reserve=True))
    unreachable = c.add("decode", knobs=Knobs(bad_kv_address=True))
    p = c.add("prefill")  # one pair refuses, the other's KV endpoint cannot be reached
    assert rpcs(full) == ["Reserve"] and "Reserve" in rpcs(unreachable)
    with Client(c.address, timeout_s=10) as cl:
        assert {w["info"]["worker_id"] for w in cl.list_workers()} == {
            full.worker_id, unreachable.worker_id, p.worker_id}
    assert all(free == total for free, total in c.loads())


def test_warm_up_is_off_by_default(make_cluster):
    c = make_cluster()
    d = c.add("decode")
    p = c.add("prefill")
    assert rpcs(p) == [] and rpcs(d) == []

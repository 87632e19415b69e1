"""KV transfer over UCX between processes on loopback (CPU, tiny geometry), byte for byte."""

from __future__ import annotations

import random
import time

import pytest
from kvtransfer_peer import PeerProc, block_bytes, make_pool

from pdserve.kvtransfer import GeometryMismatchError, KVReceiver, KVSender, TransferOptions

NB = 96  # blocks per pool
# small staging: multi-message requests and staging contention even at tiny sizes
OPTS = {"staging_bytes": 3 * 8192, "min_message_bytes": 8192, "num_staging_buffers": 2,
        "deadline_s": 20.0, "drain_timeout_s": 2.0}


@pytest.fixture(scope="module")
def peers():
    procs = [PeerProc(), PeerProc()]
    yield procs
    for p in procs:
        p.stop()


def _pool_kw(seed: int, **kw):
    return {"num_blocks": NB, "seed": seed, **kw}


def _free(counters: dict) -> bool:
    return counters["num_inflight"] == 0 and counters["staging_free"] == counters["staging_total"]


def _wait_ok(results: list, n: int) -> None:
    assert len(results) == n, results
    bad = [r for r in results if not (r["ok"] if isinstance(r, dict) else r.ok)]
    assert not bad, bad


def _requests(rng: random.Random, n: int, max_blocks: int = 12):
    """n requests with distinct src and distinct dst blocks: {req: (src, dst)}."""
    src_pool, dst_pool = list(range(NB)), list(range(NB))
    rng.shuffle(src_pool)
    rng.shuffle(dst_pool)
    out = {}
    for i in range(n):
        k = rng.choice([0, 1, rng.randint(2, max_blocks)])
        out[f"r{i}"] = (src_pool[:k], dst_pool[:k])
        src_pool, dst_pool = src_pool[k:] + src_pool[:k], dst_pool[k:]
    return out


@pytest.mark.timeout(40)
def test_transfer_between_processes_byte_exact(peers):
    rx_proc = peers[0]
    addr = rx_proc.call("receiver", "rx1", _pool_kw(11), "ucx", OPTS)
    pool = make_pool(NB, seed=22)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS))
    try:
        reqs = _requests(random.Random(0), 4, max_blocks=20)
        for rid, (src, dst) in reqs.items():
            rx_proc.engine("rx1", "expect", rid, dst)
            tx.start(rid, addr, src)
            for layer in range(len(pool)):
                tx.layer_ready(rid, layer)
            tx.finish(rid, {"first_token": len(src), "rid": rid})
        _wait_ok(tx.wait(20, list(reqs)), len(reqs))
        got = rx_proc.engine("rx1", "wait", 20, list(reqs))
        _wait_ok(got, len(reqs))
        for r in got:
            assert r["aux"] == {"first_token": len(reqs[r["req_id"]][0]), "rid": r["req_id"]}
        for rid, (src, dst) in reqs.items():
            assert rx_proc.call("blocks", "rx1", dst) == block_bytes(pool, src), rid
        assert _free(rx_proc.call("counters", "rx1"))
        assert tx.num_inflight == 0 and tx.staging_free == tx.staging_total
    finally:
        tx.close()
        rx_proc.call("close", "rx1")


@pytest.mark.timeout(40)
def test_interleaved_concurrent_requests(peers):
    rx_proc = peers[0]
    addr = rx_proc.call("receiver", "rx2", _pool_kw(12), "ucx", OPTS)
    pool = make_pool(NB, seed=23)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS))
    rng = random.Random(1)
    try:
        reqs = _requests(rng, 10)
        for rid, (_, dst) in reqs.items():
            rx_proc.engine("rx2", "expect", rid, dst)
        for rid, (src, dst) in reqs.items():
            tx.start(rid, addr, src, dst_block_ids=dst, layerwise=rng.random() < 0.7)
        marks = [(rid, layer) for rid in reqs for layer in range(len(pool))]
        rng.shuffle(marks)  # layers of different requests, and out of order within one
        for rid, layer in marks[:len(marks) // 2]:
            tx.layer_ready(rid, layer)
        for layer in range(len(pool)):  # the batch form: one call per layer for many requests
            tx.layer_ready([rid for rid, lay in marks[len(marks) // 2:] if lay == layer], layer)
        order = list(reqs)
        rng.shuffle(order)
        for rid in order:
            tx.finish(rid, {"rid": rid})
        _wait_ok(tx.wait(20, list(reqs)), len(reqs))
        _wait_ok(rx_proc.engine("rx2", "wait", 20, list(reqs)), len(reqs))
        for rid, (src, dst) in reqs.items():
            assert rx_proc.call("blocks", "rx2", dst) == block_bytes(pool, src), rid
        assert _free(rx_proc.call("counters", "rx2"))
    finally:
        tx.close()
        rx_proc.call("close", "rx2")


@pytest.mark.timeout(40)
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_abort_is_reported_on_both_sides(peers, side):
    rx_proc = peers[1]
    name = f"rx-abort-{side}"
    addr = rx_proc.call("receiver", name, _pool_kw(13, num_layers=4), "ucx", OPTS)
    tx = KVSender(make_pool(NB, seed=24, num_layers=4), "ucx", TransferOptions(**OPTS))
    try:
        src, dst = list(range(10)), list(range(20, 30))
        rx_proc.engine(name, "expect", "a1", dst)
        # a healthy request beside it must be unaffected
        rx_proc.engine(name, "expect", "ok1", [40, 41])
        tx.start("a1", addr, src)
        tx.start("ok1", addr, [50, 51])
        tx.layer_ready("a1", 0)  # partial: layer 0 moves, the rest never becomes ready
        time.sleep(0.2)
        if side == "sender":
            tx.abort("a1")
        else:
            rx_proc.engine(name, "abort", "a1")
        tx.finish("ok1", {"x": 1})
        t0 = time.monotonic()
        res = {r.req_id: r for r in tx.wait(10, ["a1", "ok1"])}
        rres = {r["req_id"]: r for r in rx_proc.engine(name, "wait", 10, ["a1", "ok1"])}
        assert time.monotonic() - t0 < 5
        assert res["ok1"].ok and rres["ok1"]["ok"] and rres["ok1"]["aux"] == {"x": 1}
        assert not res["a1"].ok and not rres["a1"]["ok"]
        if side == "sender":
            assert "aborted by the sender" in rres["a1"]["error"]
        else:
            assert "receiver" in res["a1"].error and "aborted" in res["a1"].error
        assert _free(rx_proc.call("counters", name))
        assert tx.num_inflight == 0 and tx.staging_free == tx.staging_total
    finally:
        tx.close()
        rx_proc.call("close", name)


@pytest.mark.timeout(30)
def test_deadlines_fail_in_bounded_time(peers):
    rx_proc = peers[1]
    addr = rx_proc.call("receiver", "rx-dl", _pool_kw(14), "ucx", OPTS)
    tx = KVSender(make_pool(NB, seed=25), "ucx", TransferOptions(**OPTS))
    try:
        t0 = time.monotonic()
        rx_proc.engine("rx-dl", "expect", "never-sent", [1, 2, 3], deadline_s=0.5)
        rx_proc.engine("rx-dl", "expect", "stalls", [4, 5], deadline_s=30)
        tx.start("stalls", addr, [6, 7], deadline_s=0.5)  # layers never become ready
        res = tx.wait(5, ["stalls"])
        rres = {r["req_id"]: r for r in rx_proc.engine("rx-dl", "wait", 5, ["never-sent", "stalls"])}
        assert time.monotonic() - t0 < 4
        assert len(res) == 1 and not res[0].ok and "deadline" in res[0].error
        assert not rres["never-sent"]["ok"] and "deadline" in rres["never-sent"]["error"]
        assert not rres["stalls"]["ok"] and "deadline" in rres["stalls"]["error"]
        assert _free(rx_proc.call("counters", "rx-dl"))
    finally:
        tx.close()
        rx_proc.call("close", "rx-dl")


@pytest.mark.timeout(30)
def test_geometry_mismatch_is_a_clear_error(peers):
    rx_proc = peers[0]
    addr = rx_proc.call("receiver", "rx-geo", _pool_kw(15, head_dim=16), "ucx", OPTS)
    tx = KVSender(make_pool(NB, seed=26, head_dim=8), "ucx", TransferOptions(**OPTS))
    try:
        with pytest.raises(GeometryMismatchError) as ei:
            tx.start("g1", addr, [1, 2])
        msg = str(ei.value)
        assert "head_dim" in msg and "sender=8" in msg and "receiver=16" in msg
        assert tx.num_inflight == 0
    finally:
        tx.close()
        rx_proc.call("close", "rx-geo")


@pytest.mark.timeout(40)
def test_fan_in_two_senders_one_receiver(peers):
    pool = make_pool(NB, seed=30)
    rx = KVReceiver(pool, "ucx", TransferOptions(**OPTS))
    try:
        dst_all = list(range(NB))
        random.Random(2).shuffle(dst_all)
        jobs = {}
        for i, proc in enumerate(peers):
            name = f"tx-in{i}"
            proc.call("sender", name, _pool_kw(40 + i), "ucx", OPTS)
            for j in range(4):
                rid = f"in{i}-{j}"
                src, dst = list(range(j * 8, j * 8 + 6)), dst_all[:6]
                dst_all = dst_all[6:]
                rx.expect(rid, dst)
                jobs[rid] = (proc, name, src, dst)
        for rid, (proc, name, src, _) in jobs.items():  # both senders interleaved
            proc.engine(name, "start", rid, rx.address, src)
            proc.engine(name, "finish", rid, {"from": name})
        _wait_ok(rx.wait(20, list(jobs)), len(jobs))
        for i, proc in enumerate(peers):
            mine = [rid for rid in jobs if jobs[rid][1] == f"tx-in{i}"]
            _wait_ok(proc.engine(f"tx-in{i}", "wait", 20, mine), len(mine))
        for rid, (proc, name, src, dst) in jobs.items():
            assert block_bytes(pool, dst) == proc.call("blocks", name, src), rid
        assert rx.num_inflight == 0 and rx.staging_free == rx.staging_total
    finally:
        rx.close()
        for i, proc in enumerate(peers):
            proc.call("close", f"tx-in{i}")


@pytest.mark.timeout(40)
def test_fan_out_one_sender_two_receivers(peers):
    pool = make_pool(NB, seed=31)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS))
    try:
        addrs = [p.call("receiver", f"rx-out{i}", _pool_kw(50 + i), "ucx", OPTS)
                 for i, p in enumerate(peers)]
        jobs = {}
        for j in range(6):
            i = j % 2
            rid, src, dst = f"out{j}", list(range(j * 10, j * 10 + 7)), list(range(j * 9, j * 9 + 7))
            peers[i].engine(f"rx-out{i}", "expect", rid, dst)
            jobs[rid] = (i, src, dst)
        for rid, (i, src, _) in jobs.items():
            tx.start(rid, addrs[i], src)
            tx.finish(rid, {"to": i})
        _wait_ok(tx.wait(20, list(jobs)), len(jobs))
        for i, p in enumerate(peers):
            mine = [rid for rid in jobs if jobs[rid][0] == i]
            got = p.engine(f"rx-out{i}", "wait", 20, mine)
            _wait_ok(got, len(mine))
            assert all(r["aux"] == {"to": i} for r in got)
        for rid, (i, src, dst) in jobs.items():
            assert peers[i].call("blocks", f"rx-out{i}", dst) == block_bytes(pool, src), rid
        assert tx.num_inflight == 0 and tx.staging_free == tx.staging_total
    finally:
        tx.close()
        for i, p in enumerate(peers):
            p.call("close", f"rx-out{i}")


@pytest.mark.timeout(40)
@pytest.mark.parametrize("dead", ["sender", "receiver"])
def test_peer_death_fails_its_requests(dead):
    """The other side reports every request of the dead peer as failed, promptly."""
    pool = make_pool(NB, seed=32, num_layers=4)
    doomed = PeerProc()
    local = (KVReceiver if dead == "sender" else KVSender)(pool, "ucx", TransferOptions(**OPTS))
    try:
        kw = _pool_kw(60, num_layers=4)
        if dead == "sender":
            doomed.call("sender", "peer", kw, "ucx", OPTS)
            local.expect("d1", list(range(8)))
            local.expect("d2", list(range(8, 10)))
            doomed.engine("peer", "start", "d1", local.address, list(range(8)))
            doomed.engine("peer", "start", "d2", local.address, list(range(8, 10)))
            doomed.engine("peer", "layer_ready", "d1", 0)
        else:
            addr = doomed.call("receiver", "peer", kw, "ucx", OPTS)
            doomed.engine("peer", "expect", "d1", list(range(8)))
            doomed.engine("peer", "expect", "d2", list(range(8, 10)))
            local.start("d1", addr, list(range(8)))
            local.start("d2", addr, list(range(8, 10)))
            local.layer_ready("d1", 0)
        time.sleep(0.2)
        t0 = time.monotonic()
        doomed.kill()
        res = local.wait(10, ["d1", "d2"])
        assert time.monotonic() - t0 < 5
        assert len(res) == 2 and all(not r.ok and f"{dead} lost" in r.error for r in res), res
        assert local.num_inflight == 0 and local.staging_free == local.staging_total
    finally:
        local.close()
        doomed.stop()

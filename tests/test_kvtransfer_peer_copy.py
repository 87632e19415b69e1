"""Peer copy between processes on one host (CPU: the receiver's pool in shared memory):
byte-exact, refused where it must be, and safe for the receiver's blocks on every failure."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import pytest
import torch
from kvtransfer_peer import PeerProc, block_bytes, make_pool

from pdserve.kvtransfer import KVSender, TransferOptions, peer_pool

NB = 64
CPU = torch.device("cpu")
OPTS = {"staging_bytes": 3 * 8192, "min_message_bytes": 8192, "num_staging_buffers": 2,
        "deadline_s": 20.0, "drain_timeout_s": 2.0}


@pytest.fixture(scope="module")
def rx_proc():
    p = PeerProc()
    yield p
    p.stop()


def _pool_kw(seed: int, **kw):
    return {"num_blocks": NB, "seed": seed, "stacked": True, **kw}


@contextmanager
def _pair(rx_proc, name: str, rx_kw: dict, pool, rx_opts: dict = OPTS, **tx_opts):
    """A receiver `name` in rx_proc and a sender on `pool`: (its address, the sender),
    both closed after the block."""
    addr = rx_proc.call("receiver", name, rx_kw, "ucx", rx_opts)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS, **tx_opts))
    try:
        yield addr, tx
    finally:
        tx.close()
        rx_proc.call("close", name)


def _counters_free(c: dict) -> bool:
    return c["num_inflight"] == 0 and c["staging_free"] == c["staging_total"]


def _send(tx: KVSender, addr: bytes, reqs: dict, rng: random.Random, layers: int,
          with_dst: bool = True) -> None:
    for rid, (src, dst) in reqs.items():
        tx.start(rid, addr, src, dst if with_dst else None, layerwise=rng.random() < 0.7)
    marks = [(rid, layer) for rid in reqs for layer in range(layers)]
    rng.shuffle(marks)
    for rid, layer in marks[: len(marks) // 2]:
        tx.layer_ready(rid, layer)
    for rid in reqs:
        tx.finish(rid, {"rid": rid})


def _move_one(tx: KVSender, rx_proc, name: str, addr: bytes, rid: str, src: list[int],
              dst: list[int]) -> tuple:
    """One request from expect() to both sides' results: (sender result, receiver result)."""
    rx_proc.engine(name, "expect", rid, dst)
    tx.start(rid, addr, src, dst)
    tx.finish(rid)
    (res,) = tx.wait(10, [rid])
    (rres,) = rx_proc.engine(name, "wait", 10, [rid])
    return res, rres


def _requests(rng: random.Random, sizes: list[int]) -> dict:
    src, dst = rng.sample(range(NB), sum(sizes)), rng.sample(range(NB), sum(sizes))
    out, pos = {}, 0
    for i, n in enumerate(sizes):
        out[f"p{i}"] = (src[pos:pos + n], dst[pos:pos + n])
        pos += n
    return out


@pytest.mark.timeout(60)
def test_peer_copy_is_byte_exact_and_uses_no_staging(rx_proc):
    pool = make_pool(NB, seed=2, num_layers=3, stacked=True)
    rng = random.Random(0)
    with _pair(rx_proc, "pc1", _pool_kw(1, num_layers=3), pool) as (addr, tx):
        reqs = _requests(rng, [1, 5, 12, 0, 20])
        for rid, (_, dst) in reqs.items():
            rx_proc.engine("pc1", "expect", rid, dst)
        _send(tx, addr, reqs, rng, 3)
        res = tx.wait(20, list(reqs))
        got = rx_proc.engine("pc1", "wait", 20, list(reqs))
        assert len(res) == len(got) == len(reqs)
        via = {rid: "peer_copy" if src else "ucx" for rid, (src, _) in reqs.items()}  # 0 blocks
        assert all(r.ok and r.via == via[r.req_id] for r in res), res
        assert all(r["ok"] and r["via"] == via[r["req_id"]] and r["aux"] == {"rid": r["req_id"]}
                   for r in got), got
        for rid, (src, dst) in reqs.items():
            assert rx_proc.call("blocks", "pc1", dst) == block_bytes(pool, src), rid
            assert next(r for r in res if r.req_id == rid).nbytes == \
                len(src) * 3 * pool[0][0].numel() * 4
        assert _counters_free(rx_proc.call("counters", "pc1"))
        assert tx.num_inflight == 0 and tx.staging_free == tx.staging_total


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["sender_off", "receiver_off", "no_dst", "per_layer_pool"])
def test_backend_path_where_peer_copy_does_not_apply(rx_proc, case):
    """Either side may turn it off; without destination blocks or a flat pool it cannot run."""
    rx_opts = {**OPTS, "peer_copy": case != "receiver_off"}
    stacked = case != "per_layer_pool"
    pool = make_pool(NB, seed=4, stacked=stacked)
    rng = random.Random(1)
    with _pair(rx_proc, "pc2", {**_pool_kw(3), "stacked": stacked}, pool, rx_opts,
               peer_copy=case != "sender_off") as (addr, tx):
        reqs = _requests(rng, [3, 9])
        for rid, (_, dst) in reqs.items():
            rx_proc.engine("pc2", "expect", rid, dst)
        _send(tx, addr, reqs, rng, 2, with_dst=case != "no_dst")
        res = tx.wait(20, list(reqs))
        assert len(res) == 2 and all(r.ok and r.via == "ucx" for r in res), res
        for rid, (src, dst) in reqs.items():
            assert rx_proc.call("blocks", "pc2", dst) == block_bytes(pool, src), rid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_abort_mid_copy_frees_everything(rx_proc, side):
    with _pair(rx_proc, "pc3", _pool_kw(5, num_layers=4),
               make_pool(NB, seed=6, num_layers=4, stacked=True)) as (addr, tx):
        rx_proc.engine("pc3", "expect", "a", list(range(10)))
        rx_proc.engine("pc3", "expect", "ok", [40, 41])
        tx.start("a", addr, list(range(10)), list(range(10)))
        tx.start("ok", addr, [50, 51], [40, 41])
        tx.layer_ready("a", 0)  # partial: the rest never becomes ready
        time.sleep(0.2)
        if side == "sender":
            tx.abort("a")
        else:
            rx_proc.engine("pc3", "abort", "a")
        tx.finish("ok", {"x": 1})
        res = {r.req_id: r for r in tx.wait(10, ["a", "ok"])}
        rres = {r["req_id"]: r for r in rx_proc.engine("pc3", "wait", 10, ["a", "ok"])}
        assert res["ok"].ok and rres["ok"]["ok"] and rres["ok"]["via"] == "peer_copy"
        assert not res["a"].ok and not rres["a"]["ok"]
        assert _counters_free(rx_proc.call("counters", "pc3")) and tx.num_inflight == 0


@pytest.mark.timeout(60)
def test_never_writes_blocks_the_receiver_gave_up(rx_proc):
    """A request the receiver no longer expects (aborted before the sender began) fails, and
    its former blocks keep their bytes: the sender writes only after the receiver's `go`."""
    with _pair(rx_proc, "pc4", _pool_kw(7), make_pool(NB, seed=8, stacked=True)) as (addr, tx):
        dst = [5, 6, 7]
        before = rx_proc.call("blocks", "pc4", dst)
        rx_proc.engine("pc4", "expect", "gone", dst)
        rx_proc.engine("pc4", "abort", "gone")
        assert not rx_proc.engine("pc4", "wait", 5, ["gone"])[0]["ok"]
        tx.start("gone", addr, [1, 2, 3], dst)
        tx.finish("gone")
        res = tx.wait(10, ["gone"])
        assert len(res) == 1 and not res[0].ok and "aborted" in res[0].error
        assert rx_proc.call("blocks", "pc4", dst) == before


@pytest.mark.timeout(60)
def test_destination_outside_the_receivers_pool_is_a_clear_error(rx_proc):
    with _pair(rx_proc, "pc5", _pool_kw(9, num_blocks=16),
               make_pool(NB, seed=10, stacked=True)) as (addr, tx):
        tx.start("far", addr, [1, 2], [3, 40])
        tx.finish("far")
        res = tx.wait(10, ["far"])
        assert len(res) == 1 and not res[0].ok and "out of the receiver's pool" in res[0].error


def test_offer_maps_the_same_memory_and_is_refused_elsewhere():
    pool = make_pool(8, seed=11, stacked=True)
    flat = torch.as_strided(pool[0].view(8, -1), (16, pool[0][0].numel()), (pool[0][0].numel(), 1))
    assert peer_pool.share_cpu_pool(flat)
    o = peer_pool.offer(flat)
    assert peer_pool.check(o) and peer_pool.offer(flat)["name"] == o["name"]  # never moved again
    assert peer_pool.offer(flat)["offset"] == o["offset"]
    mapped = peer_pool.open_pool(o, torch.float32, flat.shape[1], CPU)
    mapped[3].fill_(7.0)  # writes land in the offering pool
    assert torch.equal(pool[0][3].reshape(-1), torch.full_like(mapped[3], 7.0))
    with pytest.raises(RuntimeError, match="another host"):
        peer_pool.open_pool({**o, "host": "elsewhere/0"}, torch.float32, flat.shape[1], CPU)
    with pytest.raises(RuntimeError, match="layout differs"):
        peer_pool.open_pool(o, torch.float32, flat.shape[1] * 2, CPU)
    with pytest.raises(RuntimeError, match="larger than the memory"):
        peer_pool.open_pool({**o, "rows": 10**6}, torch.float32, flat.shape[1], CPU)


@pytest.mark.parametrize("bad", [None, [], {"kind": "nfs"}, {"kind": "shm", "rows": -1},
                                 {"kind": "shm", "host": "h", "offset": 0, "rows": 1,
                                  "row_bytes": 8, "size": 8, "manager": "s", "name": b"n"},
                                 {"kind": "cuda", "host": "h", "offset": 0, "rows": 1,
                                  "row_bytes": 8, "size": 8, "soff": 0, "rc_off": 0,
                                  "uuid": "u", "handle": b"x" * 5000, "rc": b"", "ev": b"",
                                  "ev_sync": False}])
def test_hostile_offers_fail_the_schema(bad):
    assert not peer_pool.check(bad)


@pytest.mark.timeout(60)
def test_a_failed_copy_fails_its_request_and_the_pair_falls_back(rx_proc):
    """The copy cannot run (e.g. no peer access): that request fails on both sides, the
    receiver's blocks are freed, and the next request of the pair goes through the backend."""
    pool = make_pool(NB, seed=13, stacked=True)

    def broken(*a, **kw):
        raise RuntimeError("no peer access")
    with _pair(rx_proc, "pc6", _pool_kw(12), pool) as (addr, tx):
        tx.layout.peer_copy = broken
        for rid, dst in (("bad", [1, 2]), ("next", [3, 4])):
            res, rres = _move_one(tx, rx_proc, "pc6", addr, rid, [5, 6], dst)
            if rid == "bad":
                assert not res.ok and "no peer access" in res.error
                assert not rres["ok"] and "peer copy failed" in rres["error"]
            else:
                assert res.ok and res.via == "ucx" and rres["ok"]
                assert rx_proc.call("blocks", "pc6", dst) == block_bytes(pool, [5, 6])
        assert _counters_free(rx_proc.call("counters", "pc6")) and tx.num_inflight == 0


@pytest.mark.timeout(60)
def test_a_pool_that_cannot_be_shared_keeps_the_backend(monkeypatch):
    """/dev/shm too small (say): the receiver offers nothing and serves over the backend."""
    from pdserve.kvtransfer import KVReceiver

    def no_room(self):
        raise RuntimeError("No space left on device")
    monkeypatch.setattr(torch.UntypedStorage, "_share_filename_cpu_", no_room)
    rx_pool = make_pool(NB, seed=14, stacked=True)
    rx = KVReceiver(rx_pool, "ucx", TransferOptions(**OPTS))
    pool = make_pool(NB, seed=15, stacked=True)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS))
    try:
        assert rx.options.peer_copy is False
        rx.expect("r", [7, 8])
        tx.start("r", rx.address, [1, 2], [7, 8])
        tx.finish("r")
        (res,) = tx.wait(10, ["r"])
        assert res.ok and res.via == "ucx" and rx.wait(10, ["r"])[0].ok
        assert block_bytes(rx_pool, [7, 8]) == block_bytes(pool, [1, 2])
    finally:
        tx.close()
        rx.close()


@pytest.mark.timeout(60)
def test_every_senders_mapping_stays_valid_as_more_senders_connect(rx_proc):
    """Each handshake offers the pool again; it must never move: a sender that mapped it
    first still writes where the receiver reads after others connected."""
    addr = rx_proc.call("receiver", "pc7", _pool_kw(16), "ucx", OPTS)
    pools = [make_pool(NB, seed=17 + i, stacked=True) for i in range(2)]
    txs = [KVSender(p, "ucx", TransferOptions(**OPTS)) for p in pools]
    try:
        for rnd, order in enumerate(([0, 1], [0, 1])):
            for i in order:
                rid, dst = f"s{i}-{rnd}", [10 * i + rnd, 10 * i + rnd + 30]
                res, rres = _move_one(txs[i], rx_proc, "pc7", addr, rid, [1, 2], dst)
                assert res.ok and res.via == "peer_copy"
                assert rres["ok"]
                assert rx_proc.call("blocks", "pc7", dst) == block_bytes(pools[i], [1, 2]), rid
    finally:
        for tx in txs:
            tx.close()
        rx_proc.call("close", "pc7")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("during_forward", [False, True])
def test_peer_copy_waits_for_the_forward_unless_told(rx_proc, during_forward):
    """By default a layer-wise request's peer copy runs once, after finish() (on one host
    that beats sharing the GPU with the model); with peer_copy_during_forward, ready layers
    go while the rest compute. Either way the blocks arrive byte for byte."""
    layers = 4
    pool = make_pool(NB, seed=12, num_layers=layers, stacked=True)
    with _pair(rx_proc, "pc9", _pool_kw(13, num_layers=layers), pool,
               peer_copy_during_forward=during_forward) as (addr, tx):
        src, dst = [3, 9, 27], [4, 8, 16]
        before = rx_proc.call("blocks", "pc9", dst)
        rx_proc.engine("pc9", "expect", "lw", dst)
        time.sleep(0.1)  # the grant arrives: a copy may start at once
        tx.start("lw", addr, src, dst, layerwise=True)
        submitted = []
        submit = tx._submit
        tx._submit = lambda fn, *a: (submitted.append(fn.__name__), submit(fn, *a))
        for layer in range(layers - 1):
            tx.layer_ready("lw", layer)
            tx.layer_ready(["lw"], layer)  # a batch's call: the same
            time.sleep(0.05)
        written = rx_proc.call("blocks", "pc9", dst) != before  # before the last layer
        # after the forward, layer readiness reaches no thread: nothing to wake per layer
        assert submitted == (["_do_ready_many"] * 2 * (layers - 1) if during_forward else [])
        tx.finish("lw")
        (res,) = tx.wait(10, ["lw"])
        (rres,) = rx_proc.engine("pc9", "wait", 10, ["lw"])
        assert res.ok and rres["ok"] and res.via == "peer_copy"
        assert rx_proc.call("blocks", "pc9", dst) == block_bytes(pool, src)
        assert written == during_forward
        assert (res.num_messages > 1) == during_forward

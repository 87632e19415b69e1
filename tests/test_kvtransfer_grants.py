"""Peer copy grants: a receiver offers a request's blocks at expect() to every sender that may
copy into its pool, so the one that begins it writes at once (no `go` round trip). Each
grant is settled (a begin, or `unused` once taken back) before the blocks are the
receiver's again, so no abort, failure or second sender leaves a block written or held."""

from __future__ import annotations

import time

import pytest
from kvtransfer_peer import block_bytes, make_pool

from pdserve.kvtransfer import KVReceiver, KVSender, TransferOptions

NB = 32
OPTS = {"staging_bytes": 3 * 8192, "min_message_bytes": 8192, "num_staging_buffers": 2,
        "deadline_s": 20.0, "drain_timeout_s": 1.0}


class Spy(KVSender):
    """A sender that records every control message it reads (type, request), and can be
    made deaf to take-backs (a peer that never settles its grants)."""

    def __init__(self, *a, deaf: bool = False, **kw) -> None:
        self.seen: list[tuple[str, object]] = []
        self.deaf = deaf
        super().__init__(*a, **kw)

    def _on_message(self, peer, msg) -> None:
        self.seen.append((msg["t"], msg.get("req")))
        if self.deaf and msg["t"] == "fail":
            return
        super()._on_message(peer, msg)

    def got(self, t: str, rid: str) -> bool:
        return (t, rid) in list(self.seen)


def _until(cond, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture()
def rx():
    pool = make_pool(NB, seed=1, num_layers=3, stacked=True)
    r = KVReceiver(pool, "ucx", TransferOptions(**OPTS))
    yield r, pool
    r.close()


@pytest.fixture()
def two():
    """Two senders (and their pools), closed after the test."""
    (a, apool), (b, bpool) = _sender(3), _sender(4)
    yield a, apool, b, bpool
    a.close()
    b.close()


def _sender(seed: int, **kw) -> tuple[Spy, list]:
    pool = make_pool(NB, seed=seed, num_layers=3, stacked=True)
    return Spy(pool, "ucx", TransferOptions(**OPTS), **kw), pool


def _all_free(*eps) -> bool:
    return all(e.num_inflight == 0 and e.staging_free == e.staging_total for e in eps)


@pytest.mark.timeout(60)
def test_a_granted_request_is_written_without_a_go(rx):
    r, rpool = rx
    tx, pool = _sender(2)
    try:
        r.expect("early", [4, 5])  # before the pair exists: no grant, the sender waits for go
        tx.start("early", r.address, [1, 2], [4, 5])
        tx.finish("early")
        assert tx.wait(10, ["early"])[0].ok and tx.got("go", "early")
        r.expect("g", [7, 8, 9])
        assert _until(lambda: tx.got("grant", "g"))
        tx.start("g", r.address, [10, 11, 12], [7, 8, 9])
        tx.finish("g", {"k": 1})
        (res,) = tx.wait(10, ["g"])
        (rres,) = r.wait(10, ["g"])
        assert res.ok and rres.ok and rres.via == "peer_copy" and rres.aux == {"k": 1}
        assert not tx.got("go", "g")
        assert block_bytes(rpool, [7, 8, 9]) == block_bytes(pool, [10, 11, 12])
        assert _all_free(tx, r) and not any(p.grants for p in tx._by_addr.values())
    finally:
        tx.close()


@pytest.mark.timeout(60)
def test_the_other_senders_grants_are_taken_back(rx, two):
    r, rpool = rx
    a, apool, b, _ = two
    a.connect(r.address)
    b.connect(r.address)
    r.expect("x", [1, 2, 3])
    assert _until(lambda: a.got("grant", "x") and b.got("grant", "x"))
    a.start("x", r.address, [5, 6, 7], [1, 2, 3])
    a.finish("x")
    assert a.wait(10, ["x"])[0].ok and r.wait(10, ["x"])[0].ok
    assert b.got("fail", "x")  # taken back; b answered `unused`, so x could end
    assert not any(p.grants for p in b._by_addr.values())
    assert block_bytes(rpool, [1, 2, 3]) == block_bytes(apool, [5, 6, 7])
    r.expect("y", [9])  # b still serves
    b.start("y", r.address, [0], [9])
    b.finish("y")
    assert b.wait(10, ["y"])[0].ok and r.wait(10, ["y"])[0].ok
    assert _all_free(a, b, r)


@pytest.mark.timeout(60)
def test_an_aborted_granted_request_is_never_written(rx):
    r, rpool = rx
    tx, _ = _sender(5)
    try:
        tx.connect(r.address)
        before = block_bytes(rpool, [3, 4])
        r.expect("z", [3, 4])
        assert _until(lambda: tx.got("grant", "z"))
        r.abort("z")
        (rres,) = r.wait(10, ["z"])  # once the sender settled its grant
        assert not rres.ok and "abort" in rres.error
        tx.start("z", r.address, [1, 2], [3, 4])  # too late: refused, nothing written
        tx.finish("z")
        (res,) = tx.wait(10, ["z"])
        assert not res.ok and block_bytes(rpool, [3, 4]) == before
        assert _all_free(tx, r)
    finally:
        tx.close()


@pytest.mark.timeout(60)
def test_two_senders_of_one_request_never_hang_or_mix(rx, two):
    """A caller's bug: both senders begin the same request. Whatever interleaving happens,
    both get a result, and the receiver reports it whole from one sender or not at all."""
    r, rpool = rx
    a, apool, b, bpool = two
    for rnd in range(5):
        rid, dst = f"d{rnd}", [10 + rnd, 20 + rnd]
        a.connect(r.address)
        b.connect(r.address)
        r.expect(rid, dst)
        assert _until(lambda rid=rid: a.got("grant", rid) and b.got("grant", rid))
        for tx in (a, b):
            tx.start(rid, r.address, [1, 2], dst)
            tx.finish(rid)
        res = a.wait(10, [rid]) + b.wait(10, [rid])
        (rres,) = r.wait(10, [rid])
        assert len(res) == 2
        if rres.ok:
            assert block_bytes(rpool, dst) in (block_bytes(apool, [1, 2]),
                                               block_bytes(bpool, [1, 2]))
        assert _until(lambda: _all_free(a, b, r))


@pytest.mark.timeout(60)
def test_a_peer_that_never_settles_its_grant_is_dropped(rx):
    r, _ = rx
    deaf, _ = _sender(8, deaf=True)
    try:
        deaf.connect(r.address)
        r.expect("s", [1])
        assert _until(lambda: deaf.got("grant", "s"))
        r.abort("s")
        (rres,) = r.wait(10, ["s"])  # after drain_timeout_s, without the deaf peer
        assert not rres.ok and _all_free(r)
    finally:
        deaf.close()


def test_connected_says_whether_a_handshake_is_needed(rx):
    r, _ = rx
    tx, _ = _sender(9)
    try:
        assert not tx.connected(r.address)
        tx.connect(r.address)
        assert tx.connected(r.address) and tx.connected(r.address_str)
    finally:
        tx.close()

"""Hostile peers against a KV receiver (in a child process, over UCX on loopback).

Each attack must leave the receiver serving: the attacker is disconnected, nothing of it
stays behind, the process lives, and a normal authenticated transfer afterwards moves its
bytes exactly and leaves every staging buffer free (0 leaked blocks).
"""

from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
from kvtransfer_peer import TINY, PeerProc, block_bytes, make_pool

from pdserve.kvtransfer import KVReceiver, KVSender, TransferError, TransferOptions, decode_address
from pdserve.kvtransfer.control import FrameReader, frame
from pdserve.kvtransfer.schema import RECEIVER_HANDSHAKE, RECEIVER_READY, ProtocolError, validate

NB = 32
SECRET = "cluster-secret-for-tests"
OPTS = {"staging_bytes": 3 * 8192, "min_message_bytes": 8192, "num_staging_buffers": 2,
        "deadline_s": 20.0, "drain_timeout_s": 2.0, "connect_timeout_s": 1.5,
        "max_pending_handshakes": 4}
GEOMETRY = {**TINY, "dtype": "float32"}


@pytest.fixture(scope="module")
def rx():
    proc = PeerProc()
    addr = proc.call("receiver", "rx", {"num_blocks": NB, "seed": 1}, "ucx",
                     {**OPTS, "secret": SECRET})
    info = decode_address(addr)
    yield proc, addr, (info["host"], info["port"])
    proc.stop()


def _connect(where: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(where, timeout=5)
    s.settimeout(5)
    return s


def _closed_by_peer(s: socket.socket, timeout_s: float = 5.0) -> bool:
    """True once the receiver closed the connection (everything it sent first is read)."""
    end = time.monotonic() + timeout_s
    s.settimeout(0.2)
    try:
        while time.monotonic() < end:
            try:
                if not s.recv(1 << 16):
                    return True
            except TimeoutError:
                continue
            except ConnectionError:
                return True
        return False
    finally:
        s.close()


def _reply(s: socket.socket) -> dict:
    reader = FrameReader()
    while True:
        msgs = reader.feed(s.recv(1 << 16))
        if msgs:
            return msgs[0]


def _hello(**over) -> dict:
    return {"t": "hello", "geometry": GEOMETRY, "backend": "ucx", "addr": os.urandom(64),
            "token": b"", "max_rows": 4, **over}


def _assert_serving(rx, tag: str) -> None:
    """A normal authenticated transfer works and nothing leaks, on the receiver's side."""
    proc, addr, _ = rx
    assert proc.proc.is_alive()
    pool = make_pool(NB, seed=7)
    tx = KVSender(pool, "ucx", TransferOptions(**OPTS, secret=SECRET))
    try:
        src, dst = [3, 1, 4], [10, 11, 12]
        proc.engine("rx", "expect", tag, dst)
        tx.start(tag, addr, src)
        tx.finish(tag, {"first_token": 9})
        assert [r.ok for r in tx.wait(10, [tag])] == [True]
        (r,) = proc.engine("rx", "wait", 10, [tag])
        assert r["ok"] and r["aux"] == {"first_token": 9}
        assert proc.call("blocks", "rx", dst) == block_bytes(pool, src)
        c = proc.call("counters", "rx")
        assert c["num_inflight"] == 0 and c["staging_free"] == c["staging_total"]
    finally:
        tx.close()


@pytest.mark.timeout(60)
def test_garbage_and_malformed_frames_are_disconnected(rx):
    where = rx[2]
    attacks = [
        os.urandom(4096),  # garbage
        (70 << 20).to_bytes(4, "big") + b"\x81" * 1000,  # announces 70 MiB: refused at once
        (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        frame({"t": "hello"})[:4] + msgpack.packb([1, 2, 3]),  # not a map
        len(b := msgpack.packb({"v": 1, "t": "hello"})).to_bytes(4, "big") + b,  # old version
        frame({"t": "begin", "req": "x", "nblocks": 1}),  # out of turn
        frame({"t": 7}),  # type of the wrong type
    ]
    for data in attacks:
        s = _connect(where)
        s.sendall(data)
        assert _closed_by_peer(s), data[:16]
    _assert_serving(rx, "after-garbage")


@pytest.mark.timeout(60)
def test_hello_without_or_with_wrong_secret_is_refused_before_the_backend(rx):
    where = rx[2]
    # hello first (no auth), with a random 64-byte "UCX address": must never reach UCX
    s = _connect(where)
    s.sendall(frame(_hello()))
    reply = _reply(s)
    assert reply["t"] == "error" and "authentication required" in reply["why"]
    assert _closed_by_peer(s)
    # auth, then a hello with a forged proof and a random address
    s = _connect(where)
    s.sendall(frame({"t": "auth", "nonce": os.urandom(32)}))
    assert _reply(s)["t"] == "auth"
    s.sendall(frame(_hello(mac=os.urandom(32))))
    reply = _reply(s)
    assert reply["t"] == "error" and "authentication failed" in reply["why"]
    assert _closed_by_peer(s)
    # geometry as a list, wrong-size nonce, huge addr: schema errors
    for msg in (_hello(geometry=[1, 2, 3]), {"t": "auth", "nonce": b"short"},
                _hello(addr=b"\0" * (100 << 10))):
        s = _connect(where)
        s.sendall(frame(msg))
        assert _closed_by_peer(s), msg["t"]
    # real senders with a wrong secret or none
    pool = make_pool(NB, seed=8)
    for secret, match in (("not-the-secret", "failed authentication"),
                          (None, "authentication required")):
        tx = KVSender(pool, "ucx", TransferOptions(**OPTS, secret=secret))
        try:
            with pytest.raises(TransferError, match=match):
                tx.connect(rx[1])
            assert tx.num_inflight == 0
        finally:
            tx.close()
    _assert_serving(rx, "after-bad-secrets")


@pytest.mark.timeout(60)
def test_stalled_handshakes_time_out_and_are_capped(rx):
    where = rx[2]
    stalled = []
    for _ in range(OPTS["max_pending_handshakes"] + 3):  # beyond the cap: closed at once
        s = _connect(where)
        s.sendall((100).to_bytes(4, "big") + b"\x80" * 10)  # an unterminated frame
        stalled.append(s)
    t0 = time.monotonic()
    assert all(_closed_by_peer(s, timeout_s=10) for s in stalled)
    assert time.monotonic() - t0 < 8
    _assert_serving(rx, "after-stalls")


def test_schema_checks():
    good = {"v": 2, "t": "data", "req": "r", "tag": 1 << 32, "l0": 0, "l1": 1, "b0": 0, "b1": 2}
    assert validate(good, RECEIVER_READY) is good
    bad = [{**good, "tag": -1}, {**good, "l0": True}, {**good, "req": ["x"]},
           {**good, "b1": "2"}, {k: v for k, v in good.items() if k != "tag"}]
    for msg in bad:
        with pytest.raises(ProtocolError):
            validate(msg, RECEIVER_READY)
    with pytest.raises(ProtocolError, match="unexpected"):
        validate(good, RECEIVER_HANDSHAKE)
    begin = {"v": 2, "t": "begin", "req": "r", "nblocks": 2, "dst": b"\x01\0\0\0\x02\0\0\0"}
    assert validate(begin, RECEIVER_READY) is begin
    for dst in ([1, 2], b"\x01\0\0", "12"):  # block ids travel as uint32 bytes only
        with pytest.raises(ProtocolError, match="dst"):
            validate({**begin, "dst": dst}, RECEIVER_READY)
    reader = FrameReader(max_frame_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed((2048).to_bytes(4, "big"))


@pytest.mark.timeout(30)
def test_progress_thread_death_is_reported():
    why: list[str] = []
    rx = KVReceiver(make_pool(8, seed=2), "ucx", TransferOptions(**OPTS), on_fatal=why.append)
    try:
        rx.expect("doomed", [1, 2])

        def boom() -> None:
            raise RuntimeError("injected bug")
        rx._progress = boom  # the next loop turn raises on the progress thread
        rx._wake()
        end = time.monotonic() + 5
        while not why and time.monotonic() < end:
            time.sleep(0.01)
        assert why and "injected bug" in why[0] and rx.fatal is not None
        (r,) = rx.poll()
        assert r.req_id == "doomed" and not r.ok
        with pytest.raises(TransferError, match="stopped"):
            rx.expect("late", [3])
    finally:
        rx.close()

"""Unit tests of the transfer layer's pieces: pack/unpack, message planning, control codec."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch
from kvtransfer_peer import make_pool

from pdserve.kvtransfer import (
    SCHEMA_VERSION,
    Backend,
    GeometryMismatchError,
    KVGeometry,
    KVReceiver,
    KVSender,
    Op,
    TransferError,
    TransferOptions,
    address_to_str,
    decode_address,
)
from pdserve.kvtransfer.control import _checked, encode, encode_address
from pdserve.kvtransfer.pack import KVLayout, Rect, StagingPool, next_rect


def _all_rects(nl: int, nb: int, max_rows: int, min_rows: int, ready_steps: list[int]) -> list[Rect]:
    rects, lp, bp, k = [], 0, 0, 0
    for ready in ready_steps:
        while (r := next_rect(nl, nb, lp, bp, ready, max_rows, min_rows, k)) is not None:
            rects.append(r)
            k += 1
            lp, bp = (r.l1, 0) if r.b1 >= nb else (lp, r.b1)
    return rects


@pytest.mark.parametrize("nl,nb,max_rows,min_rows", [
    (2, 5, 6, 1), (32, 32, 1024, 128), (32, 512, 1024, 128), (32, 2048, 1024, 128),
    (4, 7, 3, 2), (1, 1, 1, 1), (32, 1, 1024, 128), (3, 10, 10, 10),
])
def test_next_rect_covers_every_row_once(nl, nb, max_rows, min_rows):
    for steps in ([nl], list(range(1, nl + 1))):  # all ready at once / layer by layer
        rects = _all_rects(nl, nb, max_rows, min_rows, steps)
        seen = [(layer, b) for r in rects for layer in range(r.l0, r.l1) for b in range(r.b0, r.b1)]
        assert sorted(seen) == [(layer, b) for layer in range(nl) for b in range(nb)]
        assert all(0 < r.rows <= max_rows for r in rects)
        assert all(r.l1 - r.l0 == 1 or (r.b0, r.b1) == (0, nb) for r in rects)


def test_next_rect_coalesces_and_grows():
    # llama-3.1-8b at 512 tokens: 32 layers x 32 blocks of 64 KiB, 64 MiB staging, 8 MiB min
    rects = _all_rects(32, 32, 1024, 128, [32])
    sizes = [r.l1 - r.l0 for r in rects]
    assert sizes[0] == 4 and max(sizes) > 4 and len(rects) <= 6 and sizes[-1] < max(sizes)
    assert _all_rects(4, 3, 100, 1, [0]) == []  # nothing ready, nothing sent


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip(stacked, dtype):
    rng = random.Random(7)
    src_pool = make_pool(40, seed=1, dtype=dtype, stacked=stacked, num_layers=3)
    dst_pool = make_pool(50, seed=2, dtype=dtype, stacked=stacked, num_layers=3)
    src_l, dst_l = KVLayout(src_pool), KVLayout(dst_pool)
    assert (src_l.flat is not None) == stacked
    staging = StagingPool(src_l, 4 * src_l.row_nbytes, 2)
    assert staging.rows == 4
    src, dst = rng.sample(range(40), 11), rng.sample(range(50), 11)
    si, di = src_l.index(src), dst_l.index(dst)
    for r in _all_rects(3, 11, staging.rows, 1, [3]):
        buf = staging.acquire()
        view = staging.view(buf, r.rows)
        src_l.gather(si, r, view)
        dst_l.scatter(di, r, view)
        staging.release(buf)
    assert staging.free == staging.total == 2
    for s, d in zip(src_pool, dst_pool):
        assert torch.equal(s[src].view(torch.uint8), d[dst].view(torch.uint8))
    untouched = sorted(set(range(50)) - set(dst))
    ref = make_pool(50, seed=2, dtype=dtype, stacked=stacked, num_layers=3)
    for d, e in zip(dst_pool, ref):
        assert torch.equal(d[untouched], e[untouched])


def test_layout_rejects_bad_pools():
    with pytest.raises(ValueError):
        KVLayout([torch.zeros(4, 2, 16, 2, 16), torch.zeros(4, 2, 16, 2, 8)])
    with pytest.raises(ValueError):
        KVLayout([torch.zeros(4, 2, 16, 2, 16).transpose(0, 2)])
    with pytest.raises(ValueError):
        StagingPool(KVLayout([torch.zeros(4, 2, 16, 2, 16)]), 100, 2)
    with pytest.raises(ValueError):
        KVLayout([torch.zeros(4, 2, 16, 2, 16)]).check_block_ids([0, 4], "source")


def test_geometry_mismatch_names_both_values():
    g = KVGeometry(32, 16, 8, 128, "bfloat16")
    assert g.block_nbytes == 64 << 10 and g.token_nbytes == 128 << 10
    other = {**g.to_dict(), "head_dim": 64, "dtype": "float16"}
    with pytest.raises(GeometryMismatchError) as ei:
        g.check_compatible(other)
    msg = str(ei.value)
    assert "head_dim: sender=64 receiver=128" in msg and "dtype: sender='float16'" in msg
    g.check_compatible(g.to_dict())


def test_control_codec_and_address():
    msg = msgpack.unpackb(encode({"t": "data", "req": "r1", "tag": 1 << 40}), raw=False)
    assert _checked(msg) == {"v": SCHEMA_VERSION, "t": "data", "req": "r1", "tag": 1 << 40}
    with pytest.raises(TransferError, match="schema version"):
        _checked({**msg, "v": SCHEMA_VERSION + 1})
    addr = encode_address("10.0.0.1", 1234, "ucx", b"\x01\x02")
    info = decode_address(addr)
    assert (info["host"], info["port"], info["backend"], info["addr"]) == ("10.0.0.1", 1234, "ucx", b"\x01\x02")
    assert decode_address(address_to_str(addr)) == info
    with pytest.raises(ValueError):
        decode_address(b"junk")


@pytest.mark.timeout(30)
def test_in_process_pair_edge_cases():
    """Zero-block request, unexpected request, duplicate ids, bad arguments, close()."""
    opts = TransferOptions(staging_bytes=8192, min_message_bytes=8192, deadline_s=10)
    rx = KVReceiver(make_pool(16, seed=3), "ucx", opts)
    tx = KVSender(make_pool(16, seed=4), "ucx", opts)
    try:
        rx.expect("empty", [])
        tx.start("empty", rx.address_str, [])  # the str form of the address works too
        tx.finish("empty", {"tok": 5})
        assert [r.ok for r in tx.wait(10, ["empty"])] == [True]
        assert rx.wait(10, ["empty"])[0].aux == {"tok": 5}

        tx.start("stranger", rx.address, [1])
        tx.finish("stranger")
        (r,) = tx.wait(10, ["stranger"])
        assert not r.ok and "not expected" in r.error

        rx.expect("dup", [1, 2])
        with pytest.raises(ValueError, match="already in flight"):
            rx.expect("dup", [3])
        with pytest.raises(ValueError, match="out of range"):
            rx.expect("bad", [99])
        with pytest.raises(ValueError):
            tx.layer_ready("dup", 7)
        with pytest.raises(TypeError):
            tx.finish("dup", {"obj": object()})
        rx.close()
        (r,) = rx.poll()
        assert r.req_id == "dup" and not r.ok and "closed" in r.error
        with pytest.raises(TransferError):
            rx.expect("late", [1])
    finally:
        tx.close()
        rx.close()


class _FakeEvent:
    def __init__(self, *a, **k) -> None:
        self.recorded = 0

    def record(self, stream=None) -> None:
        self.recorded += 1

    def query(self) -> bool:
        return True


class _FakeStream:
    def __init__(self) -> None:
        self.waited = 0

    def wait_event(self, ev) -> None:
        self.waited += 1


class _LocalBackend(Backend):
    """In-process, stream-ordered stand-in (like nccl): op.event is set once the data is
    in place, so the engines take their GPU code paths (chained scatter) on CPU."""

    name = "local"
    stream_ordered = True

    def __init__(self, wire: dict) -> None:
        self.wire = wire
        self.sends_after = 0

    def address(self) -> bytes:
        return b"local"

    def connect(self, peer_address, token, initiator):
        return "peer"

    def post_send(self, peer, tensor, tag, after=None):
        assert after is None or after.query()
        self.sends_after += after is not None
        op = Op(peer, tensor, tag)
        self.wire[tag] = tensor.clone()
        op.event = _FakeEvent()
        return op

    def post_recv(self, peer, tensor, tag):
        op = Op(peer, tensor, tag)
        self.poll(op)
        return op

    def poll(self, op):
        if op.event is None and op.tag in self.wire:
            op.tensor.copy_(self.wire.pop(op.tag))
            op.event = _FakeEvent()
        op.done = op.event is not None
        return op.done

    def abort(self, peer) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.timeout(30)
def test_stream_ordered_path_with_a_fake_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    wire: dict = {}
    opts = TransferOptions(staging_bytes=3 * 8192, min_message_bytes=8192, num_staging_buffers=2)
    src_pool, dst_pool = make_pool(32, seed=5, stacked=True), make_pool(32, seed=6)
    txb, rxb = _LocalBackend(wire), _LocalBackend(wire)
    rx, tx = KVReceiver(dst_pool, rxb, opts), KVSender(src_pool, txb, opts)
    rx._copy_stream, tx._copy_stream = _FakeStream(), _FakeStream()  # take the GPU branches
    try:
        src, dst = list(range(3, 13)), list(range(31, 21, -1))
        rx.expect("s1", dst)
        tx.start("s1", rx.address, src)
        ev = _FakeEvent()
        for layer in range(2):
            tx.layer_ready("s1", layer, ev)
        tx.finish("s1", {"k": 1}, ev)
        assert [r.ok for r in tx.wait(10, ["s1"])] == [True]
        assert rx.wait(10, ["s1"])[0].aux == {"k": 1}
        for s, d in zip(src_pool, dst_pool):
            assert torch.equal(s[src], d[dst])
        assert txb.sends_after > 0 and tx._copy_stream.waited > 0 and rx._copy_stream.waited > 0
        assert tx.staging_free == tx.staging_total and rx.staging_free == rx.staging_total
    finally:
        tx.close()
        rx.close()

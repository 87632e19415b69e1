"""A Prefill sent without its KV destination (Worker.SetKvTarget), in process with a fake KV
wire: the prompt runs at once; the destination arriving before the Prefill, in the middle of
the step that completes the prompt, or after token 0 gives colocated output and frees every
block; each refusal, the timeout and an abort end the request cleanly."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_worker_roles import GREEDY, PROMPT, all_free, engines, make  # noqa: F401
from worker_fakes import Aborted, FakeContext, FakeWire, aio, drain, pump_forever

from pdserve.decode.both import BothRole
from pdserve.decode.role import DecodeRole
from pdserve.prefill.kv_push import EngineStream, KvPush, KvTarget
from pdserve.prefill.role import PrefillRole
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.proto.faults import PEER

C = grpc.StatusCode


def prefill_request(rid: str, **fields) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT,
                             sampling=sampling_to_proto(GREEDY), **fields)


async def collect(agen, into: list) -> None:
    async for r in agen:
        into.append(r)


async def until(cond, timeout_s: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.001)


async def colocated(engines) -> list[int]:  # noqa: F811
    core, role = make(BothRole, engines["both"])
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        toks, _ = await drain(role.generate(pb.GenerateWorkerRequest(
            request_id="ref", prompt_token_ids=PROMPT, sampling=sampling_to_proto(GREEDY)),
            FakeContext()))
    finally:
        pump.cancel()
    return toks


def target_mid_step(p_core, p_role: PrefillRole, rid: str, target: KvTarget) -> None:
    """The destination arrives right after layer 0 of the step that completes the prompt."""
    before_run = p_role.before_run

    def wrapped(out):
        hook = before_run(out)
        if hook is None:
            return None

        def layer(i: int) -> None:
            hook(i)
            if i == 0:
                assert p_core.table.get(rid).kv_push.set_target(target) is None
        return layer
    p_role.before_run = wrapped


@pytest.mark.parametrize("when", ["before_prefill", "mid_step", "after_token0"])
@aio
async def test_late_target_equals_colocated(engines, when) -> None:  # noqa: F811
    want = await colocated(engines)
    wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
    d_core, d_role = make(DecodeRole, engines["decode"], wire)
    p_core, p_role = make(PrefillRole, engines["prefill"], wire, layerwise_min_tokens=1)
    pump = asyncio.create_task(pump_forever(d_core.engine_loop, p_core.engine_loop))
    rid, replies = f"late-{when}", []
    try:
        res = await d_role.reserve(pb.ReserveRequest(
            request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(GREEDY)),
            FakeContext())
        stream = asyncio.create_task(drain(d_role.decode_stream(pb.DecodeRequest(request_id=rid),
                                                                FakeContext())))
        target = pb.KvTarget(request_id=rid, kv_address=res.kv_address, dst_block_ids=res.block_ids)
        if when == "before_prefill":  # SetKvTarget handled first: it waits for the Prefill
            setting = asyncio.create_task(p_role.set_kv_target(target, FakeContext()))
            await asyncio.sleep(0.02)
            assert not setting.done()
        if when == "mid_step":
            target_mid_step(p_core, p_role, rid, KvTarget(res.kv_address, list(res.block_ids)))
        prefill = asyncio.create_task(collect(p_role.prefill(prefill_request(rid), FakeContext()),
                                              replies))
        if when == "before_prefill":
            await asyncio.wait_for(setting, 10)
        if when == "after_token0":
            await until(lambda: replies)
            assert not wire.sending and ("start", rid) not in wire.calls
            await p_role.set_kv_target(target, FakeContext())
        await asyncio.wait_for(prefill, 10)
        toks, reason = await asyncio.wait_for(stream, 10)
        await asyncio.sleep(0.01)
    finally:
        pump.cancel()
    assert [r.kv_done for r in replies] == [False, True]
    assert [replies[0].first_token, *toks] == want and reason == "length"
    mine = [c for c in wire.calls if c[1] == rid]
    layers = [c[2] for c in mine if c[0] == "layer"]
    assert mine[0] == ("start", rid) and mine[-1] == ("finish", rid)
    n_layers = engines["prefill"].model_cfg.num_layers
    assert layers == list(range(n_layers))  # recorded ones replayed: each once, in order
    assert all_free(engines["prefill"]) and all_free(engines["decode"])
    assert not p_core.table.states and not d_core.table.states


class RecordingLink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, req_id, address, src, dst, deadline_s, on_done) -> None:
        self.calls.append(("start", tuple(src), tuple(dst)))

    def layer_ready(self, req_id: str, layer: int) -> None:
        self.calls.append(("layer", layer))

    def finish(self, req_id: str, aux: dict) -> None:
        self.calls.append(("finish", aux["first_token"]))


def test_push_replays_in_order_and_stays_silent_once_closed() -> None:
    link = RecordingLink()
    push = KvPush(link, EngineStream("cpu"), "r", 1.0, lambda *a: None)
    push.layer_done(0)  # not begun, no target: recorded
    push.begin([3, 4])
    push.layer_done(1)
    assert link.calls == []
    assert push.set_target(KvTarget(b"d", [7, 8])) is None
    push.layer_done(2)
    push.finish({"first_token": 5})
    assert link.calls == [("start", (3, 4), (7, 8)), ("layer", 0), ("layer", 1), ("layer", 2),
                          ("finish", 5)]
    assert push.set_target(KvTarget(b"d", [7, 8])) == "already has a KV target"

    link = RecordingLink()
    push = KvPush(link, EngineStream("cpu"), "r", 1.0, lambda *a: None)
    push.begin([3])
    push.finish({"first_token": 5})
    push.close()
    assert push.set_target(KvTarget(b"d", [7])) == "has ended" and link.calls == []


async def p_only(engines, **transfer):  # noqa: F811
    wire = FakeWire()
    core, role = make(PrefillRole, engines["prefill"], wire, **transfer)
    role.arrival_wait_s = 0.05
    return wire, core, role, asyncio.create_task(pump_forever(core.engine_loop))


async def end_of(prefill: asyncio.Task) -> Aborted:
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(prefill, 10)
    return err.value


@pytest.mark.parametrize("case", ["blocks", "unreachable"])
@aio
async def test_unusable_target_ends_the_prefill_with_its_status(engines, case) -> None:  # noqa: F811
    wire, core, role, pump = await p_only(engines)
    replies: list = []
    try:
        prefill = asyncio.create_task(collect(role.prefill(prefill_request("bad"), FakeContext()),
                                              replies))
        await until(lambda: core.table.get("bad") is not None)
        dst, address = ([0], wire.address) if case == "blocks" else ([0, 1], b"nowhere")
        with pytest.raises(Aborted) as err:
            await role.set_kv_target(pb.KvTarget(request_id="bad", kv_address=address,
                                                 dst_block_ids=dst), FakeContext())
        ended = await end_of(prefill)
        await asyncio.sleep(0.02)  # the engine applies the last frees
    finally:
        pump.cancel()
    want = (C.INVALID_ARGUMENT, ()) if case == "blocks" else (C.UNAVAILABLE, PEER)
    assert (err.value.code, err.value.trailing_metadata) == want
    assert (ended.code, ended.trailing_metadata) == want and ended.details == err.value.details
    if case == "blocks":
        assert "dst_block_ids has 1 blocks; the prompt needs 2" in ended.details
    assert all_free(engines["prefill"]) and not core.table.states and not wire.sending


@aio
async def test_target_that_never_comes_ends_the_prefill(engines) -> None:  # noqa: F811
    wire, core, role, pump = await p_only(engines, timeout_s=0.3)
    replies: list = []
    try:
        prefill = asyncio.create_task(collect(role.prefill(prefill_request("lost"), FakeContext()),
                                              replies))
        ended = await end_of(prefill)
        late = role.set_kv_target(pb.KvTarget(request_id="lost", kv_address=wire.address,
                                              dst_block_ids=[0, 1]), FakeContext())
        with pytest.raises(Aborted) as err:
            await late
        await asyncio.sleep(0.02)
    finally:
        pump.cancel()
    assert len(replies) == 1 and not replies[0].kv_done  # token 0 did not wait for the target
    assert ended.code == C.ABORTED and "no KV target" in ended.details
    assert err.value.code == C.FAILED_PRECONDITION and "has ended" in err.value.details
    assert all_free(engines["prefill"]) and not core.table.states
    assert not wire.sending and wire.calls == []


@aio
async def test_abort_while_waiting_for_the_target(engines) -> None:  # noqa: F811
    wire, core, role, pump = await p_only(engines)
    replies: list = []
    try:
        prefill = asyncio.create_task(collect(role.prefill(prefill_request("ab"), FakeContext()),
                                              replies))
        await until(lambda: replies)  # token 0 is out, the blocks are held for the transfer
        assert engines["prefill"].kv_stats()["free_blocks"] < engines["prefill"].num_blocks
        assert await core.abort_request("ab")
        ended = await end_of(prefill)
        with pytest.raises(Aborted) as err:
            await role.set_kv_target(pb.KvTarget(request_id="ab", kv_address=wire.address,
                                                 dst_block_ids=[0, 1]), FakeContext())
        await asyncio.sleep(0.02)
    finally:
        pump.cancel()
    assert ended.code == C.CANCELLED and err.value.code == C.FAILED_PRECONDITION
    assert all_free(engines["prefill"]) and not core.table.states and wire.calls == []


@aio
async def test_target_for_unknown_or_settled_requests_is_refused(engines) -> None:  # noqa: F811
    wire, core, role, pump = await p_only(engines)
    try:
        with pytest.raises(Aborted) as unknown:
            await role.set_kv_target(pb.KvTarget(request_id="nobody", kv_address=wire.address,
                                                 dst_block_ids=[0, 1]), FakeContext())
        # a Prefill that came with its destination takes no other
        replies: list = []
        prefill = asyncio.create_task(collect(role.prefill(prefill_request(
            "has", kv_address=wire.address, dst_block_ids=[0, 1]), FakeContext()), replies))
        await until(lambda: core.table.get("has") is not None)
        with pytest.raises(Aborted) as twice:
            await role.set_kv_target(pb.KvTarget(request_id="has", kv_address=wire.address,
                                                 dst_block_ids=[0, 1]), FakeContext())
        await asyncio.wait_for(prefill, 10)  # the fake wire lands it at token 0
        with pytest.raises(Aborted) as bad:  # blocks without an address
            await collect(role.prefill(prefill_request("half", dst_block_ids=[0, 1]),
                                       FakeContext()), [])
        await asyncio.sleep(0.02)
    finally:
        pump.cancel()
    assert unknown.value.code == C.NOT_FOUND and "nobody" in unknown.value.details
    assert twice.value.code == C.FAILED_PRECONDITION and "already" in twice.value.details
    assert [r.kv_done for r in replies] == [False, True]
    assert bad.value.code == C.INVALID_ARGUMENT
    assert all_free(engines["prefill"]) and not core.table.states


@aio
async def test_roles_without_prefill_refuse_set_kv_target(engines) -> None:  # noqa: F811
    for cls, name in ((DecodeRole, "decode"), (BothRole, "both")):
        _, role = make(cls, engines[name], FakeWire()) if cls is DecodeRole else \
            make(cls, engines[name])
        with pytest.raises(Aborted) as err:
            await role.set_kv_target(pb.KvTarget(request_id="x"), FakeContext())
        assert err.value.code == C.FAILED_PRECONDITION


@pytest.mark.gpu
def test_a_replayed_event_fires_with_its_mark_not_after_later_work() -> None:
    import torch

    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)  # _sleep runs on the current device's stream
    stream = EngineStream("cuda:0")
    torch.cuda._sleep(1 << 20)  # a layer's kernels, on the engine's stream
    mark = stream.mark()
    torch.cuda._sleep(1 << 29)  # the layers after it, queued before the target came
    got: list = []

    def as_the_sender_does() -> None:  # KVSender records on the caller's current stream
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))
        got.append(ev)
    stream.after(mark, as_the_sender_does)
    got[0].synchronize()
    assert not torch.cuda.current_stream(dev).query()  # the later layers still run
    torch.cuda.synchronize()

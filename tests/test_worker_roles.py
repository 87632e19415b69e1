"""In-process tests of each worker Role through the worker core, with an engine loop the test
steps and a fake KV wire: admission, abort, transfer failure and finish, and P/D == both."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from worker_fakes import Aborted, FakeContext, FakeWire, ManualEngineLoop, aio, drain, pump_forever

import pdserve.decode  # noqa: F401  (registers decode, both)
import pdserve.prefill  # noqa: F401  (registers prefill)
from pdserve.decode.both import BothRole
from pdserve.decode.role import DecodeRole
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.kvtransfer.common import TransferConfig
from pdserve.prefill.role import PrefillRole
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.worker.config import WorkerConfig
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import get_role
from pdserve.worker.state import ReqState

PROMPT = [5, 17, 99, 3, 42, 8, 61, 7, 23, 11, 90, 14, 2, 33, 71, 19, 4, 58]  # 18: 2 blocks
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    base = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=32))
    return {name: LLMEngine(get_role(name).engine_config(base))
            for name in ("prefill", "decode", "both")}


def make(role_cls, engine: LLMEngine, wire: FakeWire | None = None, **transfer):
    cfg = WorkerConfig(role=role_cls.name, transfer=TransferConfig(**transfer))
    core = WorkerCore(cfg, engine, asyncio.get_running_loop(), engine_loop_cls=ManualEngineLoop)
    role = role_cls(core, wire) if wire is not None else role_cls(core)
    core.attach(role)
    return core, role


def all_free(engine: LLMEngine) -> bool:
    s = engine.kv_stats()
    engine.scheduler.check_invariants()
    return s["free_blocks"] == s["total_blocks"] and s["running"] == s["waiting"] == 0


async def drain_prefill(agen) -> list[pb.PrefillReply]:
    return [r async for r in agen]


def generate_request(rid: str, **sampling) -> pb.GenerateWorkerRequest:
    return pb.GenerateWorkerRequest(request_id=rid, prompt_token_ids=PROMPT,
                                    sampling=sampling_to_proto(sampling or GREEDY))


async def run_pd(engines, wire: FakeWire, rid: str, sampling=None, **transfer):
    """Reserve on D, Prefill on P, stream D; returns (prefill replies or error, tokens, reason)."""
    d_core, d_role = make(DecodeRole, engines["decode"], wire)
    p_core, p_role = make(PrefillRole, engines["prefill"], wire, **transfer)
    pump = asyncio.create_task(pump_forever(d_core.engine_loop, p_core.engine_loop))
    sp = sampling_to_proto(sampling or GREEDY)
    try:
        res = await d_role.reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=PROMPT,
                                                     sampling=sp), FakeContext())
        assert res.accepted and len(res.block_ids) == 2
        stream = asyncio.create_task(drain(d_role.decode_stream(
            pb.DecodeRequest(request_id=rid), FakeContext())))
        replies: list[pb.PrefillReply] = []
        try:
            async for r in p_role.prefill(pb.PrefillRequest(
                    request_id=rid, prompt_token_ids=PROMPT, sampling=sp,
                    kv_address=res.kv_address, dst_block_ids=res.block_ids), FakeContext()):
                replies.append(r)
            reply = replies
        except Aborted as exc:
            reply = exc
        try:
            toks, reason = await asyncio.wait_for(stream, 30)
        except Aborted as exc:
            toks, reason = [], exc
        await asyncio.sleep(0.01)  # let the engines apply the last frees
        return reply, toks, reason
    finally:
        pump.cancel()


@aio
async def test_both_role_generates_and_frees(engines) -> None:
    core, role = make(BothRole, engines["both"])
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        toks, reason = await drain(role.generate(generate_request("b1"), FakeContext()))
    finally:
        pump.cancel()
    assert len(toks) == 6 and reason == "length"
    assert all_free(engines["both"]) and not core.table.states


@pytest.mark.parametrize("min_tokens", [1, 1024])  # pushed per layer / after the forward
@aio
async def test_disaggregated_equals_both(engines, min_tokens) -> None:
    core, role = make(BothRole, engines["both"])
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        want, _ = await drain(role.generate(generate_request("ref"), FakeContext()))
    finally:
        pump.cancel()
    wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
    replies, toks, reason = await run_pd(engines, wire, "pd1", layerwise_min_tokens=min_tokens)
    # token 0 first (the transfer may still run), then the transfer's end
    assert [r.kv_done for r in replies] == [False, True]
    early, reply = replies
    assert early.first_token == reply.first_token == want[0] and reply.kv_bytes > 0
    assert [reply.first_token, *toks] == want and reason == "length"
    assert wire.layers_ready["pd1"] == set(range(engines["prefill"].model_cfg.num_layers))
    assert all_free(engines["prefill"]) and all_free(engines["decode"])


@aio
async def test_transfer_failure_ends_both_sides_and_frees(engines) -> None:
    wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
    wire.fail_next = "peer vanished"
    reply, toks, reason = await run_pd(engines, wire, "pd-fail")
    assert isinstance(reply, Aborted) and reply.code == grpc.StatusCode.ABORTED
    assert "peer vanished" in reply.details
    assert isinstance(reason, Aborted) and reason.code == grpc.StatusCode.ABORTED
    assert all_free(engines["prefill"]) and all_free(engines["decode"])


@aio
async def test_abort_after_reserve_frees_blocks_and_ends_stream(engines) -> None:
    wire = FakeWire()
    core, role = make(DecodeRole, engines["decode"], wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        res = await role.reserve(pb.ReserveRequest(request_id="ab", prompt_token_ids=PROMPT,
                                                   sampling=sampling_to_proto(GREEDY)), FakeContext())
        assert res.accepted and engines["decode"].kv_stats()["free_blocks"] < 32
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="ab"),
                                                              FakeContext())))
        await asyncio.sleep(0.01)
        assert await core.abort_request("ab")
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(stream, 10)
        assert err.value.code == grpc.StatusCode.CANCELLED
        await asyncio.sleep(0.01)
    finally:
        pump.cancel()
    assert wire.aborted == ["ab"] and all_free(engines["decode"]) and not core.table.states


@aio
async def test_receiver_failure_ends_stream(engines) -> None:
    wire = FakeWire()
    core, role = make(DecodeRole, engines["decode"], wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        await role.reserve(pb.ReserveRequest(request_id="rf", prompt_token_ids=PROMPT,
                                             sampling=sampling_to_proto(GREEDY)), FakeContext())
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="rf"),
                                                              FakeContext())))
        wire.fail("rf", "deadline exceeded")
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(stream, 10)
        assert err.value.code == grpc.StatusCode.ABORTED and "deadline" in err.value.details
        await asyncio.sleep(0.01)
    finally:
        pump.cancel()
    assert all_free(engines["decode"]) and not core.table.states


@pytest.mark.parametrize("case", ["bad_sampling", "duplicate", "dst_blocks", "unreachable"])
@aio
async def test_prefill_admission_refusals_leave_nothing(engines, case) -> None:
    wire = FakeWire()
    core, role = make(PrefillRole, engines["prefill"], wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    req = pb.PrefillRequest(request_id="adm", prompt_token_ids=PROMPT,
                            sampling=sampling_to_proto(GREEDY), kv_address=wire.address,
                            dst_block_ids=[0, 1])
    want = grpc.StatusCode.INVALID_ARGUMENT
    if case == "bad_sampling":
        req.sampling.top_p = 7.0
    elif case == "duplicate":
        core.table.add(ReqState("adm", 1))
        want = grpc.StatusCode.ALREADY_EXISTS
    elif case == "dst_blocks":
        del req.dst_block_ids[:]
    else:
        req.kv_address = b"nowhere"
        want = grpc.StatusCode.UNAVAILABLE
    try:
        with pytest.raises(Aborted) as err:
            await drain_prefill(role.prefill(req, FakeContext()))
    finally:
        pump.cancel()
    assert err.value.code == want
    if case == "duplicate":
        core.table.pop("adm")
    assert all_free(engines["prefill"]) and not core.table.states and not wire.sending


@aio
async def test_roles_refuse_rpcs_they_do_not_serve(engines) -> None:
    core, role = make(PrefillRole, engines["prefill"], FakeWire())
    with pytest.raises(Aborted) as err:  # decode serves Generate (a local prefill)
        await drain(role.generate(generate_request("x"), FakeContext()))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "prefill" in err.value.details
    core, role = make(BothRole, engines["both"])
    with pytest.raises(Aborted) as err:
        await drain_prefill(role.prefill(pb.PrefillRequest(request_id="x"), FakeContext()))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ValueError, match="unknown worker role"):
        get_role("router")


def test_phase_sized_engine_settings() -> None:
    base = EngineConfig(model="tiny", enforce_eager=False)
    pre = get_role("prefill").engine_config(base)
    assert not pre.capture_decode_graphs and not pre.enforce_eager  # prefill graphs only
    assert pre.prefill_graph_tokens == base.prefill_graph_tokens
    dec = get_role("decode").engine_config(base)
    assert dec.capture_decode_graphs and not dec.enforce_eager
    assert get_role("both").engine_config(base) == base


@aio
async def test_stream_interval_sends_fewer_messages_with_the_same_tokens(engines) -> None:
    sampling = {**GREEDY, "max_tokens": 11}

    async def chunks(every: int) -> list[list[int]]:
        cfg = WorkerConfig(role="both", stream_interval=every)
        core = WorkerCore(cfg, engines["both"], asyncio.get_running_loop(),
                          engine_loop_cls=ManualEngineLoop)
        role = BothRole(core)
        core.attach(role)
        pump = asyncio.create_task(pump_forever(core.engine_loop))
        try:
            out = [list(c.token_ids) async for c in role.generate(
                generate_request(f"si{every}", **sampling), FakeContext())]
        finally:
            pump.cancel()
        assert all_free(engines["both"]) and not core.table.states
        return out

    one, three = await chunks(1), await chunks(3)
    assert sum(one, []) == sum(three, []) and len(sum(three, [])) == 11
    # after the first message, at least 3 tokens a message but the last (the end goes at once)
    assert all(len(c) >= 3 for c in three[1:-1]) and len(three) <= 1 + -(-10 // 3)
    assert len(three) < len(one)
    with pytest.raises(ValueError, match="stream_interval"):
        WorkerConfig(role="both", stream_interval=0)


def test_stream_interval_flag() -> None:
    import argparse

    from pdserve import worker_cli

    p = argparse.ArgumentParser()
    worker_cli.add_arguments(p)
    assert worker_cli.config_from_args(p.parse_args(["--role", "decode"])).stream_interval == 1
    args = p.parse_args(["--role", "decode", "--stream-interval", "4"])
    assert worker_cli.config_from_args(args).stream_interval == 4
    with pytest.raises(SystemExit):
        p.parse_args(["--role", "decode", "--stream-interval", "0"])

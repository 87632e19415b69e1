"""Fenced KV blocks: a decode worker's blocks that a transfer may still write stay out of the
pool until the receiver says they are safe (decode/role.py), then they are free.

The scheduler and block manager alone, then the decode role through the worker core with a
fake KV wire (tests/worker_fakes.py) whose receiver side can hold a failed request's blocks
(`fail(hold=True)`, `release()`, as KVReceiver's held_blocks / on_release) and, here, defer
an abort's result (as the real receiver does while a copy may still run)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from worker_fakes import Aborted, FakeContext, FakeWire, ManualEngineLoop, aio, drain, pump_forever

import pdserve.decode  # noqa: F401  (registers decode)
from pdserve.decode.role import DecodeRole
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import make_scheduler
from pdserve.engine.sequence import Sequence
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.worker.config import WorkerConfig
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import get_role

NB = 8  # decode pool, 16-token blocks
PROMPT = list(range(3, 35))  # 32 tokens: 2 transfer blocks + the hidden slot of token 0
GREEDY = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


# -- scheduler and block manager ------------------------------------------------------------
def _remote(sch, sid: str, n_tokens: int) -> tuple[Sequence, list[int]]:
    s = Sequence(sid, list(range(n_tokens)), SamplingParams(max_tokens=4))
    return s, sch.reserve_remote(s)


def test_fenced_blocks_are_never_handed_out_until_unfenced():
    sch = make_scheduler(num_blocks=6, block_size=4)
    bm = sch.block_manager
    a, dst = _remote(sch, "a", 8)  # 2 transfer blocks + 1 for token 0
    assert len(a.block_ids) == 3 and len(dst) == 2
    assert sch.abort("a", fence=set(dst))
    assert bm.num_fenced_blocks == 2 and bm.num_free_blocks == 4  # the 3rd went back
    assert bm.fenced() == {"a": sorted(dst)} and a.is_finished and sch.get("a") is None
    sch.check_invariants()
    taken = []  # every free block, one by one: none of them is fenced
    while (b := _remote(sch, f"f{len(taken)}", 3))[1] is not None:
        taken += b[0].block_ids
    assert len(taken) == 4 and not set(taken) & set(dst)
    sch.check_invariants()
    for i in range(len(taken)):
        sch.abort(f"f{i}")
    assert sch.unfence("b", dst) == 0 and sch.unfence("a", [99]) == 0  # not theirs: ignored
    assert sch.unfence("a", dst[:1]) == 1 and bm.num_fenced_blocks == 1
    sch.check_invariants()
    assert sch.unfence("a", dst) == 1 and sch.unfence("a", dst) == 0  # once only
    assert bm.num_free_blocks == 6 and bm.num_fenced_blocks == 0 and bm.fenced() == {}
    sch.check_invariants()


def test_check_invariants_counts_fences():
    sch = make_scheduler(num_blocks=4, block_size=4)
    _, dst = _remote(sch, "a", 4)
    sch.abort("a", fence=set(dst))
    sch.check_invariants()
    sch.block_manager._fenced["a"].clear()  # a fence lost: its block is nobody's
    with pytest.raises(AssertionError):
        sch.check_invariants()


# -- the decode role --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(get_role("decode").engine_config(
        EngineConfig(model="tiny", cache=CacheConfig(num_blocks=NB))))


class Wire(FakeWire):
    """A receiver whose abort result waits for the test (`report_abort`), as a real one's
    does while a grant or a copy is unsettled."""

    def __init__(self) -> None:
        super().__init__()
        self.defer_abort = True

    def abort(self, req_id: str) -> None:
        if not self.defer_abort:
            return super().abort(req_id)
        self.aborted.append(req_id)

    def report_abort(self, req_id: str, hold: bool) -> None:
        self.fail(req_id, "aborted by the receiver", hold=hold)


def make(engine: LLMEngine, wire: FakeWire):
    core = WorkerCore(WorkerConfig(role="decode"), engine, asyncio.get_running_loop(),
                      engine_loop_cls=ManualEngineLoop)
    role = DecodeRole(core, wire)
    wire.on_release = role.on_kv_released
    core.attach(role)
    return core, role


def request(rid: str, prompt: list[int] = PROMPT) -> pb.ReserveRequest:
    return pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt,
                             sampling=sampling_to_proto(GREEDY))


async def settle() -> None:
    await asyncio.sleep(0.02)  # the pump runs the engine calls and steps


def stats(engine: LLMEngine) -> dict[str, int]:
    engine.scheduler.check_invariants()  # the fences are counted: nothing lost, nothing twice
    return engine.kv_stats()


async def crowd_out(core, role, engine: LLMEngine, fenced: list[int]) -> None:
    """A new request gets every free block but none of the fenced ones; one more is refused."""
    free = engine.kv_stats()["free_blocks"]
    big = await role.reserve(request("big", list(range(16 * (free - 1)))), FakeContext())
    assert big.accepted
    seq = engine.scheduler.get("big")
    assert len(seq.block_ids) == free and not set(seq.block_ids) & set(fenced)
    assert not (await role.reserve(request("small", PROMPT[:4]), FakeContext())).accepted
    await core.abort_request("big")
    if "big" in role.receiver.expected:  # a deferred abort result: nothing was held
        role.receiver.report_abort("big", hold=False)
    await settle()


def all_free(engine: LLMEngine) -> bool:
    s = stats(engine)
    return s["free_blocks"] == s["total_blocks"] == NB and s["fenced_blocks"] == 0 \
        and s["running"] == s["waiting"] == 0


@aio
async def test_failed_transfer_with_held_blocks_fences_them_until_release(engine) -> None:
    wire = Wire()
    core, role = make(engine, wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        res = await role.reserve(request("h"), FakeContext())
        dst = list(res.block_ids)
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="h"),
                                                              FakeContext())))
        wire.fail("h", "peer copy did not land", hold=True)
        with pytest.raises(Aborted) as err:  # the client hears at once
            await asyncio.wait_for(stream, 10)
        assert err.value.code == grpc.StatusCode.ABORTED and "did not land" in err.value.details
        await settle()
        s = stats(engine)
        assert s["fenced_blocks"] == 2 and s["free_blocks"] == NB - 2
        assert engine.scheduler.block_manager.fenced() == {"h": sorted(dst)}
        assert engine.scheduler.get("h") is None and not core.table.states
        await core.abort_request("h")  # a late Abort frees nothing
        await settle()
        assert stats(engine)["fenced_blocks"] == 2
        await crowd_out(core, role, engine, dst)
        wire.release("h")
        await settle()
    finally:
        pump.cancel()
    assert all_free(engine)


@pytest.mark.parametrize("result", ["held", "failed", "landed"])
@aio
async def test_abort_while_transfer_pending_fences_until_its_result(engine, result) -> None:
    wire = Wire()
    core, role = make(engine, wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        res = await role.reserve(request("p"), FakeContext())
        dst = list(res.block_ids)
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="p"),
                                                              FakeContext())))
        await settle()
        assert await core.abort_request("p", grpc.StatusCode.CANCELLED, "client went away")
        with pytest.raises(Aborted) as err:  # ends at once, with the abort's status
            await asyncio.wait_for(stream, 10)
        assert err.value.code == grpc.StatusCode.CANCELLED and wire.aborted == ["p"]
        await settle()
        s = stats(engine)  # the slot of token 0 is free at once; the transfer's blocks wait
        assert s["fenced_blocks"] == 2 and s["free_blocks"] == NB - 2
        await crowd_out(core, role, engine, dst)
        if result == "landed":  # the copy had completed just before the abort reached it
            wire.expected.pop("p")[1]("p", {"first_token": 1}, None)
        else:
            wire.report_abort("p", hold=result == "held")
        await settle()
        assert stats(engine)["fenced_blocks"] == (2 if result == "held" else 0)
        assert engine.scheduler.get("p") is None  # never admitted
        if result == "held":
            await crowd_out(core, role, engine, dst)
            wire.release("p")
            await settle()
    finally:
        pump.cancel()
    assert all_free(engine)


@aio
async def test_a_reused_request_id_frees_only_its_own_blocks(engine) -> None:
    """Request "r" fails with blocks held; a new request under the same id runs to its end;
    the old release then frees the old blocks, and nothing of the new one twice."""
    wire = Wire()
    wire.defer_abort = False
    core, role = make(engine, wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        old = list((await role.reserve(request("r"), FakeContext())).block_ids)
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="r"),
                                                              FakeContext())))
        wire.fail("r", "peer copy did not land", hold=True)
        with pytest.raises(Aborted):
            await asyncio.wait_for(stream, 10)
        await settle()
        new = await role.reserve(request("r"), FakeContext())
        assert not set(new.block_ids) & set(old)
        stream = asyncio.create_task(drain(role.decode_stream(pb.DecodeRequest(request_id="r"),
                                                              FakeContext())))
        wire.expected.pop("r")[1]("r", {"first_token": 1}, None)
        toks, reason = await asyncio.wait_for(stream, 10)
        assert len(toks) == GREEDY["max_tokens"] - 1 and reason == "length"
        await settle()
        assert engine.scheduler.block_manager.fenced() == {"r": sorted(old)}
        wire.release("r")
        await settle()
    finally:
        pump.cancel()
    assert all_free(engine)


@aio
async def test_a_failed_expect_gives_the_reservation_back(engine) -> None:
    class Refusing(FakeWire):
        def expect(self, *a) -> None:
            raise ValueError("request 'x' is already in flight")

    core, role = make(engine, Refusing())
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        with pytest.raises(ValueError):
            await role.reserve(request("x"), FakeContext())
        await settle()
    finally:
        pump.cancel()
    assert all_free(engine) and not core.table.states

"""A decode worker whose KV arrives by a peer copy that never lands (a hung sender GPU), end to
end on CPU: the real ReceiverLink and KVReceiver, a real sender, the worker core with its
engine thread. The request ends for its client at once; its blocks stay out of the pool
(fenced) until the receiver releases them, and are free after; shutdown does not wait.

On CPU a sender's `end` names no CUDA event, so the receiver here (the `_landing_event`
seam of tests/test_kvtransfer_landing.py) takes every `end` as naming the test's event."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import grpc
import pytest
from worker_fakes import Aborted, FakeContext, aio, drain

import pdserve.decode  # noqa: F401  (registers decode)
import pdserve.kvtransfer.link as link
from pdserve.decode.role import DecodeRole
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.kvtransfer import KVReceiver
from pdserve.kvtransfer.common import TransferConfig
from pdserve.kvtransfer.link import SenderLink
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.worker.config import WorkerConfig
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import get_role

NB = 8
PROMPT = list(range(3, 35))  # 32 tokens: 2 blocks written by the sender
BOUND_S = 15.0  # generous: proves nothing hangs, not how fast


class Event:
    def __init__(self) -> None:
        self.fired = False

    def query(self) -> bool:
        return self.fired


class Hung(KVReceiver):
    """Every peer copy's `end` names `self.event`; a short landing timeout."""

    made: list[Hung] = []

    def __init__(self, kv_caches, backend, options, **kw) -> None:
        self.event = Event()
        super().__init__(kv_caches, backend,
                         replace(options, landing_timeout_s=0.5, drain_timeout_s=1.0), **kw)
        Hung.made.append(self)

    def _landing_event(self, peer, msg):
        return self.event


def _engine() -> LLMEngine:
    return LLMEngine(get_role("decode").engine_config(
        EngineConfig(model="tiny", cache=CacheConfig(num_blocks=NB))))


@pytest.fixture()
def hung(monkeypatch):
    Hung.made = []
    monkeypatch.setattr(link, "KVReceiver", Hung)
    yield


@pytest.fixture(scope="module")
def prefill_pool():
    return LLMEngine(EngineConfig(model="tiny", cache=CacheConfig(num_blocks=NB))).kv_caches


class Worker:
    """A decode worker's core and role (real engine thread and receiver), and a sender."""

    def __init__(self, pool) -> None:
        self.engine = _engine()
        self.core = WorkerCore(WorkerConfig(role="decode"), self.engine,
                               asyncio.get_running_loop())
        self.role = DecodeRole(self.core)
        self.core.attach(self.role)
        self.core.start()
        self.rx = Hung.made[-1]
        self.tx = SenderLink(TransferConfig(), pool, "127.0.0.1")
        self.sent: dict[str, str | None] = {}

    async def stats(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            self.engine.scheduler.check_invariants()
            return self.engine.kv_stats()
        return await self.core.on_engine(read)

    async def until(self, cond, what: str) -> None:
        end = time.monotonic() + BOUND_S
        while not cond(await self.stats()):
            assert time.monotonic() < end, f"no {what} within {BOUND_S} s: {await self.stats()}"
            await asyncio.sleep(0.02)

    async def reserve(self, rid: str, prompt: list[int] = PROMPT) -> pb.ReserveReply:
        return await self.role.reserve(pb.ReserveRequest(
            request_id=rid, prompt_token_ids=prompt,
            sampling=sampling_to_proto({"max_tokens": 4, "ignore_eos": True})), FakeContext())

    def send(self, rid: str, res: pb.ReserveReply) -> None:
        """The prefill side: copy into the reserved blocks and end (its copy 'hangs')."""
        self.tx.start(rid, res.kv_address, list(range(len(res.block_ids))), list(res.block_ids),
                      30.0, lambda r, err, n: self.sent.__setitem__(r, err))
        self.tx.finish(rid, {"first_token": 1})

    async def copy_ended(self, rid: str) -> None:
        """The sender's `end` arrived: its copy may still run."""
        end = time.monotonic() + BOUND_S
        while not ((r := self.rx._reqs.get(rid)) is not None and r.landing is not None):
            assert time.monotonic() < end, "the sender's end never came"
            await asyncio.sleep(0.01)

    async def crowd_out(self, fenced: list[int]) -> None:
        """A new request gets every free block, none of the fenced ones."""
        free = (await self.stats())["free_blocks"]
        big = await self.reserve("big", list(range(16 * (free - 1))))
        assert big.accepted
        seq = await self.core.on_engine(lambda: self.engine.scheduler.get("big"))
        assert len(seq.block_ids) == free and not set(seq.block_ids) & set(fenced)
        assert not (await self.reserve("small", PROMPT[:4])).accepted
        await self.core.abort_request("big")
        await self.until(lambda s: s["free_blocks"] == free, "free blocks after 'big'")

    def stream(self, rid: str) -> asyncio.Task:
        return asyncio.create_task(drain(self.role.decode_stream(pb.DecodeRequest(request_id=rid),
                                                                 FakeContext())))

    def close(self) -> None:
        self.tx.close()
        self.core.stop()


async def _held_request(w: Worker, rid: str) -> list[int]:
    """A request whose copy never lands: its stream ends ABORTED; its blocks are fenced."""
    res = await w.reserve(rid)
    stream = w.stream(rid)
    w.send(rid, res)
    with pytest.raises(Aborted) as err:
        await asyncio.wait_for(stream, BOUND_S)
    assert err.value.code == grpc.StatusCode.ABORTED and "did not land" in err.value.details
    await w.until(lambda s: s["fenced_blocks"] == 2, "fenced blocks")
    return list(res.block_ids)


@pytest.mark.timeout(120)
@aio
async def test_an_unlanded_copy_keeps_its_blocks_out_of_the_pool_until_it_lands(
        hung, prefill_pool) -> None:
    w = Worker(prefill_pool)
    try:
        dst = await _held_request(w, "h")
        assert w.rx.held_blocks() == {"h": dst}
        assert (await w.stats())["free_blocks"] == NB - 2
        await w.crowd_out(dst)
        await asyncio.sleep(0.3)  # polled many times: still held
        assert (await w.stats())["fenced_blocks"] == 2
        w.rx.event.fired = True  # the copy lands at last
        await w.until(lambda s: s["free_blocks"] == NB and s["fenced_blocks"] == 0, "release")
        assert w.rx.held_blocks() == {}
    finally:
        w.close()


@pytest.mark.timeout(120)
@aio
async def test_an_abort_while_the_copy_may_run_fences_until_the_sender_is_gone(
        hung, prefill_pool) -> None:
    w = Worker(prefill_pool)
    w.rx.options = replace(w.rx.options, landing_timeout_s=60.0)  # only the abort ends it
    try:
        res = await w.reserve("a")
        stream = w.stream("a")
        w.send("a", res)
        await w.copy_ended("a")
        assert await w.core.abort_request("a")
        with pytest.raises(Aborted) as err:  # at once, with the abort's status
            await asyncio.wait_for(stream, BOUND_S)
        assert err.value.code == grpc.StatusCode.CANCELLED
        s = await w.stats()  # fenced from the abort on; the slot of token 0 is free
        assert s["fenced_blocks"] == 2 and s["free_blocks"] == NB - 2
        end = time.monotonic() + BOUND_S  # the receiver's result: held
        while w.rx.held_blocks() != {"a": list(res.block_ids)}:
            assert time.monotonic() < end
            await asyncio.sleep(0.02)
        await w.crowd_out(list(res.block_ids))
        assert (await w.stats())["fenced_blocks"] == 2
        w.tx.close()  # the sender's process is gone: so is its copy
        await w.until(lambda s: s["free_blocks"] == NB and s["fenced_blocks"] == 0, "release")
    finally:
        w.close()


@pytest.mark.timeout(120)
@aio
async def test_stop_with_held_blocks_is_bounded(hung, prefill_pool, caplog) -> None:
    """Shutdown waits for no release: the receiver closes (failing what is pending, logging
    what it leaves held) and the fenced blocks stay fenced; they go with the process."""
    caplog.set_level(logging.WARNING)
    w = Worker(prefill_pool)
    dst = await _held_request(w, "h")
    res = await w.reserve("pending")  # a second one in flight at the stop
    w.send("pending", res)
    await w.copy_ended("pending")
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(w.core.stop)  # the sender lives on, its copies unlanded
        assert time.monotonic() - t0 < BOUND_S
        assert "closed with 4 blocks of 2 requests still held" in caplog.text
        bm = w.engine.scheduler.block_manager  # the engine thread has stopped
        assert bm.fenced().get("h") == sorted(dst) and bm.num_free_blocks <= NB - 2
    finally:
        w.tx.close()

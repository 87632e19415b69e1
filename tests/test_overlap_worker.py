"""Overlap scheduling inside a worker: the real engine loop thread (overlap forced on, CPU)
under the both and decode roles. Streams equal those of synchronous steps, disaggregated
equals colocated while admissions interrupt steady decoding, and a client that goes away
mid-stream leaves every block free."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from worker_fakes import FakeContext, FakeWire, ManualEngineLoop, aio, drain

import pdserve.decode  # noqa: F401  (registers decode, both)
import pdserve.prefill  # noqa: F401  (registers prefill)
from pdserve.decode.both import BothRole
from pdserve.decode.role import DecodeRole
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine
from pdserve.prefill.role import PrefillRole
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.worker.config import WorkerConfig
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import get_role

PROMPTS = [[(13 * i + 7 * k) % 200 + 3 for i in range(n)] for k, n in enumerate((18, 5, 33, 9))]
SAMPLING = [
    {"max_tokens": 14, "temperature": 0.0, "ignore_eos": True},
    {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
    {"max_tokens": 11, "temperature": 0.9, "top_k": 20, "seed": 4, "ignore_eos": True},
    {"max_tokens": 20, "temperature": 0.0, "ignore_eos": True},
]


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    base = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=64))
    def build(role: str, overlap: bool) -> LLMEngine:
        return LLMEngine(get_role(role).engine_config(replace(base, overlap=overlap)))
    return {"both-sync": build("both", False), "both": build("both", True),
            "decode": build("decode", True), "prefill": build("prefill", True)}


def make(role_cls, engine: LLMEngine, wire=None, loop_cls=EngineLoop):
    core = WorkerCore(WorkerConfig(role=role_cls.name), engine, asyncio.get_running_loop(),
                      engine_loop_cls=loop_cls)
    role = role_cls(core, wire) if wire is not None else role_cls(core)
    core.attach(role)
    core.start()
    return core, role


async def free(core: WorkerCore) -> bool:
    def check() -> bool:
        core.engine.scheduler.check_invariants()
        s = core.engine.kv_stats()
        return s["free_blocks"] == s["total_blocks"] and s["running"] == s["waiting"] == 0
    return await core.on_engine(check)


async def generate_all(core: WorkerCore, role: BothRole, tag: str) -> list[tuple[list[int], str]]:
    async def one(i: int) -> tuple[list[int], str]:
        await asyncio.sleep(0.02 * i)  # arrivals during steady decoding
        req = pb.GenerateWorkerRequest(request_id=f"{tag}{i}", prompt_token_ids=PROMPTS[i],
                                       sampling=sampling_to_proto(SAMPLING[i]))
        return await drain(role.generate(req, FakeContext()))
    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(PROMPTS)))), 120)


@aio
async def test_both_role_streams_equal_with_overlap_on_and_off(engines) -> None:
    results = {}
    for name in ("both-sync", "both"):
        core, role = make(BothRole, engines[name])
        try:
            results[name] = await generate_all(core, role, name)
            assert await free(core) and not core.table.states
            assert (core.engine_loop.pipeline.num_overlapped > 0) == (name == "both")
        finally:
            core.stop()
    assert results["both"] == results["both-sync"]
    assert [len(t) for t, _ in results["both"]] == [s["max_tokens"] for s in SAMPLING]


@aio
async def test_disaggregated_with_overlap_equals_colocated(engines) -> None:
    ref_core, ref_role = make(BothRole, engines["both-sync"])
    try:
        want = await generate_all(ref_core, ref_role, "ref")
    finally:
        ref_core.stop()
    wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
    d_core, d_role = make(DecodeRole, engines["decode"], wire)
    p_core, p_role = make(PrefillRole, engines["prefill"], wire, loop_cls=ManualEngineLoop)

    async def pump() -> None:
        while True:
            p_core.engine_loop.pump()
            await asyncio.sleep(0.001)

    async def one(i: int) -> tuple[list[int], str]:
        await asyncio.sleep(0.02 * i)
        rid, sp = f"pd{i}", sampling_to_proto(SAMPLING[i])
        res = await d_role.reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=PROMPTS[i],
                                                     sampling=sp), FakeContext())
        assert res.accepted
        stream = asyncio.create_task(drain(d_role.decode_stream(
            pb.DecodeRequest(request_id=rid), FakeContext())))
        replies = [r async for r in p_role.prefill(pb.PrefillRequest(
            request_id=rid, prompt_token_ids=PROMPTS[i], sampling=sp,
            kv_address=res.kv_address, dst_block_ids=res.block_ids), FakeContext())]
        toks, reason = await stream
        return [replies[-1].first_token, *toks], reason

    pumping = asyncio.create_task(pump())
    try:
        got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(PROMPTS)))), 120)
        assert got == want
        assert await free(d_core)
        assert d_core.engine_loop.pipeline.num_overlapped > 0
    finally:
        pumping.cancel()
        d_core.stop()
    assert all(v == 0 for k, v in engines["prefill"].kv_stats().items() if k in ("running", "waiting"))


@aio
async def test_client_gone_mid_stream_frees_every_block(engines) -> None:
    core, role = make(BothRole, engines["both"])
    try:
        req = pb.GenerateWorkerRequest(
            request_id="gone", prompt_token_ids=PROMPTS[0],
            sampling=sampling_to_proto({"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True}))
        stream = role.generate(req, FakeContext())
        first = await asyncio.wait_for(stream.__anext__(), 30)
        assert first.token_ids
        seq = await core.on_engine(lambda: core.engine.scheduler.get("gone"))
        await stream.aclose()  # the client went away: stream_tokens aborts the request
        for _ in range(200):
            if await free(core) and not core.table.states:
                break
            await asyncio.sleep(0.01)
        assert await free(core) and not core.table.states
        assert seq.finish_reason == "abort" and len(seq.output_token_ids) < 1000
    finally:
        core.stop()

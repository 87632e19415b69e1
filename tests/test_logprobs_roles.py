"""Logprobs through the worker roles (in process, fake KV wire): token 0's logprobs come back
in the PrefillReply, the rest in the decode stream, and P/D equals colocated (`both`)."""

from __future__ import annotations

import asyncio

import pytest
from test_worker_roles import PROMPT, aio, all_free, make
from worker_fakes import Aborted, FakeContext, FakeWire, pump_forever

from pdserve.decode.both import BothRole
from pdserve.decode.role import DecodeRole
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.prefill.role import PrefillRole
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import sampling_to_proto
from pdserve.worker.role import get_role

GREEDY_LP = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "logprobs": 4}
SEEDED_LP = {"max_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 3, "ignore_eos": True,
             "logprobs": 2}


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    base = EngineConfig(model="tiny", cache=CacheConfig(num_blocks=32))
    return {name: LLMEngine(get_role(name).engine_config(base))
            for name in ("prefill", "decode", "both")}


async def drain(agen) -> tuple[list[int], list[pb.TokenLogprobs]]:
    toks, lps = [], []
    async for chunk in agen:
        assert len(chunk.logprobs) == len(chunk.token_ids)
        toks += chunk.token_ids
        lps += chunk.logprobs
    return toks, lps


async def colocated(engines, rid: str, sampling: dict):
    core, role = make(BothRole, engines["both"])
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        return await drain(role.generate(pb.GenerateWorkerRequest(
            request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(sampling)),
            FakeContext()))
    finally:
        pump.cancel()


async def disaggregated(engines, rid: str, sampling: dict):
    wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
    d_core, d_role = make(DecodeRole, engines["decode"], wire)
    p_core, p_role = make(PrefillRole, engines["prefill"], wire)
    pump = asyncio.create_task(pump_forever(d_core.engine_loop, p_core.engine_loop))
    sp = sampling_to_proto(sampling)
    try:
        res = await d_role.reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=PROMPT,
                                                     sampling=sp), FakeContext())
        stream = asyncio.create_task(drain(d_role.decode_stream(
            pb.DecodeRequest(request_id=rid), FakeContext())))
        replies = [r async for r in p_role.prefill(pb.PrefillRequest(
            request_id=rid, prompt_token_ids=PROMPT, sampling=sp, kv_address=res.kv_address,
            dst_block_ids=res.block_ids), FakeContext())]
        toks, lps = await asyncio.wait_for(stream, 30)
        await asyncio.sleep(0.01)
        first = replies[0]  # token 0 leaves early, with its logprobs
        assert not first.kv_done and first.HasField("first_logprobs") and replies[-1].kv_done
        return [first.first_token, *toks], [first.first_logprobs, *lps]
    finally:
        pump.cancel()


def assert_close(a: list[pb.TokenLogprobs], b: list[pb.TokenLogprobs]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x.top_ids) == list(y.top_ids)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert list(x.top_logprobs) == pytest.approx(list(y.top_logprobs), abs=1e-4)


@pytest.mark.parametrize("sampling", [GREEDY_LP, SEEDED_LP], ids=["greedy", "seeded"])
@aio
async def test_pd_logprobs_equal_colocated(engines, sampling) -> None:
    want_ids, want_lps = await colocated(engines, "ref", sampling)
    assert len(want_lps) == 6 and all(len(lp.top_ids) == sampling["logprobs"] for lp in want_lps)
    got_ids, got_lps = await disaggregated(engines, "pd", sampling)
    assert got_ids == want_ids
    assert_close(got_lps, want_lps)
    assert all_free(engines["prefill"]) and all_free(engines["decode"])


@aio
async def test_no_logprobs_unless_asked(engines) -> None:
    plain = {k: v for k, v in GREEDY_LP.items() if k != "logprobs"}
    core, role = make(BothRole, engines["both"])
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        chunks = [c async for c in role.generate(pb.GenerateWorkerRequest(
            request_id="plain", prompt_token_ids=PROMPT, sampling=sampling_to_proto(plain)),
            FakeContext())]
    finally:
        pump.cancel()
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert all(len(c.logprobs) == 0 for c in chunks)


@aio
async def test_over_the_maximum_is_invalid_argument(engines) -> None:
    core, role = make(BothRole, engines["both"])
    with pytest.raises(Aborted) as e:
        async for _ in role.generate(pb.GenerateWorkerRequest(
                request_id="big", prompt_token_ids=PROMPT,
                sampling=sampling_to_proto({**GREEDY_LP, "logprobs": 21})), FakeContext()):
            pass
    assert e.value.code.name == "INVALID_ARGUMENT" and "at most 20" in e.value.details

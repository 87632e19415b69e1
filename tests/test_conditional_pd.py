"""Conditional disaggregation: short prompts are prefilled on their decode worker (no
prefill worker, no transfer), long ones go P/D. Routing at the threshold and migration
through fake workers; output equality and freed blocks with the tiny model in process."""

from __future__ import annotations

import asyncio
import signal

import pytest
from fake_worker import Knobs, assert_no_leaks, fake_outputs
from test_worker_roles import (
    GREEDY,
    PROMPT,
    all_free,
    engines,  # noqa: F401  (fixture)
    generate_request,
    make,
    run_pd,
)
from worker_fakes import FakeContext, FakeWire, drain, pump_forever

from pdserve.coordinator import cli as coordinator_cli
from pdserve.coordinator.client import Client
from pdserve.coordinator.config import CoordinatorConfig
from pdserve.coordinator.pd_decider import PdDecider
from pdserve.decode.both import BothRole
from pdserve.decode.role import DecodeRole

pytestmark = pytest.mark.timeout(60)


def calls(w, rpc: str) -> int:
    return sum(r == rpc for r, _ in w.calls)


def test_decider_threshold_and_validation() -> None:
    d = PdDecider(512)
    assert d.path(511) == "local_prefill" and d.path(512) == "disaggregated"
    assert PdDecider().path(1) == "disaggregated"  # 0: always disaggregate
    with pytest.raises(ValueError, match="pd_threshold_tokens"):
        PdDecider(-1)
    with pytest.raises(ValueError, match="pd_threshold_tokens"):
        CoordinatorConfig(pd_threshold_tokens=-5)
    p = coordinator_cli.argparse.ArgumentParser()
    coordinator_cli.add_arguments(p)
    assert "conditional disaggregation" in p.format_help()
    with pytest.raises(SystemExit, match="pd-threshold-tokens"):
        coordinator_cli.config_from_args(p.parse_args(["--pd-threshold-tokens", "-1"]))
    assert coordinator_cli.config_from_args(
        p.parse_args(["--pd-threshold-tokens", "64"])).pd_threshold_tokens == 64


def test_routing_at_the_threshold(make_cluster) -> None:
    c = make_cluster(pd_threshold_tokens=4)
    p, d = c.add("prefill"), c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        short, long_ = [5, 6, 7], [5, 6, 7, 8]  # 3 < 4: local; 4: disaggregated
        for prompt in (short, long_):
            r = cl.generate(prompt_token_ids=prompt, max_tokens=9)
            assert r.token_ids == fake_outputs(prompt, 9)[0]
        m = cl.generate(prompt_token_ids=short, max_tokens=3)
    assert calls(d, "Generate") == 2 and calls(d, "Reserve") == 1
    assert calls(p, "Prefill") == 1
    assert m.metrics["prefill_worker"] == m.metrics["decode_worker"] == d.worker_id
    assert c.coord.orch.dispatch.paths == {"local_prefill": 2, "disaggregated": 1, "colocated": 0}
    if c.coord.metrics.registry is not None:  # prometheus_client installed
        from prometheus_client import generate_latest
        text = generate_latest(c.coord.metrics.registry).decode()
        assert 'pdserve:request_path_total{path="local_prefill"} 2.0' in text
    assert_no_leaks(c)


def test_threshold_zero_always_disaggregates(make_cluster) -> None:
    c = make_cluster()
    p, d = c.add("prefill"), c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        cl.generate(prompt_token_ids=[3], max_tokens=4)
    assert calls(d, "Generate") == 0 and calls(p, "Prefill") == 1
    assert_no_leaks(c)


@pytest.mark.parametrize("threshold,path_after", [(64, "Generate"), (5, "Reserve")])
def test_local_prefill_request_migrates(make_cluster, threshold, path_after) -> None:
    """The decode worker dies after 3 chunks of 2 tokens: the request moves to the other
    decode worker with prompt + 6 streamed tokens (8 tokens): still local under 64, P/D
    at 5 (the decision is made per attempt). The stream has no gap or repeat."""
    c = make_cluster(pd_threshold_tokens=threshold)
    p = c.add("prefill")
    bad = c.add("decode", knobs=Knobs(chunk_tokens=2, chunk_delay_s=0.01, die_after_chunks=3))
    good = c.add("decode", num_blocks=32)  # fewer free blocks: least_loaded tries `bad` first
    with Client(c.address, timeout_s=20) as cl:
        out = [t for ch in cl.stream(prompt_token_ids=[1, 2], max_tokens=30) for t in ch.token_ids]
        assert out == fake_outputs([1, 2], 30)[0]
        assert cl.stats()["requests_migrated"] == 1
    assert calls(bad, "Generate") == 1 and bad.dead
    assert calls(good, path_after) == 1
    assert calls(p, "Prefill") == (1 if path_after == "Reserve" else 0)
    assert_no_leaks(c)


async def _generate(role_cls, engine, rid: str, wire=None, sampling=None):
    core, role = make(role_cls, engine, wire)
    pump = asyncio.create_task(pump_forever(core.engine_loop))
    try:
        out = await drain(role.generate(generate_request(rid, **(sampling or GREEDY)),
                                        FakeContext()))
    finally:
        pump.cancel()
    await asyncio.sleep(0.01)
    assert not core.table.states
    return out


@pytest.mark.parametrize("sampling", [GREEDY, {"max_tokens": 6, "temperature": 0.8, "seed": 3,
                                               "ignore_eos": True}])
def test_local_prefill_equals_disaggregated_and_colocated(engines, sampling) -> None:  # noqa: F811
    async def go():
        want, reason = await _generate(BothRole, engines["both"], "co", sampling=sampling)
        wire = FakeWire(engines["prefill"].kv_caches, engines["decode"].kv_caches)
        local, local_reason = await _generate(DecodeRole, engines["decode"], "local", wire,
                                              sampling)
        reply, toks, pd_reason = await run_pd(engines, wire, "pd", sampling=sampling)
        return want, reason, local, local_reason, [reply[0].first_token, *toks], pd_reason
    want, reason, local, local_reason, pd, pd_reason = asyncio.run(go())
    assert len(want) == 6 and local == want and pd == want
    assert reason == local_reason == pd_reason == "length"
    assert all_free(engines["decode"]) and all_free(engines["prefill"])
    assert all_free(engines["both"])
    assert len(PROMPT) == 18


def test_local_prefill_cancelled_mid_stream_frees_blocks(engines) -> None:  # noqa: F811
    async def go():
        core, role = make(DecodeRole, engines["decode"], FakeWire())
        pump = asyncio.create_task(pump_forever(core.engine_loop))
        agen = role.generate(generate_request("c1", max_tokens=50, temperature=0.0,
                                              ignore_eos=True), FakeContext())
        try:
            await agen.__anext__()
            await agen.aclose()  # the caller went away
            await asyncio.sleep(0.05)
        finally:
            pump.cancel()
        return core
    core = asyncio.run(go())
    assert all_free(engines["decode"]) and not core.table.states


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_e2e_local_prefill_equals_colocated_and_migrates() -> None:
    """Across processes on CPU: a prompt under the threshold is prefilled on a decode worker
    (both paths in one cluster); greedy output equals the local engine's; SIGKILL of the
    decode worker mid-stream migrates it with no gap or repeat; every block is then free."""
    from test_e2e_migration import GREEDY as LONG_GREEDY
    from test_e2e_migration import PROMPT as MIG_PROMPT
    from test_e2e_migration import all_free as cluster_free
    from test_e2e_migration import serving_decode, worker_proc

    from pdserve import LLM, SamplingParams
    from pdserve.child_process import signal_group
    from pdserve.cluster import LocalCluster

    llm = LLM(model="tiny")
    short, long_ = MIG_PROMPT[:12], MIG_PROMPT * 2  # 12 < 40 <= 74 tokens
    want = {len(p): llm.generate(p, SamplingParams(**LONG_GREEDY))[0].token_ids
            for p in (short, long_, MIG_PROMPT)}
    with LocalCluster("tiny", prefill=1, decode=2, devices="cpu", transfer="ucx",
                      start_timeout_s=150, worker_args=["--transfer-timeout", "3"],
                      coordinator_args=["--pd-threshold-tokens", "40", "--worker-timeout", "3",
                                        "--stall-timeout", "4"]) as c:
        c.wait_ready(150)
        with Client(c.address, timeout_s=120) as cl:
            for p in (short, long_):
                r = cl.generate(prompt_token_ids=p, **LONG_GREEDY)
                assert r.token_ids == want[len(p)]
                local = r.metrics["prefill_worker"] == r.metrics["decode_worker"]
                assert local == (len(p) < 40)
            got: list[int] = []
            stream = cl.stream(MIG_PROMPT, **LONG_GREEDY)  # 37 tokens: local prefill
            while len(got) < 8:
                got += next(stream).token_ids
            signal_group(worker_proc(c, serving_decode(cl)), signal.SIGKILL)
            for chunk in stream:
                got += chunk.token_ids
            assert got == want[len(MIG_PROMPT)]
            assert cl.stats()["requests_migrated"] == 1
            assert cluster_free(cl, n_workers=2)


def test_a_colocated_generate_reports_its_prefill_time(engines) -> None:  # noqa: F811
    """A local prefill's last chunk says how long the prompt took (bench ttft's colocated
    columns read it), as a prefill worker's reply does."""
    async def go():
        core, role = make(BothRole, engines["both"], None)
        pump = asyncio.create_task(pump_forever(core.engine_loop))
        try:
            return [c async for c in role.generate(generate_request("t", **GREEDY), FakeContext())]
        finally:
            pump.cancel()
    chunks = asyncio.run(go())
    last = chunks[-1]
    assert last.finished and last.timings.prefill_ms > 0
    assert all(not c.HasField("timings") for c in chunks[:-1])

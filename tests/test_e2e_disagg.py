"""Multi-process end to end on CPU over UCX: coordinator + real prefill/decode workers.

Disaggregated output must equal colocated output (an in-process LLM on the same model),
for greedy and for seeded sampling; every block must be free again after drain or cancel.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdserve import LLM, SamplingParams
from pdserve.cluster import LocalCluster
from pdserve.coordinator.client import Client, ClientError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPTS = [[5], list(range(1, 20)), list(range(40, 73)), [(7 * i) % 250 for i in range(150)]]
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, ignore_eos=True)


@pytest.fixture(scope="module")
def colocated() -> LLM:
    return LLM(model="tiny")


def expected(llm: LLM, sampling: dict, seeds: list[int | None]) -> list[list[int]]:
    params = [SamplingParams(seed=s, **sampling) for s in seeds]
    return [o.token_ids for o in llm.generate([list(p) for p in PROMPTS], params)]


def drained(client: Client, timeout_s: float = 20.0) -> list[dict]:
    """Live worker stats once every worker's pool is free again (or the last reading)."""
    end = time.monotonic() + timeout_s
    while True:
        workers = client.stats(live=True)["workers"]
        if all(w["load"]["free_blocks"] == w["load"]["total_blocks"] > 0 for w in workers):
            return workers
        if time.monotonic() > end:
            return workers
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster_1p1d():
    with LocalCluster("tiny", prefill=1, decode=1, devices="cpu", transfer="ucx",
                      start_timeout_s=120) as c:
        c.wait_ready(150)
        yield c


def test_1p1d_greedy_and_seeded_equal_colocated(cluster_1p1d, colocated):
    with Client(cluster_1p1d.address, timeout_s=60) as cl:
        for sampling, seeds in ((GREEDY, [None] * 4), (SEEDED, [11, 12, 13, 14])):
            want = expected(colocated, sampling, seeds)
            got = [cl.generate(p, seed=s, **sampling) for p, s in zip(PROMPTS, seeds)]
            assert [r.token_ids for r in got] == want
            assert all(r.finish_reason == "length" for r in got)
            m = got[-1].metrics
            assert m["kv_bytes"] > 0 and m["prompt_tokens"] == len(PROMPTS[-1])
        assert all(w["load"]["free_blocks"] == w["load"]["total_blocks"] for w in drained(cl))


def test_50_concurrent_streams_complete(cluster_1p1d, colocated):
    prompts = [[(i * 13 + j) % 250 for j in range(3 + i % 40)] for i in range(50)]
    want = [o.token_ids for o in colocated.generate(prompts, SamplingParams(**GREEDY))]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client(cluster_1p1d.address, timeout_s=120) as cl:
                ids: list[int] = []
                for chunk in cl.stream(prompts[i], **GREEDY):
                    ids += chunk.token_ids
                got[i] = ids
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[:3]
    assert [got[i] for i in range(50)] == want


def test_cancel_frees_blocks_on_both_workers(cluster_1p1d):
    with Client(cluster_1p1d.address, timeout_s=60) as cl:
        stream = cl.stream(list(range(1, 100)), max_tokens=1500, temperature=0.0, ignore_eos=True)
        first = next(stream)  # a token reached us: the request holds blocks on the decode side
        assert first.token_ids
        busy = cl.stats(live=True)["workers"]
        assert any(w["load"]["free_blocks"] < w["load"]["total_blocks"] for w in busy)
        stream.close()  # cancels the RPC
        workers = drained(cl)
        assert len(workers) == 2
        assert all(w["load"]["free_blocks"] == w["load"]["total_blocks"] for w in workers)


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(prompt_token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(prompt_token_ids=[1] * 5000), grpc.StatusCode.INVALID_ARGUMENT, "maximum length"),
    (dict(prompt_token_ids=[1, 2], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt_token_ids=[1, 2], top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
])
def test_bad_input_gets_clear_error_and_server_keeps_serving(cluster_1p1d, kwargs, code, words):
    with Client(cluster_1p1d.address, timeout_s=30) as cl:
        with pytest.raises(ClientError) as ei:
            cl.generate(**kwargs, max_tokens=4)
        assert ei.value.code == code
        assert words in ei.value.details.lower()
        assert len(cl.generate([1, 2, 3], max_tokens=3, temperature=0.0).token_ids) == 3


def test_deadline_exceeded_then_blocks_free(cluster_1p1d):
    with Client(cluster_1p1d.address) as cl:
        with pytest.raises(ClientError) as ei:
            cl.generate(list(range(1, 60)), max_tokens=1500, temperature=0.0, ignore_eos=True,
                        timeout_s=1.0)
        assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(w["load"]["free_blocks"] == w["load"]["total_blocks"] for w in drained(cl))


def test_2p2d_equal_colocated_and_dead_worker_dropped(colocated):
    with LocalCluster("tiny", prefill=2, decode=2, devices="cpu", transfer="ucx",
                      start_timeout_s=150, coordinator_args=["--worker-timeout", "3"]) as c:
        c.wait_ready(150)
        with Client(c.address, timeout_s=60) as cl:
            for sampling, seeds in ((GREEDY, [None] * 4), (SEEDED, [3, 4, 5, 6])):
                want = expected(colocated, sampling, seeds)
                for _ in range(2):  # enough requests to land on both pairs
                    got = [cl.generate(p, seed=s, **sampling).token_ids
                           for p, s in zip(PROMPTS, seeds)]
                    assert got == want
            used = {w["info"]["worker_id"] for w in cl.list_workers() if w["inflight"] == 0}
            assert len(used) == 4
            c.kill_worker("decode", 1)
            end = time.monotonic() + 30
            while len(cl.list_workers()) != 3 and time.monotonic() < end:
                time.sleep(0.3)
            roles = sorted(w["info"]["role"] for w in cl.list_workers())
            assert roles == ["decode", "prefill", "prefill"]
            # the survivors keep serving
            assert cl.generate(PROMPTS[1], **GREEDY).token_ids == expected(
                colocated, GREEDY, [None] * 4)[1]

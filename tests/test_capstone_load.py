"""The capstone's load processes (benchmarks/capstone_load.py): requests dealt over several
processes against the in-process fake cluster come back complete, in send order, on one
clock; the flag's parsing and the concurrency split."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest
from fake_worker import Cluster, LoopThread

from pdserve.benchmarks.capstone_client import GrpcTarget, make_target
from pdserve.benchmarks.capstone_load import LoadProcs, auto_procs, parse_procs, split
from pdserve.benchmarks.capstone_workloads import Request


def test_parse_split_and_auto() -> None:
    assert parse_procs("3") == 3
    assert parse_procs("auto") == auto_procs()
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_procs(bad)
    assert auto_procs(2) == 1 and auto_procs(64) == 4 and auto_procs(512) == 4
    assert split(7, 3) == [3, 2, 2] and sum(split(5, 4)) == 5
    with pytest.raises(ValueError):
        LoadProcs(0)


def test_make_target_from_spec() -> None:
    t = make_target(("openai", "http://h:1", "m"))
    assert t.spec == ("openai", "http://h:1", "m") and t.model == "m"


@pytest.fixture(scope="module")
def cluster():
    lt = LoopThread()
    c = Cluster(lt)
    c.add("prefill")
    c.add("decode")
    yield c
    c.stop()
    lt.close()


def _run(load: LoadProcs, address: str, reqs: list[Request], conc: int = 0):
    async def go():
        target = GrpcTarget(address)
        try:
            return await load.run(target, reqs, 20.0, conc)
        finally:
            await target.close()
    return asyncio.run(go())


def test_requests_over_processes_in_send_order(cluster) -> None:
    # request i has a prompt of i + 1 tokens: the merged results say where each came from
    reqs = [Request(0.01 * i, list(range(1, i + 2)), 3) for i in range(12)]
    with LoadProcs(3) as load:
        assert len(set(load.pids())) == 3
        t0 = time.perf_counter()
        res = _run(load, cluster.address, reqs)
        t1 = time.perf_counter()
        assert [r.prompt_tokens for r in res] == [i + 1 for i in range(12)]
        assert all(r.ok and r.output_tokens == 3 for r in res), [r.error for r in res]
        # the children's times are on this process's clock, sent at their arrival times
        assert all(t0 < r.t_send < r.t_end < t1 for r in res)
        sends = [r.t_send for r in res]
        assert sends[-1] - sends[0] > 0.08
        # fixed concurrency, split between the processes: every request still runs
        res = _run(load, cluster.address, [Request(0.0, [1, 2, 3], 2)] * 9, conc=4)
        assert len(res) == 9 and all(r.ok for r in res)
    assert load.pids() == []  # closed


def test_warm_runs_in_every_process(cluster) -> None:
    from pdserve.coordinator.client import Client

    def total() -> int:
        with Client(cluster.address, timeout_s=10) as c:
            return c.stats()["requests_total"]

    before = total()
    with LoadProcs(2) as load:
        async def go():
            target = GrpcTarget(cluster.address)
            try:
                await load.warm(target, [Request(0.0, [1, 2], 2)], 20.0)
            finally:
                await target.close()
        asyncio.run(go())
    assert total() - before == 3  # this process, then each of the two


def test_one_process_stays_in_this_one(cluster) -> None:
    with LoadProcs(1) as load:
        assert load.pids() == []
        res = _run(load, cluster.address, [Request(0.0, [5, 6], 2)] * 2)
    assert [r.output_tokens for r in res] == [2, 2]

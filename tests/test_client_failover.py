"""Client failover between coordinators (coordinator/failover.py), on fake workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from etcd_server import free_port
from fake_worker import Cluster, LoopThread

from pdserve.coordinator.client import Client, ClientError
from pdserve.coordinator.failover import Failover, parse_addresses

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster():
    lt = LoopThread()
    c = Cluster(lt)
    c.add("prefill")
    c.add("decode")
    yield c
    c.stop()
    lt.close()


def test_parse_and_rotate():
    assert parse_addresses(" a:1, b:2 ,a:1") == ["a:1", "b:2"]
    assert parse_addresses(["x:1"]) == ["x:1"]
    with pytest.raises(ValueError):
        parse_addresses(",")
    pool = Failover("a:1,b:2", lambda a: f"ch-{a}", lambda ch: None)
    assert pool.get() == ("a:1", "ch-a:1") and pool.attempts() == 4
    pool.failed("a:1")
    pool.failed("a:1")  # a second report of the same failure does not skip b
    assert pool.get() == ("b:2", "ch-b:2")
    assert Failover("a:1", str, str).attempts() == 1


def test_dead_first_coordinator_is_skipped(cluster):
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, cluster.address], timeout_s=10) as cl:
        assert cl.address == f"{dead},{cluster.address}"
        cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=10)
        assert cl.generate([1, 2], max_tokens=3).token_ids == [3, 4, 5]
        assert len(cl.list_workers()) == 2
    with Client(f"{dead},{cluster.address}", timeout_s=10) as cl:  # a stream fails over too
        assert [t for c in cl.stream([7], max_tokens=2) for t in c.token_ids] == [8, 9]
        assert len(cl.list_workers()) == 2


def test_all_dead_is_unavailable_not_a_hang():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Client(dead, timeout_s=5) as cl, pytest.raises(ClientError) as e:
        cl.generate([1], max_tokens=1)
    assert e.value.code.name == "UNAVAILABLE"


def test_cli_takes_several_coordinators(cluster):
    dead = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "generate", "--coordinator",
         f"{dead},{cluster.address}", "--prompt-ids", "1,2", "--max-tokens", "2", "--json"],
        capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == [3, 4]


def test_async_client_fails_over_too(cluster):
    import asyncio

    from pdserve.coordinator.client import AsyncClient

    async def main() -> None:
        dead = f"127.0.0.1:{free_port()}"
        async with AsyncClient([dead, cluster.address], timeout_s=10) as cl:
            await cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=10)
            assert (await cl.generate([1, 2], max_tokens=3)).token_ids == [3, 4, 5]
        async with AsyncClient([dead, cluster.address], timeout_s=10) as cl:
            assert len(await cl.list_workers()) == 2
            assert [t async for c in cl.stream([7], max_tokens=2) for t in c.token_ids] == [8, 9]

    asyncio.run(main())

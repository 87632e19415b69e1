"""The etcd registry in process: the small etcd client against a real etcd, and the
coordinator's mirror of the registry (apply) without one."""

from __future__ import annotations

import asyncio
import time

import pytest
from etcd_server import ETCD_MISSING, EtcdServer

from pdserve.coordinator.etcd_registry import EtcdRegistrySync
from pdserve.coordinator.registry import Registry
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.etcd import Etcd, EtcdError, KeyValue, parse_endpoints, prefix_end
from pdserve.worker.etcd_link import EtcdLink

needs_etcd = pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or "")


def test_prefix_end_and_endpoints():
    assert prefix_end("/pdserve/workers/") == b"/pdserve/workers0"
    assert prefix_end("a\xff") == b"a\xc3\xc0"  # utf-8 bytes, the last one + 1
    assert parse_endpoints("127.0.0.1:2379, http://h:1") == ["http://127.0.0.1:2379", "http://h:1"]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


def test_unreachable_etcd_says_which_endpoints():
    with pytest.raises(EtcdError, match="no etcd endpoint answered"):
        Etcd("http://127.0.0.1:1", timeout_s=0.5).get_prefix("/")


@needs_etcd
def test_keys_live_and_die_with_their_lease(tmp_path):
    with EtcdServer(tmp_path) as server:
        etcd = Etcd(["http://127.0.0.1:1", server.url])  # the first endpoint is dead: fails over
        lease = etcd.grant(ttl_s=2)
        etcd.put("/t/workers/a", b"\x00\x01", lease=lease)
        etcd.put("/t/workers/b", b"b")
        etcd.put("/t/other", b"x")
        kvs = {kv.key: kv for kv in etcd.get_prefix("/t/workers/")}
        assert set(kvs) == {"/t/workers/a", "/t/workers/b"} and kvs["/t/workers/a"].value == b"\0\1"
        assert kvs["/t/workers/a"].lease == lease and etcd.keepalive(lease) == 2
        etcd.delete("/t/workers/b")
        end = time.monotonic() + 6  # no keepalive: the lease expires, its key goes with it
        while etcd.get_prefix("/t/workers/") and time.monotonic() < end:
            time.sleep(0.2)
        assert etcd.get_prefix("/t/workers/") == [] and etcd.keepalive(lease) == 0
        etcd.revoke(lease)  # revoking an expired lease is not an error


def _status(wid: str, address: str, free: int) -> bytes:
    info = pb.WorkerInfo(worker_id=wid, role=pb.ROLE_DECODE, address=address, model="tiny",
                         total_blocks=100)
    return pb.WorkerStatus(info=info, load=pb.WorkerLoad(free_blocks=free,
                                                        total_blocks=100)).SerializeToString()


def test_apply_mirrors_the_prefix_into_the_registry():
    async def main() -> None:
        registry = Registry(worker_timeout_s=5)
        refused: list[str] = []

        def accept(info: pb.WorkerInfo) -> str | None:
            if info.model != "tiny":
                refused.append(info.worker_id)
                return "another model"
            return None

        sync = EtcdRegistrySync(registry, Etcd("http://127.0.0.1:1"), "/c", accept=accept)
        key = "/c/workers/d-1"
        sync.apply([KeyValue(key, _status("x", "10.0.0.1:1", 90), 5, 7)])
        (w,) = registry.workers()
        assert w.worker_id == "d-1" and w.load.free_blocks == 90  # the key names the worker
        w.last_seen -= 3
        sync.apply([KeyValue(key, _status("x", "10.0.0.1:1", 90), 5, 7)])  # unchanged: alive
        assert time.monotonic() - w.last_seen < 1 and registry.workers() == [w]
        sync.apply([KeyValue(key, _status("x", "10.0.0.1:1", 40), 6, 7)])  # rewritten: load
        assert w.load.free_blocks == 40
        sync.apply([KeyValue(key, _status("x", "10.0.0.2:1", 40), 7, 8)])  # restarted elsewhere
        (w2,) = registry.workers()
        assert w2 is not w and w2.info.address == "10.0.0.2:1" and not w.alive
        other = pb.WorkerStatus.FromString(_status("y", "10.0.0.3:1", 1))
        other.info.model = "other"
        sync.apply([KeyValue(key, _status("x", "10.0.0.2:1", 40), 7, 8),
                    KeyValue("/c/workers/o", other.SerializeToString(), 9, 9)])
        assert [x.worker_id for x in registry.workers()] == ["d-1"] and refused == ["o"]
        registry.drop("d-1", "RPC failed")  # dropped by the coordinator: stays out ...
        sync.apply([KeyValue(key, _status("x", "10.0.0.2:1", 40), 7, 8)])
        assert registry.workers() == []
        sync.apply([KeyValue(key, _status("x", "10.0.0.2:1", 40), 10, 8)])  # ... until it writes
        (w2,) = registry.workers()
        sync.apply([])  # lease expired: dropped
        assert registry.workers() == [] and not w2.alive
        await registry.close()

    asyncio.run(main())


@needs_etcd
def test_worker_link_registers_refreshes_and_revokes(tmp_path):
    async def main(url: str) -> None:
        etcd = Etcd(url)
        info = pb.WorkerInfo(role=pb.ROLE_PREFILL, address="10.0.0.9:7", model="tiny")
        loads = iter(range(1000))
        link = EtcdLink(etcd, "/l", info, lambda: pb.WorkerLoad(free_blocks=next(loads)),
                        ttl_s=2, heartbeat_s=0.2)
        assert await link.start() == "prefill-10.0.0.9:7"
        await asyncio.sleep(0.7)
        (kv,) = await asyncio.to_thread(etcd.get_prefix, "/l/workers/")
        assert kv.key == "/l/workers/prefill-10.0.0.9:7"
        assert pb.WorkerStatus.FromString(kv.value).load.free_blocks >= 2  # rewritten
        await asyncio.sleep(2.5)  # past one TTL: the heartbeats kept it
        assert len(await asyncio.to_thread(etcd.get_prefix, "/l/workers/")) == 1
        await asyncio.to_thread(etcd.revoke, link.lease)  # lease lost: the next beat re-registers
        await asyncio.sleep(0.8)
        assert len(await asyncio.to_thread(etcd.get_prefix, "/l/workers/")) == 1
        await link.stop()  # a clean stop revokes: gone at once
        assert await asyncio.to_thread(etcd.get_prefix, "/l/workers/") == []

    with EtcdServer(tmp_path) as server:
        asyncio.run(main(server.url))

"""A worker's entry in the etcd registry: its WorkerStatus under a lease it keeps alive.

The same surface as CoordinatorLink (start, stop, worker_id, paused), for clusters whose
coordinators read the registry from etcd (coordinator/etcd_registry.py):

    link = EtcdLink(Etcd("http://127.0.0.1:2379"), "/pdserve", info, load_fn, ttl_s=3)
    await link.start()      # grant a lease, put <prefix>/workers/<worker_id>
    await link.stop()       # revoke the lease: the entry goes at once

Every heartbeat refreshes the lease and rewrites the entry with the current load. A worker
that dies stops refreshing: its lease expires after ttl_s and etcd deletes the entry. If
the lease was lost (etcd restarted, a long pause), the next heartbeat takes a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import ROLE_NAME
from pdserve.proto.etcd import Etcd, EtcdError
from pdserve.worker.coordinator_link import LoadFn, RegistrationFailed, probe_load

log = logging.getLogger("pdserve.worker")


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix.rstrip('/')}/workers/{worker_id}"


class EtcdLink:
    def __init__(self, etcd: Etcd, prefix: str, info: pb.WorkerInfo,
                 load_fn: LoadFn,
                 ttl_s: int = 3, heartbeat_s: float = 1.0,
                 on_register: Callable[[str], None] | None = None) -> None:
        if heartbeat_s >= ttl_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be below the lease TTL ({ttl_s})")
        self.etcd, self.prefix, self.info = etcd, prefix, info
        self.load_fn, self.ttl_s, self.heartbeat_s = load_fn, int(ttl_s), heartbeat_s
        self.on_register = on_register
        self.paused = False  # tests: stop refreshing without dying
        self.lease = 0
        self._task: asyncio.Task | None = None
        if not info.worker_id:  # no coordinator hands out ids: the address is unique
            info.worker_id = f"{ROLE_NAME.get(info.role, 'worker')}-{info.address}"

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def key(self) -> str:
        return worker_key(self.prefix, self.worker_id)

    async def _put(self, load: pb.WorkerLoad) -> None:
        value = pb.WorkerStatus(info=self.info, load=load).SerializeToString()
        await asyncio.to_thread(self.etcd.put, self.key, value, self.lease)

    async def register(self) -> str:
        self.lease = await asyncio.to_thread(self.etcd.grant, self.ttl_s)
        await self._put(await probe_load(self.load_fn))
        if self.on_register is not None:
            self.on_register(self.worker_id)
        return self.worker_id

    async def start(self, timeout_s: float = 60.0) -> str:
        """Register (retrying while etcd is unreachable), then refresh every heartbeat_s."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            try:
                await self.register()
                break
            except EtcdError as e:
                if loop.time() >= end:
                    raise RegistrationFailed(f"could not register in etcd: {e}") from e
                await asyncio.sleep(0.2)
        self._task = loop.create_task(self._beat())
        log.info("registered in etcd as %s (lease %x, ttl %d s)", self.key, self.lease, self.ttl_s)
        return self.worker_id

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.paused:
                continue
            try:
                if await asyncio.to_thread(self.etcd.keepalive, self.lease) <= 0:
                    log.warning("etcd lease of %s expired; registering again", self.worker_id)
                    await self.register()
                else:
                    await self._put(await probe_load(self.load_fn))
            except EtcdError as e:
                log.debug("etcd heartbeat failed: %s", e)
            except Exception as e:  # the load probe failed (engine stopped): say so, keep going
                log.warning("heartbeat of %s failed: %s", self.worker_id, e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.lease:
            try:
                await asyncio.to_thread(self.etcd.revoke, self.lease)
            except EtcdError as e:
                log.debug("revoking the lease failed (it will expire): %s", e)
            self.lease = 0

"""The worker registry read from etcd: any number of coordinators serve one cluster.

Workers write their WorkerStatus (info + load) under `<prefix>/workers/<id>`, under a
lease they keep alive (worker/etcd_link.py). Each coordinator polls that prefix every
`poll_s` and mirrors it into its in-process Registry: a new key registers the worker, a
rewritten key is a heartbeat (its load), an unchanged key keeps the worker alive, and a
key that is gone (lease expired: the worker died; or revoked: it stopped) drops it. A
worker the coordinator dropped itself (an RPC to it failed) comes back only when its key
is written again, so a dead worker's entry is not re-added while its lease runs out.
Coordinators share no state but etcd: each routes with the published loads plus what it
routed itself. While etcd cannot be read, nothing is refreshed, and the Registry's own
reaper drops workers after worker_timeout_s, as it would without etcd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.coordinator.registry import Registry
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.etcd import Etcd, EtcdError, KeyValue

log = logging.getLogger("pdserve.coordinator")


class EtcdRegistrySync:
    def __init__(self, registry: Registry, etcd: Etcd, prefix: str, poll_s: float = 0.25,
                 accept: Callable[[pb.WorkerInfo], str | None] | None = None) -> None:
        """`accept(info)`: None to take the worker, else why not (e.g. another model)."""
        self.registry, self.etcd, self.poll_s, self.accept = registry, etcd, poll_s, accept
        self.prefix = f"{prefix.rstrip('/')}/workers/"
        self._revisions: dict[str, int] = {}  # worker id -> mod_revision last applied
        self._refused: set[str] = set()
        self._task: asyncio.Task | None = None
        self.synced = asyncio.Event()  # set after the first successful read

    def apply(self, kvs: list[KeyValue]) -> None:
        """Mirror one reading of the prefix into the registry."""
        handles = {w.worker_id: w for w in self.registry.workers()}
        seen: set[str] = set()
        now = time.monotonic()
        for kv in kvs:
            try:
                status = pb.WorkerStatus.FromString(kv.value)
            except Exception:
                log.warning("etcd key %s is not a WorkerStatus; ignored", kv.key)
                continue
            wid = kv.key[len(self.prefix):]
            status.info.worker_id = wid
            seen.add(wid)
            handle = handles.get(wid)
            if handle is None and self._revisions.get(wid) == kv.mod_revision:
                continue  # dropped here (its RPCs failed): back only once it writes again
            if handle is None or handle.info.address != status.info.address:
                why = self.accept(status.info) if self.accept is not None else None
                if why is not None:
                    if wid not in self._refused:
                        log.error("worker %s in etcd refused: %s", wid, why)
                        self._refused.add(wid)
                    continue
                if handle is not None:  # etcd's lease owns the id: the new entry wins
                    self.registry.drop(wid, f"re-registered in etcd at {status.info.address}")
                self.registry.register(status.info)
                self.registry.heartbeat(wid, status.load)
            elif self._revisions.get(wid) != kv.mod_revision:
                self.registry.heartbeat(wid, status.load)
            else:
                handle.last_seen = now  # the lease still holds it: alive
            self._revisions[wid] = kv.mod_revision
        for wid in set(self._revisions) - seen:
            del self._revisions[wid]
            self.registry.drop(wid, "its etcd entry is gone (lease expired or revoked)")
        self._refused &= seen

    async def _run(self) -> None:
        while True:
            try:
                kvs = await asyncio.to_thread(self.etcd.get_prefix, self.prefix)
            except EtcdError as e:
                log.warning("cannot read the registry from etcd: %s", e)
            else:
                self.apply(kvs)
                self.synced.set()
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

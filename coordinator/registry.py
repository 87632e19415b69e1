"""Worker registry: registration, heartbeats, liveness, and the coordinator's own load view.

A worker is alive while it heartbeats; one silent for `worker_timeout_s` is dropped by the
reaper, and one whose RPC fails with UNAVAILABLE is dropped at once. Dropping closes the
worker's channel, which ends every in-flight RPC to it (the flows then migrate, retry or
fail those requests). `routable()` is what routing may pick: suspects and circuit-broken
workers (coordinator/health.py) are left out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import grpc

from pdserve.coordinator.config import FailureConfig
from pdserve.coordinator.health import HealthBook
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import ROLE_NAME
from pdserve.proto.grpc_util import new_channel

log = logging.getLogger("pdserve.coordinator")



class WorkerIdTaken(ValueError):
    """Register under the id of a worker that is still alive (it keeps its place)."""



@dataclass(eq=False, slots=True)
class WorkerHandle:
    """One registered worker. Load = last heartbeat + what the coordinator routed since."""

    info: pb.WorkerInfo
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerStub
    load: pb.WorkerLoad = field(default_factory=pb.WorkerLoad)
    last_seen: float = field(default_factory=time.monotonic)
    inflight: int = 0  # requests routed here and not done
    inflight_prefill_tokens: int = 0  # prompt tokens sent to Prefill, not yet answered
    # blocks reserved or taken by a Generate here since the last heartbeat, less those of the
    # requests that ended here since (negative when more ended than came)
    reserved_since_hb: int = 0
    routed: int = 0  # requests ever routed here (last tie-breaker: spreads equal workers)
    alive: bool = True
    drop_reason: str = ""  # why it was dropped (when not alive)
    heartbeats: int = 0  # received since it registered (0: not proven alive yet)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> int:
        return self.info.role

    # Estimates used by the routing policies (heartbeats lag behind routing decisions).
    def est_free_blocks(self) -> int:
        return self.load.free_blocks - self.reserved_since_hb

    def count_generate(self, prompt_tokens: int) -> None:
        """Count the KV blocks of a prompt routed here with Generate (colocated, or a
        local prefill on a decode worker) until the next heartbeat, as a Reserve's blocks
        are counted. Without it the most-free-blocks order does not move between two
        heartbeats and every request in between goes to one worker. (The heartbeat resets
        the count; a prompt the worker has not admitted by then is not in its report.)"""
        self.reserved_since_hb += self._blocks(prompt_tokens)

    def release(self, tokens: int) -> None:
        """Count the KV blocks of a request that ended here (`tokens`: its prompt and
        output) as free until the next heartbeat. Without it a worker whose requests ended
        after its last heartbeat looks as full as then, and the routing depends on when the
        workers' heartbeats come: in the simulator, 2both prefill-heavy at 25.5 req/s
        (2 x H100 profiles) held 0.99 of its SLOs with the heartbeats in phase and 0.79
        with them half a period apart; with the release, 0.98 and 0.99. (The blocks a
        request grows into while it decodes are not counted as it grows: until the next
        heartbeat, a worker looks freer by the output blocks of the requests that ended
        there, as the simulator models it.)"""
        self.reserved_since_hb -= self._blocks(tokens)

    def _blocks(self, tokens: int) -> int:
        """KV blocks `tokens` tokens take on this worker (1 when it reported no block size)."""
        bs = self.info.kv.block_size
        return -(-tokens // bs) if bs else 1

    def est_running(self) -> int:
        return max(self.load.running + self.load.waiting, self.inflight)

    def est_queued_prefill_tokens(self) -> int:
        return max(self.load.queued_prefill_tokens, self.inflight_prefill_tokens)

    def status(self, now: float) -> pb.WorkerStatus:
        return pb.WorkerStatus(info=self.info, load=self.load, last_seen_s=now - self.last_seen,
                               inflight=self.inflight)


class Registry:
    def __init__(self, worker_timeout_s: float = 5.0,
                 channel_factory: Callable[[str], grpc.aio.Channel] = new_channel,
                 health: HealthBook | None = None) -> None:
        self.worker_timeout_s = worker_timeout_s
        self.health = health or HealthBook(FailureConfig(), heartbeat_s=1.0)
        self._workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)
        self._channel_factory = channel_factory
        self._changed = asyncio.Event()  # set whenever capacity may have appeared
        self._reaper: asyncio.Task | None = None

    # -- membership -----------------------------------------------------------------
    def register(self, info: pb.WorkerInfo) -> WorkerHandle:
        if info.role not in ROLE_NAME:
            raise ValueError(f"worker role must be PREFILL, DECODE or BOTH, got {info.role}")
        if not info.address:
            raise ValueError("worker address (host:port) is required")
        copy = pb.WorkerInfo()
        copy.CopyFrom(info)
        info = copy
        if not info.worker_id:
            info.worker_id = f"{ROLE_NAME[info.role]}-{next(self._ids)}"
            while info.worker_id in self._workers:
                info.worker_id = f"{ROLE_NAME[info.role]}-{next(self._ids)}"
        if info.worker_id in self._workers:  # it leaves by silence or UNAVAILABLE
            raise WorkerIdTaken(f"worker id {info.worker_id!r} is held by a live worker")
        channel = self._channel_factory(info.address)
        handle = WorkerHandle(info=info, channel=channel, stub=pb_grpc.WorkerStub(channel),
                              load=pb.WorkerLoad(free_blocks=info.total_blocks,
                                                 total_blocks=info.total_blocks))
        self._workers[info.worker_id] = handle
        log.info("worker %s registered: role=%s address=%s model=%s", info.worker_id,
                 ROLE_NAME[info.role], info.address, info.model)
        self.notify()
        return handle

    def heartbeat(self, worker_id: str, load: pb.WorkerLoad) -> bool:
        handle = self._workers.get(worker_id)
        if handle is None:
            return False
        handle.load.CopyFrom(load)
        handle.last_seen = time.monotonic()
        handle.heartbeats += 1
        handle.reserved_since_hb = 0
        self.notify()
        return True

    def drop(self, worker_id: str, reason: str) -> None:
        handle = self._workers.pop(worker_id, None)
        if handle is not None:
            log.warning("worker %s dropped: %s", worker_id, reason)
            self._close(handle, reason)

    def drop_handle(self, handle: WorkerHandle, reason: str) -> None:
        if self._workers.get(handle.worker_id) is handle:
            self.drop(handle.worker_id, reason)

    def _close(self, handle: WorkerHandle, reason: str) -> None:
        handle.alive = False
        handle.drop_reason = reason
        asyncio.get_running_loop().create_task(handle.channel.close())

    # -- queries --------------------------------------------------------------------
    def workers(self, role: int | None = None) -> list[WorkerHandle]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def routable(self, role: int, excluded: Collection[str] = ()) -> list[WorkerHandle]:
        """Workers of `role` that may get new work: alive, not excluded, circuit closed
        (when every circuit of the role is open, all of them: a breaker steers work to the
        other workers, it never takes a whole role out). Best first: those that heartbeat
        since they registered, then the ones not heard from yet, then suspects (each group
        only when the one before is empty)."""
        h = self.health
        ws = [w for w in self._workers.values() if w.role == role and w.alive
              and w.worker_id not in excluded]
        ws = [w for w in ws if not h.broken(w.worker_id)] or ws
        healthy = [w for w in ws if not h.is_suspect(w.worker_id, w.last_seen)]
        return [w for w in healthy if w.heartbeats] or healthy or ws

    def statuses(self) -> list[pb.WorkerStatus]:
        now = time.monotonic()
        return [w.status(now) for w in self._workers.values()]

    # -- waiting for capacity ------------------------------------------------------
    def notify(self) -> None:
        """Wake requests waiting for capacity (a worker joined, a heartbeat, blocks freed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout_s: float) -> None:
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            pass

    # -- liveness ------------------------------------------------------------------
    def reap(self) -> list[str]:
        now = time.monotonic()
        dead = [w.worker_id for w in self._workers.values()
                if now - w.last_seen > self.worker_timeout_s]
        for wid in dead:
            self.drop(wid, f"no heartbeat for {self.worker_timeout_s:g} s")
        return dead

    def start(self, tick: Callable[[], None] | None = None) -> None:
        async def loop() -> None:
            period = min(1.0, self.worker_timeout_s / 4)
            while True:
                await asyncio.sleep(period)
                self.reap()
                if tick is not None:
                    tick()

        self._reaper = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for wid in list(self._workers):
            handle = self._workers.pop(wid)
            handle.alive = False
            await handle.channel.close()

"""A worker's link to the coordinator: Register, then Heartbeat with its load, forever.
Engine-backed workers (worker/server.py) and the fake workers (benchmarks/) both use it.

    link = CoordinatorLink("127.0.0.1:50051", info, load_fn=lambda: pb.WorkerLoad(...))
    worker_id = await link.start()      # retries until the coordinator answers
    ...
    await link.stop()

load_fn may be a coroutine function. Re-registers when a heartbeat reply says
`known = false` (the coordinator restarted or dropped this worker), and keeps trying
through coordinator outages and load_fn failures.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.grpc_util import auth_metadata, new_channel
from pdserve.proto.tls import TLSConfig, unavailable_hint

log = logging.getLogger("pdserve.worker")
REGISTER_TIMEOUT_S = 30.0


LoadFn = Callable[[], "pb.WorkerLoad | Awaitable[pb.WorkerLoad]"]


async def probe_load(load_fn: LoadFn) -> pb.WorkerLoad:
    """The worker's current load; `load_fn` may be a plain or a coroutine function."""
    load = load_fn()
    return await load if inspect.isawaitable(load) else load


class RegistrationRefused(RuntimeError):
    """The coordinator answered and said no (wrong model, bad geometry, ...)."""


class RegistrationFailed(RuntimeError):
    """The coordinator could not be reached in time, or rejected the credentials."""


class CoordinatorLink:
    def __init__(self, coordinator: str, info: pb.WorkerInfo,
                 load_fn: LoadFn,
                 auth_token: str | None = None, rpc_timeout_s: float = 5.0,
                 on_register: Callable[[str], None] | None = None,
                 heartbeat_s: float = 1.0, tls: TLSConfig | None = None) -> None:
        self.coordinator = coordinator
        self.tls = tls  # None: plaintext
        self.info = info
        self.load_fn = load_fn
        self.on_register = on_register  # called with the worker id after every Register
        self.rpc_timeout_s = rpc_timeout_s
        self.paused = False  # tests: stop heartbeating without dying
        self.heartbeat_s = heartbeat_s  # until the coordinator's Register reply says otherwise
        self._md = auth_metadata(auth_token)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None
        self._task: asyncio.Task | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    async def register(self) -> str:
        """One Register call; raises RegistrationRefused or grpc.aio.AioRpcError."""
        if self._stub is None:
            self._channel = new_channel(self.coordinator, tls=self.tls)
            self._stub = pb_grpc.CoordinatorStub(self._channel)
        # Register may take a while: the coordinator first warms the worker's transfer paths
        reply = await self._stub.Register(pb.RegisterRequest(info=self.info), metadata=self._md,
                                          timeout=max(self.rpc_timeout_s, REGISTER_TIMEOUT_S))
        if not reply.accepted:
            raise RegistrationRefused(f"coordinator refused registration: {reply.reason}")
        self.info.worker_id = reply.worker_id
        if reply.heartbeat_s > 0:
            self.heartbeat_s = reply.heartbeat_s
        if self.on_register is not None:
            self.on_register(reply.worker_id)
        return reply.worker_id

    async def start(self, timeout_s: float = 60.0) -> str:
        """Register (retrying while the coordinator is unreachable), then heartbeat. Raises
        RegistrationRefused, or RegistrationFailed (bad credentials, or no answer in time)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            try:
                await self.register()
                break
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT) \
                        or loop.time() >= end:
                    hint = (unavailable_hint(self.tls, e.details() or "")
                            if e.code() == grpc.StatusCode.UNAVAILABLE else "")
                    raise RegistrationFailed(
                        f"could not register with the coordinator at {self.coordinator}: "
                        f"{e.code().name}: {e.details()}{hint}") from e
                await asyncio.sleep(0.2)
        self._task = loop.create_task(self._beat())
        log.info("registered with %s as %s", self.coordinator, self.worker_id)
        return self.worker_id

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.paused:
                continue
            try:
                req = pb.HeartbeatRequest(worker_id=self.worker_id,
                                          load=await probe_load(self.load_fn))
                reply = await self._stub.Heartbeat(req, metadata=self._md, timeout=self.rpc_timeout_s)
                if not reply.known:
                    log.warning("coordinator forgot worker %s; registering again", self.worker_id)
                    await self.register()
            except grpc.aio.AioRpcError as e:
                log.debug("heartbeat failed: %s", e.code().name)
            except RegistrationRefused as e:
                log.error("%s", e)
            except Exception as e:  # the load probe failed (engine stopped): say so, keep going
                log.warning("heartbeat of %s failed: %s", self.worker_id, e)

    def leave(self, reason: str) -> None:
        """Stop heartbeating for good: the coordinator drops this worker after its worker
        timeout, or at once when a Worker RPC answers UNAVAILABLE (see worker/server.py)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            log.warning("worker %s leaves the coordinator at %s: %s", self.worker_id,
                        self.coordinator, reason)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

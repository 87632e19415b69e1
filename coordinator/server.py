"""The coordinator's gRPC server (grpc.aio): Coordinator service + health + reflection,
optionally the OpenAI-compatible HTTP gateway.

    server = CoordinatorServer(CoordinatorConfig(port=0))
    port = await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pdserve.coordinator.config import CoordinatorConfig
from pdserve.coordinator.health import HealthBook
from pdserve.coordinator.orchestrator import Orchestrator
from pdserve.coordinator.registry import Registry
from pdserve.coordinator.request import RequestError
from pdserve.coordinator.router import make_policy
from pdserve.coordinator.tokens import TokenizerProvider
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.grpc_util import (
    COORDINATOR_SERVICE,
    add_standard_services,
    check_auth,
    new_server,
)

log = logging.getLogger("pdserve.coordinator")
LIVE_STATS_TIMEOUT_S = 2.0


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, orch: Orchestrator, config: CoordinatorConfig) -> None:
        self.orch = orch
        self.registry = orch.registry
        self.config = config
        self.token = config.auth_token

    async def Generate(self, request, context):
        await check_auth(context, self.token)
        try:
            async for response in self.orch.generate(request, context.time_remaining()):
                yield response
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def Abort(self, request, context):
        await check_auth(context, self.token)
        return pb.AbortReply(found=self.orch.abort(request.request_id))

    async def ListWorkers(self, request, context):
        await check_auth(context, self.token)
        return pb.ListWorkersReply(workers=self.registry.statuses())

    async def Stats(self, request, context):
        await check_auth(context, self.token)
        if request.live:
            await self._refresh_loads()
        return self.orch.stats()

    async def _refresh_loads(self) -> None:
        workers = self.registry.workers()

        async def one(w):
            reply = await w.stub.Stats(pb.WorkerStatsRequest(), timeout=LIVE_STATS_TIMEOUT_S)
            w.load.CopyFrom(reply.load)
            w.reserved_since_hb = 0

        results = await asyncio.gather(*(one(w) for w in workers), return_exceptions=True)
        for w, r in zip(workers, results, strict=True):
            if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE:
                self.registry.drop_handle(w, f"Stats failed: {r.details()}")

    async def Register(self, request, context):
        await check_auth(context, self.token)
        info = request.info
        current = self.orch.tokenizers.model or next(
            (w.info.model for w in self.registry.workers() if w.info.model), "")
        if current and info.model and info.model != current:
            return pb.RegisterReply(accepted=False, reason=(
                f"this coordinator serves model {current!r}, the worker has {info.model!r}"))
        try:
            handle = self.registry.register(info)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.orch.tokenizers.model_known(info.model)
        return pb.RegisterReply(accepted=True, worker_id=handle.worker_id,
                                heartbeat_s=self.config.heartbeat_s)

    async def Heartbeat(self, request, context):
        await check_auth(context, self.token)
        return pb.HeartbeatReply(known=self.registry.heartbeat(request.worker_id, request.load))


class CoordinatorServer:
    """Owns the grpc.aio server, the registry's reaper and the optional HTTP gateway.

    `tokenizer` / `tokenizer_factory` replace the model's tokenizer (tests inject one).
    """

    def __init__(self, config: CoordinatorConfig | None = None, *, http_port: int | None = None,
                 http_host: str | None = None, tokenizer: Tokenizer | None = None,
                 tokenizer_factory: Callable[[str], Tokenizer] | None = None) -> None:
        self.config = config or CoordinatorConfig()
        self.http_port = http_port
        self.http_host = http_host or self.config.host
        self._tok_args = (tokenizer_factory, tokenizer)
        self.port: int | None = None
        self.orch: Orchestrator | None = None
        self._server: grpc.aio.Server | None = None
        self._gateway = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        cfg = self.config
        registry = Registry(cfg.worker_timeout_s,
                            health=HealthBook(cfg.failure, heartbeat_s=cfg.heartbeat_s))
        tokenizers = TokenizerProvider(factory=self._tok_args[0], tokenizer=self._tok_args[1])
        self.orch = Orchestrator(registry, make_policy(cfg.routing), cfg.max_queue, tokenizers,
                                 failure=cfg.failure)
        self._server = new_server()
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.orch, cfg), self._server)
        self._health = await add_standard_services(self._server, [COORDINATOR_SERVICE])
        self.port = self._server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if not self.port:
            raise OSError(f"cannot bind the coordinator to {cfg.host}:{cfg.port}")
        await self._server.start()
        registry.start(tick=self.orch.tick)
        log.info("coordinator listening on %s (routing=%s)", self.address, cfg.routing)
        if self.http_port is not None:
            from pdserve.coordinator.http_gateway import HttpGateway
            self._gateway = HttpGateway(self.address, auth_token=None)
            await self._gateway.start(self.http_host, self.http_port)
        return self.port

    @property
    def http_address(self) -> str | None:
        return self._gateway.address if self._gateway is not None else None

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace_s)
        if self.orch is not None:
            await self.orch.registry.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

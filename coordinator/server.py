"""The coordinator's gRPC server (grpc.aio): Coordinator service + health + reflection,
optionally the OpenAI-compatible HTTP gateway (FastAPI/uvicorn on the same event loop).

    server = CoordinatorServer(CoordinatorConfig(port=0))
    port = await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc

from pdserve.coordinator.config import CoordinatorConfig
from pdserve.coordinator.health import HealthBook
from pdserve.coordinator.metrics import make_metrics
from pdserve.coordinator.orchestrator import Orchestrator
from pdserve.coordinator.pd_decider import PdDecider
from pdserve.coordinator.registry import Registry, WorkerIdTaken
from pdserve.coordinator.request import RequestError
from pdserve.coordinator.router import make_policy
from pdserve.coordinator.tokens import TokenizerProvider, default_tokenizer_factory
from pdserve.coordinator.warmup import warm_new_worker
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import ROLE_NAME
from pdserve.proto.grpc_util import (
    COORDINATOR_SERVICE,
    add_standard_services,
    listen,
    new_channel,
    new_server,
)
from pdserve.proto.guard import COORDINATOR_PLANES, Guard

log = logging.getLogger("pdserve.coordinator")
CHANNEL_READY_S = 2.0
LIVE_STATS_TIMEOUT_S = 2.0


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Credentials and request bytes are checked before a handler runs (proto/guard.py)."""

    def __init__(self, orch: Orchestrator, config: CoordinatorConfig) -> None:
        self.orch = orch
        self.registry = orch.registry
        self.config = config

    async def Generate(self, request, context):
        try:
            async for response in self.orch.generate(request, context.time_remaining()):
                yield response
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def Abort(self, request, context):
        return pb.AbortReply(found=self.orch.abort(request.request_id))

    async def ListWorkers(self, request, context):
        return pb.ListWorkersReply(workers=self.registry.statuses())

    async def Stats(self, request, context):
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
        info = request.info
        current = self.orch.tokenizers.model or next(
            (w.info.model for w in self.registry.workers() if w.info.model), "")
        if current and info.model and info.model != current:
            return pb.RegisterReply(accepted=False, reason=(
                f"this coordinator serves model {current!r}, the worker has {info.model!r}"))
        await self._warm_up(info)
        try:
            handle = self.registry.register(info)
        except WorkerIdTaken as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.orch.tokenizers.model_known(info.model)
        try:  # connect the channel requests will use now, not in the first request's TTFT
            await asyncio.wait_for(handle.channel.channel_ready(), CHANNEL_READY_S)
        except (asyncio.TimeoutError, grpc.aio.UsageError):
            pass  # best effort: the first call connects it
        return pb.RegisterReply(accepted=True, worker_id=handle.worker_id,
                                heartbeat_s=self.config.heartbeat_s)

    async def _warm_up(self, info: pb.WorkerInfo) -> None:
        """Run a throw-away request through each pair the worker will form (warmup.py)."""
        budget = self.config.warm_up_s
        other = {pb.ROLE_PREFILL: pb.ROLE_DECODE, pb.ROLE_DECODE: pb.ROLE_PREFILL}.get(info.role)
        if budget <= 0 or other is None or not info.address:
            return
        peers = [(w.worker_id, w.stub) for w in self.registry.workers(other) if w.alive]
        if not peers:
            return
        channel = new_channel(info.address, self.config.cluster_secret, self.config.tls)
        try:
            n = await warm_new_worker(info, pb_grpc.WorkerStub(channel), peers, budget)
            log.info("worker at %s: %d of %d transfer paths warmed", info.address, n, len(peers))
        finally:
            await channel.close()

    async def Heartbeat(self, request, context):
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
        self._http = None
        self.http_address: str | None = None
        self.metrics = None
        self._etcd = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        cfg = self.config
        registry = Registry(cfg.worker_timeout_s,
                            lambda address: new_channel(address, cfg.cluster_secret, cfg.tls),
                            health=HealthBook(cfg.failure, heartbeat_s=cfg.heartbeat_s))
        factory = self._tok_args[0] or functools.partial(default_tokenizer_factory,
                                                         cache_dir=cfg.model_cache_dir)
        tokenizers = TokenizerProvider(factory=factory, tokenizer=self._tok_args[1])
        self.metrics = make_metrics()
        self.orch = orch = Orchestrator(registry, make_policy(cfg.routing), cfg.max_queue,
                                        tokenizers, metrics=self.metrics, failure=cfg.failure,
                                        decider=PdDecider(cfg.pd_threshold_tokens))
        self.metrics.watch(
            lambda: ((w.worker_id, ROLE_NAME.get(w.role, "?"), w.load) for w in registry.workers()),
            lambda: (len(orch.active), orch.dispatch.queued))
        self._server = new_server(Guard(COORDINATOR_PLANES, cfg.auth_token, cfg.cluster_secret))
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.orch, cfg), self._server)
        self._health = await add_standard_services(self._server, [COORDINATOR_SERVICE])
        self.port = listen(self._server, cfg.host, cfg.port, cfg.tls)
        if not self.port:
            raise OSError(f"cannot bind the coordinator to {cfg.host}:{cfg.port}")
        await self._server.start()
        registry.start(tick=self.orch.tick)
        if cfg.etcd:
            self._etcd = self._etcd_sync(registry)
            self._etcd.start()
        log.info("coordinator listening on %s (routing=%s)", self.address, cfg.routing)
        if self.http_port is not None:
            try:
                from pdserve.coordinator.http_gateway import create_app
                from pdserve.coordinator.http_server import HttpServer
            except ImportError as e:
                raise RuntimeError(f"the HTTP gateway needs the `http` extra "
                                   f"(pip install 'pdserve[http]'): {e}") from None
            app = create_app(self.orch, self.metrics, cfg.auth_token)
            self._http = HttpServer(app, self.http_host, self.http_port, tls=cfg.tls)
            bound = await self._http.start()
            host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "[::]") else self.http_host
            self.http_address = f"{host}:{bound}"
            log.info("HTTP gateway listening on %s://%s",
                     "https" if cfg.tls is not None and cfg.tls.serves_tls else "http",
                     self.http_address)
        return self.port

    def _etcd_sync(self, registry: Registry):
        from pdserve.coordinator.etcd_registry import EtcdRegistrySync
        from pdserve.proto.etcd import Etcd

        tokenizers = self.orch.tokenizers

        def accept(info: pb.WorkerInfo) -> str | None:
            current = tokenizers.model or next(
                (w.info.model for w in registry.workers() if w.info.model), "")
            if current and info.model and info.model != current:
                return f"this coordinator serves model {current!r}, the worker has {info.model!r}"
            tokenizers.model_known(info.model)
            return None

        return EtcdRegistrySync(registry, Etcd(self.config.etcd), self.config.etcd_prefix,
                                accept=accept)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._http is not None:
            await self._http.stop()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace_s)
        if self._etcd is not None:
            await self._etcd.stop()
        if self.orch is not None:
            await self.orch.registry.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

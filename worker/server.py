"""The role-agnostic Worker gRPC server: life cycle, registration, and RPC dispatch.

`WorkerServer(cfg)` looks up `cfg.role` in the role registry (worker/role.py), builds the
engine with that role's phase-sized settings, and hands each Worker RPC to the role.
Abort and Stats are the same for every role. The role packages (prefill/, decode/) must
be imported before start() so that they are registered; pdserve's CLI does that.

Threads: the grpc.aio loop (handlers, registration, heartbeats), the engine thread (every
scheduler and KV-pool access, see worker/core.py), and the transfer endpoint's progress
thread (inside the role).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.llm_engine import LLMEngine
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import ROLE_BY_NAME
from pdserve.proto.grpc_util import WORKER_SERVICE, add_standard_services, listen, new_server
from pdserve.proto.guard import WORKER_PLANES, Guard
from pdserve.worker.config import WorkerConfig
from pdserve.worker.coordinator_link import CoordinatorLink
from pdserve.worker.core import WorkerCore
from pdserve.worker.etcd_link import EtcdLink
from pdserve.worker.role import Role, get_role

log = logging.getLogger(__name__)


class WorkerServer(pb_grpc.WorkerServicer):
    def __init__(self, cfg: WorkerConfig) -> None:
        self.role_cls = get_role(cfg.role)  # unknown roles fail here, before any work
        self.cfg = cfg
        self.port = cfg.port
        self.worker_id = cfg.worker_id
        self.core: WorkerCore | None = None
        self.role: Role | None = None
        self.server: grpc.aio.Server | None = None
        self.link: CoordinatorLink | EtcdLink | None = None  # registration + heartbeats

    @property
    def engine(self) -> LLMEngine:
        assert self.core is not None, "start() first"
        return self.core.engine

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        engine_cfg = self.role_cls.engine_config(self.cfg.engine)
        engine = await asyncio.to_thread(LLMEngine, engine_cfg)
        # Ready means warm: kernels compile here, not in the first request's TTFT.
        t0 = time.perf_counter()
        if engine.cfg.device.startswith("cuda"):
            await asyncio.to_thread(engine.warm_up)
        else:  # nothing is compiled on CPU: a short batch checks the path, start-up stays fast
            await asyncio.to_thread(engine.warm_up, (8, 64))
        log.info("warm-up done in %.2f s", time.perf_counter() - t0)
        self.core = WorkerCore(self.cfg, engine, asyncio.get_running_loop())
        self.role = self.role_cls(self.core)
        self.core.attach(self.role)
        self.core.add_failure_listener(self._out_of_service)
        self.core.start()
        self.server = new_server(Guard(WORKER_PLANES, cluster_secret=self.cfg.cluster_secret))
        pb_grpc.add_WorkerServicer_to_server(self, self.server)
        self.health = await add_standard_services(self.server, [WORKER_SERVICE])
        self.port = listen(self.server, self.cfg.host, self.cfg.port, self.cfg.tls)
        await self.server.start()
        if self.cfg.etcd:
            from pdserve.proto.etcd import Etcd
            self.link = EtcdLink(
                Etcd(self.cfg.etcd), self.cfg.etcd_prefix, self.info(),
                lambda: self.core.on_engine(self.core.load), ttl_s=self.cfg.lease_ttl_s,
                heartbeat_s=self.cfg.heartbeat_s, on_register=self._set_worker_id)
            await self.link.start(timeout_s=30.0)
        elif self.cfg.coordinator:
            self.link = CoordinatorLink(
                self.cfg.coordinator, self.info(), lambda: self.core.on_engine(self.core.load),
                auth_token=self.cfg.cluster_secret or self.cfg.auth_token, rpc_timeout_s=max(1.0, 2 * self.cfg.heartbeat_s),
                on_register=self._set_worker_id, heartbeat_s=self.cfg.heartbeat_s,
                tls=self.cfg.tls)
            await self.link.start(timeout_s=30.0)
        log.info("worker %s (%s) serving on %s:%d (advertised as %s)", self.worker_id,
                 self.cfg.role, self.cfg.host, self.port, self.cfg.advertised_host)
        return self.port

    def _set_worker_id(self, worker_id: str) -> None:
        self.worker_id = worker_id

    async def _out_of_service(self, why: str) -> None:
        """The worker can no longer serve (core.fail): NOT_SERVING, and no more heartbeats.
        New work is refused with UNAVAILABLE, on which the coordinator drops this worker at
        once (and retries the request elsewhere); silence drops it within its timeout."""
        if getattr(self, "health", None) is not None:
            await self.health.set_serving(False)
        if self.link is not None:
            self.link.leave(f"out of service: {why}")

    async def _refuse_if_failed(self, context) -> None:
        if self.core is not None and self.core.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"worker out of service: {self.core.failure}")

    def info(self) -> pb.WorkerInfo:
        """What the coordinator learns at registration: role, address, model, KV geometry."""
        eng, mc, ecfg = self.engine, self.engine.model_cfg, self.engine.cfg
        kv = pb.KVGeometry(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                           head_dim=mc.head_dim, block_size=eng.block_size, dtype=ecfg.dtype)
        return pb.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_BY_NAME[self.cfg.role],
            address=f"{self.cfg.advertised_host}:{self.port}", model=ecfg.model,
            max_model_len=eng.max_model_len, vocab_size=mc.vocab_size, kv=kv,
            total_blocks=eng.num_blocks, device=ecfg.device,
            transfer_backend=self.cfg.transfer.backend if self.role_cls.transfer_backend else "")

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.link:
            await self.link.stop()
        if self.server:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
        if self.core is not None:
            self.core.stop()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    # -- Worker service: role RPCs ------------------------------------------------------------
    async def Reserve(self, request, context):
        await self._refuse_if_failed(context)
        return await self.role.reserve(request, context)

    async def Prefill(self, request, context):
        await self._refuse_if_failed(context)
        async for reply in self.role.prefill(request, context):
            yield reply

    async def SetKvTarget(self, request, context):
        await self._refuse_if_failed(context)
        return await self.role.set_kv_target(request, context)

    async def DecodeStream(self, request, context):
        async for chunk in self.role.decode_stream(request, context):
            yield chunk

    async def Generate(self, request, context):
        await self._refuse_if_failed(context)
        async for chunk in self.role.generate(request, context):
            yield chunk

    # -- Worker service: the same for every role ----------------------------------------------
    async def Abort(self, request, context):
        return pb.AbortReply(found=await self.core.abort_request(request.request_id))

    async def Stats(self, request, context):
        load = await self.core.on_engine(self.core.load)
        return pb.WorkerStatsReply(load=load, worker_id=self.worker_id)

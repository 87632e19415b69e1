"""A worker's registration with the coordinator, and its heartbeats."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pdserve.config import ServerConfig
from pdserve.coordinator.convert import ROLE_BY_NAME
from pdserve.coordinator.grpc_util import auth_metadata, new_channel
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from pdserve.worker_server import WorkerServer

log = logging.getLogger(__name__)


class Registration:
    def __init__(self, worker: WorkerServer, coordinator: str, scfg: ServerConfig) -> None:
        self.worker = worker
        self.coordinator = coordinator
        self.metadata = auth_metadata(scfg.auth_token)
        self.heartbeat_s = scfg.heartbeat_s
        self.channel = new_channel(coordinator)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._task: asyncio.Task | None = None

    def info(self) -> pb.WorkerInfo:
        w = self.worker
        eng = w.engine
        mc = eng.model_cfg
        kv = pb.KVGeometry(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                           head_dim=mc.head_dim, block_size=eng.block_size, dtype=w.cfg.dtype)
        return pb.WorkerInfo(
            worker_id=w.worker_id, role=ROLE_BY_NAME[w.role], address=f"{w.host}:{w.port}",
            model=w.cfg.model, max_model_len=eng.max_model_len, vocab_size=mc.vocab_size, kv=kv,
            total_blocks=eng.num_blocks, device=w.cfg.device,
            transfer_backend=w.cfg.transfer.backend if w.role != "both" else "")

    async def register(self, timeout_s: float = 30.0) -> None:
        """Register, retrying while the coordinator is not up yet."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reply = await self.stub.Register(pb.RegisterRequest(info=self.info()),
                                                 metadata=self.metadata, timeout=5.0)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"could not register with the coordinator at "
                                       f"{self.coordinator}: {exc.code().name}: {exc.details()}") from exc
                await asyncio.sleep(0.2)
        if not reply.accepted:
            raise RuntimeError(f"the coordinator refused this worker: {reply.reason}")
        self.worker.worker_id = reply.worker_id
        if reply.heartbeat_s > 0:
            self.heartbeat_s = reply.heartbeat_s

    async def start(self) -> None:
        await self.register()
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                load = await self.worker.on_engine(self.worker.load)
                reply = await self.stub.Heartbeat(
                    pb.HeartbeatRequest(worker_id=self.worker.worker_id, load=load),
                    metadata=self.metadata, timeout=max(1.0, self.heartbeat_s * 2))
                if not reply.known:
                    log.warning("coordinator forgot this worker; registering again")
                    await self.register()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep beating: the coordinator may come back
                log.warning("heartbeat failed: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.channel.close()

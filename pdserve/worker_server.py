"""An engine-backed Worker gRPC server: role prefill, decode or both (colocated).

Threads: the grpc.aio loop (handlers, registration, heartbeats), the engine loop thread
(every scheduler and KV-pool access), and the transfer engine's own progress thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdserve.config import Config
from pdserve.coordinator.convert import ROLE_BY_NAME, sampling_from_proto
from pdserve.coordinator.grpc_util import WORKER_SERVICE, add_standard_services, new_server
from pdserve.coordinator.worker_link import CoordinatorLink
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine, StepResult
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.worker_state import ReqState, RequestAborted, StateTable, StreamEnd

log = logging.getLogger(__name__)


class WorkerServer(pb_grpc.WorkerServicer):
    def __init__(self, cfg: Config, role: str, coordinator: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, worker_id: str = "") -> None:
        if role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, got {role!r}")
        self.cfg, self.role, self.coordinator = cfg, role, coordinator
        self.host, self.port, self.worker_id = host, port, worker_id
        self.engine: LLMEngine | None = None
        self.prefill = None  # prefill.service.PrefillRole
        self.decode = None  # decode.service.DecodeRole
        self.server: grpc.aio.Server | None = None
        self.link: CoordinatorLink | None = None  # registration + heartbeats

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.table = StateTable(self.loop)
        self.engine = await asyncio.to_thread(LLMEngine, self.cfg)
        self.engine_loop = EngineLoop(self.engine, on_result=self._on_result,
                                      before_run=self._before_run)
        if self.role == "prefill":
            from pdserve.prefill.service import PrefillRole
            self.prefill = PrefillRole(self)
        elif self.role == "decode":
            from pdserve.decode.service import DecodeRole
            self.decode = DecodeRole(self)
        self.engine_loop.start()
        self.server = new_server()
        pb_grpc.add_WorkerServicer_to_server(self, self.server)
        self.health = await add_standard_services(self.server, [WORKER_SERVICE])
        self.port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        await self.server.start()
        if self.coordinator:
            self.link = CoordinatorLink(
                self.coordinator, self.info(), lambda: self.on_engine(self.load),
                auth_token=self.cfg.server.auth_token,
                rpc_timeout_s=max(1.0, 2 * self.cfg.server.heartbeat_s),
                on_register=self._set_worker_id)
            self.link.heartbeat_s = self.cfg.server.heartbeat_s
            await self.link.start(timeout_s=30.0)
        log.info("worker %s (%s) serving on %s:%d", self.worker_id, self.role, self.host, self.port)
        return self.port

    def _set_worker_id(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def info(self) -> pb.WorkerInfo:
        """What the coordinator learns at registration: role, address, model, KV geometry."""
        eng, mc = self.engine, self.engine.model_cfg
        kv = pb.KVGeometry(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                           head_dim=mc.head_dim, block_size=eng.block_size, dtype=self.cfg.dtype)
        return pb.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_BY_NAME[self.role],
            address=f"{self.host}:{self.port}", model=self.cfg.model,
            max_model_len=eng.max_model_len, vocab_size=mc.vocab_size, kv=kv,
            total_blocks=eng.num_blocks, device=self.cfg.device,
            transfer_backend=self.cfg.transfer.backend if self.role != "both" else "")

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.link:
            await self.link.stop()
        if self.server:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
        for role in (self.prefill, self.decode):
            if role is not None:
                role.close()
        self.engine_loop.stop()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    # -- engine thread hooks ------------------------------------------------------------------
    def _before_run(self, out: SchedulerOutput):
        now = time.monotonic()
        for c in out.chunks:
            st = self.table.get(c.seq_id)
            if st is not None and st.scheduled_s is None:
                st.scheduled_s = now
        return self.prefill.before_run(out) if self.prefill else None

    def _on_result(self, out: SchedulerOutput, res: StepResult) -> None:
        items: list[tuple[ReqState, object]] = []
        for sid, tok in res.new_tokens.items():
            st = self.table.get(sid)
            if st is None:
                continue
            if st.kind == "prefill":
                self.prefill.on_first_token(st, tok)
            else:
                items.append((st, tok))
        for seq in res.finished:
            st = self.table.get(seq.seq_id)
            if st is not None and st.kind != "prefill":
                items.append((st, StreamEnd(seq.finish_reason or "abort")))
        self.table.deliver(items)

    # -- shared helpers -------------------------------------------------------------------------
    def load(self) -> pb.WorkerLoad:
        """Called from the engine thread (through engine_loop.call)."""
        s = self.engine.kv_stats()
        queued = sum(st.prompt_len for st in list(self.table.states.values())
                     if st.kind != "decode" and st.computed_s is None)
        return pb.WorkerLoad(free_blocks=s["free_blocks"], total_blocks=s["total_blocks"],
                             running=s["running"], waiting=s["waiting"],
                             queued_prefill_tokens=queued)

    async def on_engine(self, fn):
        return await asyncio.wrap_future(self.engine_loop.call(fn))

    async def new_sequence(self, context, req_id: str, prompt: list[int], sampling: pb.SamplingParams,
                           prefill_only: bool = False):
        try:
            params = sampling_from_proto(sampling)
            return self.engine.make_sequence(list(prompt), params, seq_id=req_id,
                                             prefill_only=prefill_only)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def abort_request(self, req_id: str, code=grpc.StatusCode.CANCELLED,
                            message: str = "aborted") -> bool:
        """Free everything of req_id (engine blocks, transfers) and end its RPCs."""
        st = self.table.get(req_id)
        for role in (self.prefill, self.decode):
            if role is not None:
                role.abort(req_id)
        found = await self.on_engine(lambda: self.engine.abort(req_id))
        if st is not None:
            self.table.deliver([(st, StreamEnd("abort", (code, message)))])
            self.table.resolve(st, error=RequestAborted(code, message))
            self.table.pop(req_id)
        return bool(found or st is not None)

    async def stream_tokens(self, st: ReqState, context) -> AsyncIterator[pb.TokenChunk]:
        """TokenChunks from st.queue, several tokens per message; aborts on cancel."""
        ok = False
        try:
            while True:
                items = [await st.queue.get()]
                while not st.queue.empty():
                    items.append(st.queue.get_nowait())
                toks = [t for t in items if isinstance(t, int)]
                end = next((t for t in items if isinstance(t, StreamEnd)), None)
                if end is not None and end.error is not None:
                    if toks:
                        yield pb.TokenChunk(token_ids=toks)
                    ok = True  # the request is already gone
                    await context.abort(*end.error)
                if end is None:
                    yield pb.TokenChunk(token_ids=toks)
                    continue
                yield pb.TokenChunk(token_ids=toks, finished=True, finish_reason=end.reason,
                                    timings=self.timings(st))
                ok = True
                return
        finally:
            if not ok:  # caller went away: free the request's blocks
                await self.abort_request(st.req_id)
            self.table.pop(st.req_id)

    def timings(self, st: ReqState) -> pb.Timings:
        t = pb.Timings()
        if st.scheduled_s is not None:
            t.queue_ms = (st.scheduled_s - st.arrival_s) * 1e3
        if st.computed_s is not None and st.scheduled_s is not None:
            t.prefill_ms = (st.computed_s - st.scheduled_s) * 1e3
        if st.kv_done_s is not None and st.computed_s is not None:
            t.transfer_ms = (st.kv_done_s - st.computed_s) * 1e3
        return t

    async def _require(self, context, roles: tuple[str, ...], rpc: str) -> None:
        if self.role not in roles:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{rpc} is not served by a {self.role} worker")

    # -- Worker service -------------------------------------------------------------------------
    async def Generate(self, request, context):
        await self._require(context, ("both",), "Generate")
        seq = await self.new_sequence(context, request.request_id, request.prompt_token_ids,
                                      request.sampling)
        try:
            st = self.table.add(ReqState(request.request_id, "local", len(seq.prompt_token_ids)))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        try:
            await self.on_engine(lambda: self.engine.scheduler.add(seq))
        except ValueError as exc:
            self.table.pop(st.req_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        async for chunk in self.stream_tokens(st, context):
            yield chunk

    async def Reserve(self, request, context):
        await self._require(context, ("decode",), "Reserve")
        return await self.decode.reserve(request, context)

    async def DecodeStream(self, request, context):
        await self._require(context, ("decode",), "DecodeStream")
        async for chunk in self.decode.stream(request, context):
            yield chunk

    async def Prefill(self, request, context):
        await self._require(context, ("prefill",), "Prefill")
        return await self.prefill.prefill(request, context)

    async def Abort(self, request, context):
        return pb.AbortReply(found=await self.abort_request(request.request_id))

    async def Stats(self, request, context):
        load = await self.on_engine(self.load)
        return pb.WorkerStatsReply(load=load, worker_id=self.worker_id)

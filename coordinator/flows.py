"""How a validated request is run on workers: disaggregated (P + D) or colocated (`both`).

Disaggregated (docs/architecture.md, "Request life cycle"; one attempt is a PdAttempt,
coordinator/pd_attempt.py): Prefill on P and Reserve on D are sent at once, and P gets D's
reservation (SetKvTarget) as soon as D answers, so the reservation's round trip overlaps the
prefill. Token 0 goes to the client from P's first PrefillReply (once the reservation is in
hand), before the KV transfer ends; D's tokens follow P's second reply (the transfer is
complete; D never repeats the first token). When every D refuses, P is aborted and the
request waits in the coordinator queue for a reservation (until capacity appears or the
deadline), then runs sequentially: Reserve, DecodeStream, Prefill with D's kv_address and
block ids. Whenever an attempt ends without a clean finish, its workers get Abort(request
id) so they free every block. Failures (coordinator/migration.py): the request is retried
or migrated on another pair; every worker call is bounded (a deadline, or a stall watch on
streams), so no attempt waits forever.

Conditional disaggregation (coordinator/pd_decider.py): with a P/D pool registered, a
prompt under the decider's threshold is prefilled by the chosen decode worker itself
(Worker.Generate on D, as on a colocated worker: no prefill worker, no KV transfer).
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc

from pdserve.coordinator.config import FailureConfig
from pdserve.coordinator.health import StallWatch
from pdserve.coordinator.metrics import NoMetrics
from pdserve.coordinator.migration import Attribution, run_attempts
from pdserve.coordinator.pd_attempt import PdAttempt
from pdserve.coordinator.pd_decider import COLOCATED, LOCAL_PREFILL, PATHS, PdDecider
from pdserve.coordinator.registry import Registry, WorkerHandle
from pdserve.coordinator.request import RequestError, RequestState, WorkerFailure
from pdserve.coordinator.router import RoutingPolicy
from pdserve.proto import pdserve_pb2 as pb

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode
RpcError = grpc.aio.AioRpcError
ABORT_TIMEOUT_S = 5.0


class Dispatcher:
    def __init__(self, registry: Registry, policy: RoutingPolicy, max_queue: int,
                 failure: FailureConfig | None = None, metrics: NoMetrics | None = None,
                 decider: PdDecider | None = None) -> None:
        self.registry = registry
        self.decider = decider or PdDecider()
        self.paths = dict.fromkeys(PATHS, 0)  # requests by the path of their first attempt
        self.metrics = metrics or NoMetrics()
        self.policy = policy
        self.max_queue = max_queue
        self.cfg = failure or FailureConfig()
        self.attr = Attribution(registry)
        self.watch = StallWatch(registry.health, self.cfg.stall_timeout_s)
        self.queued = 0  # requests waiting for a decode reservation
        self.retried = self.migrated = 0  # requests that needed another pair
        self._bg: set[asyncio.Task] = set()

    async def run(self, st: RequestState) -> None:
        reg = self.registry
        n_p, n_d, n_b = (len(reg.workers(r)) for r in (pb.ROLE_PREFILL, pb.ROLE_DECODE, pb.ROLE_BOTH))
        if n_p and n_d:
            flow, path = self._pd_pool, self.decider.path(len(st.prompt))
        elif n_b:
            flow, path = self._colocated, COLOCATED
        else:
            raise RequestError(Code.UNAVAILABLE, (
                f"no worker can serve: {n_p} prefill, {n_d} decode, {n_b} both registered "
                "(need at least one prefill and one decode worker, or one 'both' worker)"))
        self.paths[path] += 1
        self.metrics.request_path(path)
        counted: list[bool] = []

        def on_retry(migrating: bool) -> None:
            self.metrics.retry()
            if not counted:  # count requests, not attempts
                counted.append(True)
                if migrating:
                    self.migrated += 1
                else:
                    self.retried += 1
        await run_attempts(st, flow, self.cfg, on_retry, self.registry.wait_changed)

    # -- pieces ------------------------------------------------------------------------
    def failure(self, st: RequestState, w: WorkerHandle, role: str, e: RpcError,
                peer: WorkerHandle | None = None) -> RequestError | WorkerFailure:
        """The attribution's verdict on a failed worker call, counted in the metrics."""
        f = self.attr.failure(st, w, role, e, peer=peer)
        if isinstance(f, WorkerFailure):
            self.metrics.worker_failure(role, e.code().name)
        return f

    def abort_later(self, targets: list[tuple[WorkerHandle, str]]) -> None:
        """Fire-and-forget Worker.Abort so both ends free the request's blocks."""
        for w, wid in targets:
            if w.alive:
                task = asyncio.get_running_loop().create_task(self._abort(w, wid))
                self._bg.add(task)
                task.add_done_callback(self._bg.discard)

    async def _abort(self, w: WorkerHandle, wid: str) -> None:
        try:
            await w.stub.Abort(pb.AbortRequest(request_id=wid), timeout=ABORT_TIMEOUT_S)
        except RpcError as e:
            if e.code() == Code.UNAVAILABLE:
                self.registry.drop_handle(w, f"Abort failed: {e.details()}")
        except (asyncio.CancelledError, grpc.aio.UsageError):  # the worker was dropped
            pass
        finally:
            self.registry.notify()

    def check_fits(self, st: RequestState, ds: list[WorkerHandle]) -> None:
        sizes = [(w.info.total_blocks, w.info.kv.block_size) for w in ds]
        if not all(total and bs for total, bs in sizes):
            return
        n_tokens = len(st.prompt) + st.sampling.max_tokens
        if all(math.ceil(n_tokens / bs) > total for total, bs in sizes):
            raise RequestError(Code.INVALID_ARGUMENT, (
                f"prompt + max_tokens = {n_tokens} tokens needs more KV blocks than any decode "
                f"worker has (largest: {max(t * b for t, b in sizes)} tokens)"))

    async def try_reserve(self, st: RequestState, req: pb.ReserveRequest,
                          excluded: set[str]) -> tuple[WorkerHandle, pb.ReserveReply] | list[str]:
        """One round: Reserve on each routable decode worker, best first, until one accepts.
        Returns that worker and its reply, or why each one refused or failed."""
        ds = self.registry.routable(pb.ROLE_DECODE, excluded)
        if not ds:
            raise RequestError(Code.UNAVAILABLE, "no decode worker available")
        self.check_fits(st, ds)
        reasons = []
        for d in self.policy.order_decode(ds, st.attempt_prompt()):
            if not d.alive:
                continue
            try:
                r = await self.attr.guarded(d, "decode", d.stub.Reserve(
                    req, timeout=st.timeout(self.cfg.rpc_timeout_s)))
            except BaseException as e:
                self.abort_later([(d, req.request_id)])  # it may have reserved before we gave up
                if isinstance(e, WorkerFailure):
                    reasons.append(f"{d.worker_id}: {e}")
                    continue
                if not isinstance(e, RpcError):
                    raise
                f = self.failure(st, d, "decode", e)
                if isinstance(f, RequestError):
                    raise f from None
                reasons.append(f"{d.worker_id}: {e.code().name}")
                continue
            if r.accepted:
                d.reserved_since_hb += len(r.block_ids)
                d.routed += 1
                return d, r
            reasons.append(f"{d.worker_id}: {r.reason or 'refused'}")
        return reasons

    async def reserve(self, st: RequestState, wid: str, excluded: set[str],
                      refused: list[str] | None = None) -> tuple[WorkerHandle, pb.ReserveReply]:
        """A reservation for this attempt's prompt; while every decode worker refuses, wait
        in the coordinator queue (until capacity appears or the deadline). `refused`: the
        reasons of a round just tried (the request queues at once)."""
        req = st.worker_request(pb.ReserveRequest, wid)
        queued_at: float | None = None
        backoff = 0.01
        loop = asyncio.get_running_loop()
        try:
            while True:
                got = refused if refused is not None else await self.try_reserve(st, req, excluded)
                refused = None
                if not isinstance(got, list):
                    return got
                if queued_at is None:
                    if self.queued >= self.max_queue:
                        raise RequestError(Code.RESOURCE_EXHAUSTED, (
                            f"coordinator queue is full ({self.max_queue} requests already wait "
                            f"for decode KV blocks); decode workers refused: {'; '.join(got)}"))
                    self.queued += 1
                    queued_at = loop.time()
                rem = st.remaining()
                if rem is not None and rem <= 0:
                    raise RequestError(Code.DEADLINE_EXCEEDED, (
                        "deadline exceeded while queued for decode KV blocks; decode workers "
                        f"refused: {'; '.join(got)}"))
                await self.registry.wait_changed(backoff if rem is None else min(backoff, rem))
                backoff = min(backoff * 2, 0.25)
        finally:
            if queued_at is not None:
                self.queued -= 1
                st.queue_ms += (loop.time() - queued_at) * 1e3

    async def stream(self, st: RequestState, w: WorkerHandle, role: str, call) -> bool:
        """Emit a worker's token stream; True once it finished. The stall watch cancels a
        stream silent for stall_timeout_s (then: WorkerFailure, the request migrates)."""
        watched = self.watch.watch(call, w.worker_id)
        read, emit, eof = call.read, st.emit, grpc.aio.EOF
        try:
            while True:
                try:  # Attribution.guarded, inlined: this runs once per token message
                    chunk = await read()
                except asyncio.CancelledError:
                    self.attr.cancelled(w, role)
                if chunk is eof:
                    break
                watched.touch()
                emit(list(chunk.token_ids), chunk.finished, chunk.finish_reason, chunk.logprobs)
                if chunk.finished:
                    st.transfer_ms = max(st.transfer_ms, chunk.timings.transfer_ms)
                    if st.prefill_worker == st.decode_worker:  # it prefilled too
                        st.prefill_ms = chunk.timings.prefill_ms
                    return True
        except RpcError as e:
            raise self.failure(st, w, role, e) from None
        except WorkerFailure as f:
            if watched.stalled:
                raise WorkerFailure([w], f"{role} worker {w.worker_id} made no progress for "
                                    f"{self.cfg.stall_timeout_s:g} s") from None
            raise f
        finally:
            self.watch.unwatch(watched)
        self.attr.charge(w, "stream ended unfinished")
        raise WorkerFailure([w], f"{role} worker {w.worker_id} ended its stream unfinished")

    async def prefill_reply(self, p: WorkerHandle, call) -> pb.PrefillReply:
        """The next reply of a Prefill stream (token 0 first, then the transfer's end)."""
        reply = await self.attr.guarded(p, "prefill", call.read())
        if reply is grpc.aio.EOF:
            self.attr.charge(p, "prefill stream ended without a reply")
            raise WorkerFailure([p], f"prefill worker {p.worker_id} ended its Prefill stream "
                                "early")
        return reply

    # -- flows -------------------------------------------------------------------------
    async def _pd_pool(self, st: RequestState, wid: str, excluded: set[str]) -> None:
        """One attempt on the P/D pool: the decider picks the path from this attempt's prompt."""
        if self.decider.path(len(st.prompt) + len(st.output)) == LOCAL_PREFILL:
            await self._generate_on(st, wid, excluded, pb.ROLE_DECODE)
        else:
            await PdAttempt(self, st, wid, excluded).run()

    async def _colocated(self, st: RequestState, wid: str, excluded: set[str]) -> None:
        await self._generate_on(st, wid, excluded, pb.ROLE_BOTH)

    def pick_generate(self, ws: list[WorkerHandle], prompt: list[int],
                      local: bool) -> WorkerHandle:
        """The worker a Generate goes to (a decode worker for a local prefill, else a
        `both` one), with the request and its prompt's blocks counted against it."""
        w = (self.policy.order_decode if local else self.policy.order_both)(ws, prompt)[0]
        w.routed += 1
        w.count_generate(len(prompt))
        return w

    async def _generate_on(self, st: RequestState, wid: str, excluded: set[str],
                           role: int) -> None:
        """Worker.Generate on one worker that prefills and decodes the request: a `both`
        worker (colocated) or a decode worker (a local prefill)."""
        local = role == pb.ROLE_DECODE
        ws = self.registry.routable(role, excluded)
        if not ws:
            raise RequestError(Code.UNAVAILABLE, "no decode worker available" if local
                               else "no 'both' worker available")
        if local:
            self.check_fits(st, ws)
        w = self.pick_generate(ws, st.attempt_prompt(), local)
        st.prefill_worker = st.decode_worker = w.worker_id
        req = st.worker_request(pb.GenerateWorkerRequest, wid)
        done = False
        w.inflight += 1
        call = w.stub.Generate(req, timeout=st.remaining())
        try:
            done = await self.stream(st, w, "decode" if local else "colocated", call)
        finally:
            w.inflight -= 1
            w.release(len(st.prompt) + len(st.output))
            if not done:
                call.cancel()
                self.abort_later([(w, wid)])

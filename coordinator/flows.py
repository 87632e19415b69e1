"""How a validated request is run on workers: disaggregated (P + D) or colocated (`both`).

Disaggregated (docs/architecture.md, "Request life cycle"): pick D, Reserve on D (on refusal try the next D; when all refuse,
wait in the coordinator queue until capacity appears or the deadline), open D.DecodeStream,
call P.Prefill with D's kv_address and block ids, emit the first token from PrefillReply as
soon as it arrives, then D's tokens (D never repeats the first token). Whenever an attempt
ends without a clean finish, both workers get Abort(request id) so they free every block.
A worker failure before any token was emitted is retried once on another pair (failed worker
excluded, new request id); after that the request fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

import grpc

from pdserve.coordinator.metrics import NoMetrics
from pdserve.coordinator.registry import Registry, WorkerHandle
from pdserve.coordinator.request import RequestError, RequestState, WorkerFailure
from pdserve.coordinator.router import RoutingPolicy
from pdserve.proto import pdserve_pb2 as pb

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode
RpcError = grpc.aio.AioRpcError
# Worker statuses that are the request's fault: passed to the client, never retried.
_CLIENT_CODES = (Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION,
                 Code.RESOURCE_EXHAUSTED)
UNARY_TIMEOUT_S = 30.0  # cap of one Reserve when the client gave no deadline
ABORT_TIMEOUT_S = 5.0


def _cap(remaining: float | None, cap: float) -> float:
    return cap if remaining is None else min(remaining, cap)


def _transfer_cause(e: RpcError) -> str:
    """Why a Prefill RPC failed in its KV transfer ('' if it was not the transfer): the
    prefill worker answers ABORTED "KV transfer failed: ..." or UNAVAILABLE "cannot reach
    the decode worker's KV endpoint" (prefill/role.py)."""
    detail = (e.details() or "").lower()
    if e.code() == Code.ABORTED or "kv transfer" in detail:
        return "transfer_aborted"
    if "kv endpoint" in detail:
        return "kv_endpoint_unreachable"
    return ""


class Dispatcher:
    def __init__(self, registry: Registry, policy: RoutingPolicy, max_queue: int,
                 metrics: NoMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or NoMetrics()
        self.policy = policy
        self.max_queue = max_queue
        self.queued = 0  # requests waiting for a decode reservation
        self._bg: set[asyncio.Task] = set()

    async def run(self, st: RequestState) -> None:
        reg = self.registry
        n_p, n_d, n_b = (len(reg.workers(r)) for r in (pb.ROLE_PREFILL, pb.ROLE_DECODE, pb.ROLE_BOTH))
        if n_p and n_d:
            await self._with_retry(st, self._disaggregated)
        elif n_b:
            await self._with_retry(st, self._colocated)
        else:
            raise RequestError(Code.UNAVAILABLE, (
                f"no worker can serve: {n_p} prefill, {n_d} decode, {n_b} both registered "
                "(need at least one prefill and one decode worker, or one 'both' worker)"))

    async def _with_retry(self, st: RequestState,
                          attempt: Callable[[RequestState, str, set[str]], Awaitable[None]]) -> None:
        excluded: set[str] = set()
        for n in range(2):
            wid = st.rid if n == 0 else f"{st.rid}-retry{n}"
            try:
                await attempt(st, wid, excluded)
                return
            except WorkerFailure as f:
                excluded.update(f.worker_ids)
                if st.produced:
                    raise RequestError(Code.UNAVAILABLE, f"{f.message} after tokens were "
                                       "streamed; not retried") from None
                if n == 1:
                    raise RequestError(Code.UNAVAILABLE, f"{f.message} (on retry)") from None
                self.metrics.retry()
                log.warning("request %s: %s; retrying on another worker pair", st.rid, f.message)

    # -- pieces ------------------------------------------------------------------------
    def _failure(self, st: RequestState, w: WorkerHandle, role: str,
                 e: RpcError) -> RequestError | WorkerFailure:
        code, detail = e.code(), e.details()
        rem = st.remaining()
        if code == Code.DEADLINE_EXCEEDED and rem is not None and rem < 0.1:
            return RequestError(Code.DEADLINE_EXCEEDED,
                                f"deadline exceeded waiting for {role} worker {w.worker_id}")
        if code in _CLIENT_CODES:
            return RequestError(code, f"{role} worker {w.worker_id}: {detail}")
        if code == Code.UNAVAILABLE:
            self.registry.drop_handle(w, f"{role} RPC failed: {detail}")
        self.metrics.worker_failure(role, code.name)
        return WorkerFailure([w], f"{role} worker {w.worker_id} failed: {code.name}: {detail}")

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
        finally:
            self.registry.notify()

    def _check_fits(self, st: RequestState, ds: list[WorkerHandle]) -> None:
        sizes = [(w.info.total_blocks, w.info.kv.block_size) for w in ds]
        if not all(total and bs for total, bs in sizes):
            return
        n_tokens = len(st.prompt) + st.sampling.max_tokens
        if all(math.ceil(n_tokens / bs) > total for total, bs in sizes):
            raise RequestError(Code.INVALID_ARGUMENT, (
                f"prompt + max_tokens = {n_tokens} tokens needs more KV blocks than any decode "
                f"worker has (largest: {max(t * b for t, b in sizes)} tokens)"))

    async def _reserve(self, st: RequestState, wid: str,
                       excluded: set[str]) -> tuple[WorkerHandle, pb.ReserveReply]:
        req = pb.ReserveRequest(request_id=wid, prompt_token_ids=st.prompt, sampling=st.sampling)
        queued_at: float | None = None
        backoff = 0.01
        loop = asyncio.get_running_loop()
        try:
            while True:
                ds = [w for w in self.registry.workers(pb.ROLE_DECODE) if w.worker_id not in excluded]
                if not ds:
                    raise RequestError(Code.UNAVAILABLE, "no decode worker available")
                self._check_fits(st, ds)
                reasons = []
                for d in self.policy.order_decode(ds, st.prompt):
                    if not d.alive:
                        continue
                    try:
                        r = await d.stub.Reserve(req, timeout=_cap(st.remaining(), UNARY_TIMEOUT_S))
                    except BaseException as e:
                        self.abort_later([(d, wid)])  # it may have reserved before we gave up
                        if not isinstance(e, RpcError):
                            raise
                        f = self._failure(st, d, "decode", e)
                        if isinstance(f, RequestError):
                            raise f from None
                        reasons.append(f"{d.worker_id}: {e.code().name}")
                        continue
                    if r.accepted:
                        d.reserved_since_hb += len(r.block_ids)
                        d.routed += 1
                        return d, r
                    reasons.append(f"{d.worker_id}: {r.reason or 'refused'}")
                if queued_at is None:
                    if self.queued >= self.max_queue:
                        raise RequestError(Code.RESOURCE_EXHAUSTED, (
                            f"coordinator queue is full ({self.max_queue} requests already wait "
                            f"for decode KV blocks); decode workers refused: {'; '.join(reasons)}"))
                    self.queued += 1
                    queued_at = loop.time()
                rem = st.remaining()
                if rem is not None and rem <= 0:
                    raise RequestError(Code.DEADLINE_EXCEEDED, (
                        "deadline exceeded while queued for decode KV blocks; decode workers "
                        f"refused: {'; '.join(reasons)}"))
                await self.registry.wait_changed(backoff if rem is None else min(backoff, rem))
                backoff = min(backoff * 2, 0.25)
        finally:
            if queued_at is not None:
                self.queued -= 1
                st.queue_ms += (loop.time() - queued_at) * 1e3

    # -- flows -------------------------------------------------------------------------
    async def _disaggregated(self, st: RequestState, wid: str, excluded: set[str]) -> None:
        d, res = await self._reserve(st, wid, excluded)
        targets = [(d, wid)]
        done = False
        dcall = None
        d.inflight += 1
        try:
            ps = [w for w in self.registry.workers(pb.ROLE_PREFILL) if w.worker_id not in excluded]
            if not ps:
                raise RequestError(Code.UNAVAILABLE, "no prefill worker available")
            p = self.policy.order_prefill(ps, st.prompt)[0]
            p.routed += 1
            targets.append((p, wid))
            st.prefill_worker, st.decode_worker = p.worker_id, d.worker_id
            timeout = st.remaining()
            dcall = d.stub.DecodeStream(pb.DecodeRequest(request_id=wid), timeout=timeout)
            preq = pb.PrefillRequest(
                request_id=wid, prompt_token_ids=st.prompt, sampling=st.sampling,
                kv_address=res.kv_address, dst_block_ids=res.block_ids, decode_worker_id=d.worker_id)
            n = len(st.prompt)
            p.inflight += 1
            p.inflight_prefill_tokens += n
            try:
                reply = await p.stub.Prefill(preq, timeout=timeout)
            except RpcError as e:
                f = self._failure(st, p, "prefill", e)
                cause = _transfer_cause(e)
                if cause and isinstance(f, WorkerFailure):
                    self.metrics.transfer_failure(cause)
                if isinstance(f, WorkerFailure) and dcall.done() and await dcall.code() != Code.OK:
                    f.worker_ids.append(d.worker_id)  # the decode side broke first
                raise f from None
            finally:
                p.inflight -= 1
                p.inflight_prefill_tokens -= n
            st.prefill_ms, st.transfer_ms = reply.timings.prefill_ms, reply.timings.transfer_ms
            st.kv_bytes = reply.kv_bytes
            st.emit([reply.first_token], reply.finished, reply.finish_reason)
            if reply.finished:
                return  # D finishes by itself too; the Abort below makes sure it frees
            try:
                async for chunk in dcall:
                    st.emit(list(chunk.token_ids), chunk.finished, chunk.finish_reason)
                    if chunk.finished:
                        done = True
                        st.transfer_ms = max(st.transfer_ms, chunk.timings.transfer_ms)
                        return
            except RpcError as e:
                raise self._failure(st, d, "decode", e) from None
            raise WorkerFailure([d], f"decode worker {d.worker_id} ended its stream unfinished")
        finally:
            d.inflight -= 1
            if not done:
                if dcall is not None:
                    dcall.cancel()
                self.abort_later(targets)

    async def _colocated(self, st: RequestState, wid: str, excluded: set[str]) -> None:
        ws = [w for w in self.registry.workers(pb.ROLE_BOTH) if w.worker_id not in excluded]
        if not ws:
            raise RequestError(Code.UNAVAILABLE, "no 'both' worker available")
        w = self.policy.order_both(ws, st.prompt)[0]
        w.routed += 1
        st.prefill_worker = st.decode_worker = w.worker_id
        req = pb.GenerateWorkerRequest(request_id=wid, prompt_token_ids=st.prompt,
                                       sampling=st.sampling)
        done = False
        w.inflight += 1
        call = w.stub.Generate(req, timeout=st.remaining())
        try:
            async for chunk in call:
                st.emit(list(chunk.token_ids), chunk.finished, chunk.finish_reason)
                if chunk.finished:
                    done = True
                    t = chunk.timings
                    st.prefill_ms, st.transfer_ms = t.prefill_ms, t.transfer_ms
                    return
        except RpcError as e:
            raise self._failure(st, w, "colocated", e) from None
        finally:
            w.inflight -= 1
            if not done:
                call.cancel()
                self.abort_later([(w, wid)])
        raise WorkerFailure([w], f"colocated worker {w.worker_id} ended its stream unfinished")

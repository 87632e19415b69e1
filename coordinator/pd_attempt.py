"""One disaggregated attempt: Prefill on P and Reserve on D at once, then D's KV tokens.

In order (docs/architecture.md, "Request life cycle"):
1. Pick P; send it the Prefill without a KV destination: P admits and runs the prompt now.
2. Meanwhile Reserve on the decode workers, best first, one round (Dispatcher.try_reserve).
3. Accepted by D: hand P the reservation (SetKvTarget, fire and forget: a destination P
   cannot use ends its Prefill with the same status, which step 4 reads), open
   D.DecodeStream.
   Refused by every D: cancel and Abort the Prefill (P must not hold KV blocks while the
   request queues), wait in the coordinator queue for a reservation under a new worker
   request id, then Prefill with the destination in it (the sequential path).
4. Token 0 goes to the client from P's first reply, once the reservation is in hand (how
   long it waited for it: `reserve_wait_ms`); then P's second reply (the KV landed), then
   D's stream.
Whenever the attempt ends without a clean finish, its calls are cancelled and every worker
it used gets Abort, so both ends free their blocks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pdserve.coordinator.registry import WorkerHandle
from pdserve.coordinator.request import (
    RequestError,
    RequestState,
    WorkerFailure,
    worker_request_id,
)
from pdserve.proto import pdserve_pb2 as pb

if TYPE_CHECKING:
    from pdserve.coordinator.flows import Dispatcher

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode
RpcError = grpc.aio.AioRpcError


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


class PdAttempt:
    def __init__(self, flows: Dispatcher, st: RequestState, wid: str, excluded: set[str]) -> None:
        self.flows, self.st, self.wid, self.excluded = flows, st, wid, excluded
        self.loop = asyncio.get_running_loop()
        self.n_prompt = len(st.prompt) + len(st.output)
        self.aborts: list[tuple[WorkerHandle, str]] = []  # Abort these unless finished
        self.calls: list = []  # gRPC calls to cancel unless finished
        self.tasks: list[asyncio.Task] = []
        self.prefilling: list[WorkerHandle] = []  # P whose in-flight counts this attempt holds
        self.decoding: WorkerHandle | None = None

    async def run(self) -> None:
        done = False
        try:
            done = await self._run()
        finally:
            for p in list(self.prefilling):
                self._prefill_over(p)
            if self.decoding is not None:
                self.decoding.inflight -= 1
                self.decoding.release(len(self.st.prompt) + len(self.st.output))
            for task in self.tasks:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # seen: the flow read the same failure elsewhere
            if not done:
                for call in self.calls:
                    call.cancel()
                self.flows.abort_later(self.aborts)

    async def _run(self) -> bool:
        flows, st = self.flows, self.st
        ds = flows.registry.routable(pb.ROLE_DECODE, self.excluded)
        if not ds:
            raise RequestError(Code.UNAVAILABLE, "no decode worker available")
        flows.check_fits(st, ds)
        p = self._pick_prefill()
        pcall, first = self._prefill(p, self.wid)  # no KV destination yet
        got = await flows.try_reserve(st, st.worker_request(pb.ReserveRequest, self.wid),
                                      self.excluded)
        if isinstance(got, list):  # every decode worker refused: queue, then run sequentially
            self._drop_prefill(p, pcall, first)
            self.wid = worker_request_id(self.wid, "-q")
            d, res = await flows.reserve(st, self.wid, self.excluded, refused=got)
            p = self._pick_prefill()
            pcall, first = self._prefill(p, self.wid, d, res)
        else:
            d, res = got
            target = pb.KvTarget(request_id=self.wid, kv_address=res.kv_address,
                                 dst_block_ids=res.block_ids, decode_worker_id=d.worker_id)
            self.tasks.append(self.loop.create_task(self._set_target(p, target)))
        reserved_at = self.loop.time()
        self.aborts.append((d, self.wid))
        d.inflight += 1
        self.decoding = d
        st.prefill_worker, st.decode_worker = p.worker_id, d.worker_id
        if not d.alive:  # dropped while we reserved: its channel is closed
            raise WorkerFailure([d], f"decode worker {d.worker_id} was dropped ({d.drop_reason})")
        dcall = d.stub.DecodeStream(pb.DecodeRequest(request_id=self.wid), timeout=st.remaining())
        self.calls.append(dcall)
        try:
            reply, read_at = await first
            st.reserve_wait_ms = max(0.0, reserved_at - read_at) * 1e3
            # token 0 goes to the client now, while the transfer may still run
            st.emit([reply.first_token], reply.finished, reply.finish_reason,
                    [reply.first_logprobs] if reply.HasField("first_logprobs") else [])
            if reply.finished:
                return False  # D finishes by itself too; the Abort makes sure it frees
            if not reply.kv_done:
                reply = await flows.prefill_reply(p, pcall)
        except RpcError as e:
            cause = _transfer_cause(e)
            if cause:
                flows.metrics.transfer_failure(cause)
            if dcall.done() and await dcall.code() != Code.OK:  # the decode side broke first
                flows.attr.charge(d, "decode stream failed during prefill")
                flows.metrics.worker_failure("decode", (await dcall.code()).name)
                raise WorkerFailure([d], f"decode worker {d.worker_id} failed during "
                                    f"prefill: {e.details()}") from None
            raise flows.failure(st, p, "prefill", e, peer=d) from None
        finally:
            self._prefill_over(p)
        st.prefill_ms, st.transfer_ms = reply.timings.prefill_ms, reply.timings.transfer_ms
        st.kv_bytes = reply.kv_bytes
        return await flows.stream(st, d, "decode", dcall)

    # -- pieces ----------------------------------------------------------------------------
    def _pick_prefill(self) -> WorkerHandle:
        flows = self.flows
        ps = flows.registry.routable(pb.ROLE_PREFILL, self.excluded)
        if not ps:
            raise RequestError(Code.UNAVAILABLE, "no prefill worker available")
        p = flows.policy.order_prefill(ps, self.st.attempt_prompt())[0]
        p.routed += 1
        return p

    def _prefill(self, p: WorkerHandle, wid: str, d: WorkerHandle | None = None,
                 res: pb.ReserveReply | None = None) -> tuple[object, asyncio.Task]:
        """Send the Prefill (with D's reservation when given); returns the call and a task
        reading its first reply (the reply and when it came)."""
        st = self.st
        fields = {} if res is None else dict(kv_address=res.kv_address, dst_block_ids=res.block_ids,
                                             decode_worker_id=d.worker_id)
        req = st.worker_request(pb.PrefillRequest, wid, **fields)
        self.aborts.append((p, wid))
        p.inflight += 1
        p.inflight_prefill_tokens += self.n_prompt
        self.prefilling.append(p)
        call = p.stub.Prefill(req, timeout=st.timeout(self.flows.cfg.prefill_timeout_s))
        self.calls.append(call)

        async def first_reply() -> tuple[pb.PrefillReply, float]:
            reply = await self.flows.prefill_reply(p, call)
            return reply, self.loop.time()
        task = self.loop.create_task(first_reply())
        self.tasks.append(task)
        return call, task

    def _prefill_over(self, p: WorkerHandle) -> None:
        if p in self.prefilling:
            self.prefilling.remove(p)
            p.inflight -= 1
            p.inflight_prefill_tokens -= self.n_prompt

    def _drop_prefill(self, p: WorkerHandle, call, first: asyncio.Task) -> None:
        """Give up a Prefill sent without a destination: P frees its blocks now."""
        call.cancel()
        first.cancel()
        self._prefill_over(p)
        self.flows.abort_later([(p, self.wid)])
        self.aborts.remove((p, self.wid))

    async def _set_target(self, p: WorkerHandle, target: pb.KvTarget) -> None:
        """Hand P the reservation. Its failure needs no handling here: P ends the Prefill
        with the same status, or the Prefill call fails with P, and the flow reads that."""
        try:
            await p.stub.SetKvTarget(target, timeout=self.st.timeout(self.flows.cfg.rpc_timeout_s))
        except (RpcError, grpc.aio.UsageError) as e:
            log.debug("request %s: SetKvTarget on %s failed: %s", self.st.rid, p.worker_id, e)

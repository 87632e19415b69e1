"""Retry, migration and fault attribution of one request (docs/architecture.md, "Failure
handling").

`run_attempts` runs a flow attempt after attempt on other worker pairs. An attempt that
fails with WorkerFailure is followed, after a backoff, by the next one: a retry when no
token was streamed, a migration otherwise. A migration prefills prompt + the tokens
already streamed as a continuation (`num_output_tokens`), so the worker keeps the output
indices (seeded sampling) and max_tokens, and the client's stream goes on with no gap or
repeat. `Attribution` decides whose failure an RPC error is and charges that worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from pdserve.coordinator.config import FailureConfig
from pdserve.coordinator.registry import Registry, WorkerHandle
from pdserve.coordinator.request import (
    RequestError,
    RequestState,
    WorkerFailure,
    worker_request_id,
)
from pdserve.proto.faults import FAULT_PEER, fault_of

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode
RpcError = grpc.aio.AioRpcError
T = TypeVar("T")
# Worker statuses that are the request's fault: passed to the client, never retried.
CLIENT_CODES = (Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION,
                Code.RESOURCE_EXHAUSTED)
Attempt = Callable[[RequestState, str, set[str]], Awaitable[None]]


async def run_attempts(st: RequestState, attempt: Attempt, cfg: FailureConfig,
                       on_retry: Callable[[bool], None] | None = None,
                       wait_changed: Callable[[float], Awaitable[None]] | None = None) -> None:
    """Run `attempt(st, worker_request_id, excluded)` until one ends the request.
    on_retry(migrating) is called before each later attempt. After a failure, when no
    worker of a role is left ("no ... available"), wait_changed(timeout_s) is awaited (up to
    cfg.rejoin_wait_s in all) for a restarted or resumed worker to register."""
    excluded: set[str] = set()
    last: WorkerFailure | None = None
    backoff = cfg.retry_backoff_s
    loop = asyncio.get_running_loop()
    waited = 0.0
    n = 0
    while n < cfg.max_attempts:
        if last is not None and st.attempts == n:  # a new attempt after a failure
            migrating = st.produced > 0
            log.warning("request %s: %s; %s on another worker pair (attempt %d of %d)", st.rid,
                        last.message, "migrating" if migrating else "retrying", n + 1,
                        cfg.max_attempts)
            if on_retry is not None:
                on_retry(migrating)
            st.migrations += migrating
            rem = st.remaining()
            await asyncio.sleep(backoff if rem is None else min(backoff, rem))
            backoff = min(backoff * 2, 1.0)
        st.attempts = n + 1
        try:
            await attempt(st, st.rid if n == 0 else worker_request_id(st.rid, f"-a{n}"), excluded)
            return
        except WorkerFailure as f:
            excluded.update(f.worker_ids)
            last = f
            n += 1
            if st.produced >= st.sampling.max_tokens:  # every token is out; only "finished" was lost
                st.emit([], True, "length")
                return
            if st.remaining() == 0.0:
                raise RequestError(Code.DEADLINE_EXCEEDED,
                                   f"deadline exceeded after a failure: {f.message}") from None
        except RequestError as e:
            if last is None or e.code != Code.UNAVAILABLE:
                raise
            rem = st.remaining()
            budget = cfg.rejoin_wait_s - waited if rem is None else min(cfg.rejoin_wait_s - waited, rem)
            if wait_changed is None or "available" not in e.message or budget <= 0:
                raise RequestError(Code.UNAVAILABLE, f"{_first(last, st)}; not retried: "
                                   f"{e.message}") from None
            t0 = loop.time()
            await wait_changed(min(budget, 0.25))
            waited += loop.time() - t0
            excluded.clear()  # a worker that failed may be back (resumed, re-registered)
    assert last is not None
    raise RequestError(Code.UNAVAILABLE, f"{_first(last, st)}; gave up after "
                       f"{cfg.max_attempts} attempts")


def _first(f: WorkerFailure, st: RequestState) -> str:
    return f"{f.message} after {st.produced} tokens were streamed" if st.produced else f.message


class Attribution:
    """Whose failure an RPC error is: the request's (passed on), or a worker's (charged)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def guarded(self, w: WorkerHandle, role: str, aw: Awaitable[T]) -> T:
        """Await a worker call; a cancel that is not this task's own (the worker's channel
        was closed because it was dropped, or a stall watch gave up) becomes a
        WorkerFailure charged to the worker."""
        try:
            return await aw
        except asyncio.CancelledError:
            self.cancelled(w, role)

    def cancelled(self, w: WorkerHandle, role: str) -> None:
        """Called in `except CancelledError` around a worker call (as `guarded` does):
        re-raises this task's own cancel, else raises the worker's WorkerFailure."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        why = f"was dropped ({w.drop_reason})" if not w.alive else "stopped answering"
        msg = f"{role} worker {w.worker_id} {why}"
        self.charge(w, msg)
        raise WorkerFailure([w], msg) from None

    def charge(self, w: WorkerHandle, reason: str) -> None:
        self.registry.health.charge(w.worker_id, reason)

    def suspect(self, w: WorkerHandle) -> bool:
        return not w.alive or self.registry.health.is_suspect(w.worker_id, w.last_seen)

    def failure(self, st: RequestState, w: WorkerHandle, role: str, e: RpcError,
                peer: WorkerHandle | None = None) -> RequestError | WorkerFailure:
        """`peer`: the other worker of the pair, when `w` depends on it for this call."""
        code, detail = e.code(), e.details()
        rem = st.remaining()
        if code == Code.DEADLINE_EXCEEDED and rem is not None and rem < 0.1:
            return RequestError(Code.DEADLINE_EXCEEDED,
                                f"deadline exceeded waiting for {role} worker {w.worker_id}")
        if code in CLIENT_CODES:
            return RequestError(code, f"{role} worker {w.worker_id}: {detail}")
        msg = f"{role} worker {w.worker_id} failed: {code.name}: {detail}"
        if peer is not None and (fault_of(e.trailing_metadata()) == FAULT_PEER
                                 or (code == Code.ABORTED and not self.suspect(w))):
            # The peer failed (named by w), or the transfer between them did: charge the
            # peer when it is known to be failing, and move on from it either way.
            if fault_of(e.trailing_metadata()) == FAULT_PEER or self.suspect(peer):
                self.charge(peer, msg)
            return WorkerFailure([peer], msg)
        if code == Code.UNAVAILABLE:
            self.registry.drop_handle(w, f"{role} RPC failed: {detail}")
        elif code == Code.DEADLINE_EXCEEDED:
            self.registry.health.suspect(w.worker_id, self.registry.worker_timeout_s, msg)
        self.charge(w, msg)
        return WorkerFailure([w], msg)

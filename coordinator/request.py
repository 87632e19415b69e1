"""Per-request state at the coordinator and the two error kinds of the orchestration."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from pdserve.coordinator.registry import WorkerHandle
from pdserve.coordinator.tokens import IncrementalDetokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import MAX_REQUEST_ID_CHARS


class RequestError(Exception):
    """Ends the request with this gRPC status and message (what the client sees)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class WorkerFailure(Exception):
    """A worker failed this request: the request is retried (no token streamed yet) or
    migrated (tokens streamed) on another pair, `workers` excluded."""

    def __init__(self, workers: list[WorkerHandle], message: str) -> None:
        super().__init__(message)
        self.worker_ids = [w.worker_id for w in workers]
        self.message = message


WorkerRequest = TypeVar("WorkerRequest", pb.ReserveRequest, pb.PrefillRequest,
                        pb.GenerateWorkerRequest)

# What the producer (flows) hands the consumer (the client stream): token ids, finished,
# finish_reason, their logprobs (one per id when asked, else empty); or a RequestError that
# ends the stream.
Item = tuple[list[int], bool, str, list[pb.TokenLogprobs]] | RequestError


class Outbox:
    """The producer -> consumer queue of one request (Items, in order): what asyncio.Queue
    does here at less cost per token (no task accounting, a future only while the consumer
    waits), and `take()` hands over everything queued at once."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Item) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list[Item]:
        """Every queued item, oldest first; waits while there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items

    def empty(self) -> bool:
        return not self._items


@dataclass(eq=False, slots=True)
class RequestState:
    rid: str
    prompt: list[int]
    sampling: pb.SamplingParams  # validated, max_tokens set and clamped to the model length
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    detok: IncrementalDetokenizer | None = None
    t0: float = field(default_factory=time.monotonic)
    t0_unix: float = field(default_factory=time.time)  # the same instant, wall clock
    out: Outbox = field(default_factory=Outbox)
    producer: asyncio.Task | None = None
    aborted: bool = False  # by Coordinator.Abort
    finished_early: str = ""  # finish reason when the consumer ended the stream on purpose
    produced: int = 0  # tokens handed to the consumer (they will reach the client)
    output: list[int] = field(default_factory=list)  # those tokens (a migration re-prefills them)
    attempts: int = 0  # attempts on a worker pair so far
    migrations: int = 0  # attempts that continued a stream after tokens were streamed
    produced_final: bool = False
    sent: int = 0  # tokens sent to the client
    t_first: float = 0.0
    t_last: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    kv_bytes: int = 0
    reserve_wait_ms: float = 0.0  # token 0 waited this long for the decode reservation
    prefill_worker: str = ""
    decode_worker: str = ""
    # The prompt as a protobuf repeated field: the client's own when it sent token ids
    # (else built on first use), and this attempt's (the prompt + the tokens streamed so
    # far) with the output count it was built for. See wire_prompt().
    prompt_wire: pb.TokenIds | None = None
    _attempt_wire: tuple[int, pb.TokenIds] | None = None

    def attempt_prompt(self) -> list[int]:
        """This attempt's prompt: the prompt + the tokens already streamed (a migration's
        continuation), whose last len(self.output) tokens are outputs."""
        return self.prompt + self.output if self.output else self.prompt

    def wire_prompt(self) -> pb.TokenIds:
        """This attempt's prompt as a protobuf repeated field, built once per continuation.
        Worker requests copy it with `MergeFrom` (a memcpy): building a repeated field from
        a Python list costs about 1 ms per 32k tokens, and a P/D request needs two."""
        n = len(self.output)
        if self._attempt_wire is None or self._attempt_wire[0] != n:
            if self.prompt_wire is None:
                self.prompt_wire = pb.TokenIds(ids=self.prompt)
            wire = self.prompt_wire
            if n:
                wire = pb.TokenIds()
                wire.ids.MergeFrom(self.prompt_wire.ids)
                wire.ids.extend(self.output)
            self._attempt_wire = (n, wire)
        return self._attempt_wire[1]

    def worker_request(self, cls: type[WorkerRequest], wid: str, **fields) -> WorkerRequest:
        """A Reserve, Prefill or Generate request of this attempt's prompt for a worker."""
        req = cls(request_id=wid, sampling=self.sampling, num_output_tokens=len(self.output),
                  **fields)
        req.prompt_token_ids.MergeFrom(self.wire_prompt().ids)
        return req

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def timeout(self, cap_s: float) -> float:
        """A worker call's timeout: the client's remaining time, at most cap_s."""
        rem = self.remaining()
        return cap_s if rem is None else min(rem, cap_s)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def emit(self, ids: list[int], finished: bool = False, reason: str = "",
             logprobs: Sequence[pb.TokenLogprobs] = ()) -> None:
        self.produced += len(ids)
        self.output += ids
        self.produced_final = finished
        self.out.put_nowait((ids, finished, reason, list(logprobs) if logprobs else []))

    def metrics(self) -> pb.RequestMetrics:
        tpot = (self.t_last - self.t_first) * 1e3 / (self.sent - 1) if self.sent > 1 else 0.0
        return pb.RequestMetrics(
            ttft_ms=(self.t_first - self.t0) * 1e3 if self.sent else 0.0, tpot_ms=tpot,
            queue_ms=self.queue_ms, prefill_ms=self.prefill_ms, transfer_ms=self.transfer_ms,
            kv_bytes=self.kv_bytes, prefill_worker=self.prefill_worker,
            decode_worker=self.decode_worker, prompt_tokens=len(self.prompt),
            completion_tokens=self.sent, reserve_wait_ms=self.reserve_wait_ms,
            received_unix_s=self.t0_unix)


def worker_request_id(base: str, suffix: str) -> str:
    """`base + suffix` as a worker request id, which may hold MAX_REQUEST_ID_CHARS: a base too
    long for the suffix keeps its head and a hash of the whole (ids stay distinct)."""
    rid = base + suffix
    if len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    digest = hashlib.blake2b(base.encode(), digest_size=8).hexdigest()
    return f"{base[:MAX_REQUEST_ID_CHARS - len(suffix) - 17]}~{digest}{suffix}"

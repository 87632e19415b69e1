"""Per-request state shared by a worker's gRPC handlers (asyncio thread) and its engine thread.

The engine thread never touches asyncio objects directly: it batches what happened in one
step and hands it to the server loop with one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


class RequestAborted(Exception):
    """A request ended early; carries the gRPC status its RPC should end with (code, message,
    and trailing metadata such as proto.faults.PEER)."""

    def __init__(self, code: Any, message: str, trailing_metadata: tuple = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing_metadata = code, message, trailing_metadata


@dataclass
class StreamEnd:
    reason: str  # "length" | "stop" | "abort"
    error: tuple[Any, str] | None = None  # (grpc.StatusCode, message) when it failed


@dataclass(slots=True)
class Sampled:
    """A streamed token with its logprobs (requests that asked for them; others queue ints)."""

    token: int
    logprobs: Any  # engine.sampler.TokenLogprobs


@dataclass
class ReqState:
    """One request on this worker (its role decides what the fields mean for it)."""

    req_id: str
    prompt_len: int
    arrival_s: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # ints or Sampled, a final StreamEnd
    done: asyncio.Future | None = None  # prefill: resolved once the KV transfer completed
    first: asyncio.Future | None = None  # prefill: resolved once token 0 is sampled
    # prefill side
    kv_push: Any = None  # prefill.kv_push.KvPush: the KV destination and the push to it
    first_token: int | None = None
    first_logprobs: Any = None  # engine.sampler.TokenLogprobs of first_token, when asked
    first_finishes: bool = False
    finish_reason: str = ""
    kv_bytes: int = 0
    # timings (monotonic seconds)
    scheduled_s: float | None = None
    computed_s: float | None = None
    kv_done_s: float | None = None
    ended: bool = False


class StateTable:
    """req_id -> ReqState, plus the hand-over from the engine thread to the server loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.states: dict[str, ReqState] = {}

    def get(self, req_id: str) -> ReqState | None:
        return self.states.get(req_id)

    def add(self, st: ReqState) -> ReqState:
        if st.req_id in self.states:
            raise ValueError(f"request id {st.req_id!r} is already in use on this worker")
        self.states[st.req_id] = st
        return st

    def pop(self, req_id: str) -> ReqState | None:
        return self.states.pop(req_id, None)

    def discard(self, st: ReqState) -> None:
        """Remove st if it is still the entry of its id (not a later request's)."""
        if self.states.get(st.req_id) is st:
            del self.states[st.req_id]

    def deliver(self, items: list[tuple[ReqState, Any]]) -> None:
        """From any thread: put (state, token-or-StreamEnd) items into their queues."""
        if items:
            self.loop.call_soon_threadsafe(self._put_all, items)

    @staticmethod
    def _put_all(items: list[tuple[ReqState, Any]]) -> None:
        for st, item in items:
            if not st.ended:
                st.queue.put_nowait(item)
                if isinstance(item, StreamEnd):
                    st.ended = True

    def resolve(self, st: ReqState, result: Any = None, error: BaseException | None = None) -> None:
        """From any thread: settle a prefill request's `done` future; an error settles its
        `first` future too (whichever the handler awaits sees it)."""
        def _settle() -> None:
            futs = (st.first, st.done) if error is not None else (st.done,)
            for fut in futs:
                if fut is None or fut.done():
                    continue
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
        self.loop.call_soon_threadsafe(_settle)

    def resolve_first(self, st: ReqState) -> None:
        """From any thread: token 0 of a prefill request is sampled (st.first_token)."""
        def _settle() -> None:
            if st.first is not None and not st.first.done():
                st.first.set_result(True)
        self.loop.call_soon_threadsafe(_settle)

"""What every role shares: the engine and its thread, the request table, the one admission
path, token streaming, abort and load. No gRPC server here (worker/server.py) and no role
(the roles call in; the core calls the role only through the Role hooks).

Threads: the asyncio loop runs admission, streaming and abort; the engine thread runs
`_before_run` / `_on_result` around each step and every `on_engine` callable; results
cross back through `StateTable.deliver` / `resolve` (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine, StepResult
from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import Sequence
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import MAX_REQUEST_ID_CHARS, sampling_fields
from pdserve.worker.config import WorkerConfig
from pdserve.worker.role import LayerHook, Role
from pdserve.worker.state import ReqState, RequestAborted, Sampled, StateTable, StreamEnd

log = logging.getLogger("pdserve.worker")


class WorkerCore:
    def __init__(self, cfg: WorkerConfig, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 engine_loop_cls: type[EngineLoop] = EngineLoop) -> None:
        """engine_loop_cls: anything with EngineLoop's constructor, start/stop and call
        (tests pass one that steps on demand)."""
        self.cfg = cfg
        self.engine = engine
        self.table = StateTable(loop)
        self._loop = loop
        self.failure: str | None = None  # why this worker can no longer serve (see fail())
        self._failure_listeners: list[Callable[[str], Any]] = []
        self.role: Role | None = None  # set by attach()
        self.engine_loop = engine_loop_cls(engine, on_result=self._on_result,
                                           before_run=self._before_run)

    def attach(self, role: Role) -> None:
        self.role = role

    def start(self) -> None:
        self.engine_loop.start()

    def stop(self) -> None:
        if self.role is not None:
            self.role.close()
        self.engine_loop.stop()

    def add_failure_listener(self, cb: Callable[[str], Any]) -> None:
        """cb(why) runs on the asyncio loop once fail() was called (a coroutine function
        is run as a task)."""
        self._failure_listeners.append(cb)

    def fail(self, why: str) -> None:
        """Any thread: a part this worker cannot serve without has died (the KV transfer
        endpoint's progress thread). The first call wins; the listeners take the worker out
        of service (NOT_SERVING, deregistered)."""
        if self.failure is not None:
            return
        self.failure = why
        log.error("worker can no longer serve: %s", why)

        def run(cb: Callable[[str], Any]) -> None:
            res = cb(why)
            if asyncio.iscoroutine(res):
                self._loop.create_task(res)
        for cb in self._failure_listeners:
            self._loop.call_soon_threadsafe(run, cb)

    async def on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine thread, between two steps, and return its result."""
        return await asyncio.wrap_future(self.engine_loop.call(fn))

    # -- the one admission path: new_sequence, then admit ------------------------------------
    async def new_sequence(self, context, request_id: str, prompt: Iterable[int],
                           sampling: pb.SamplingParams, prefill_only: bool = False,
                           check: Callable[[Sequence], str | None] | None = None,
                           output_offset: int = 0) -> Sequence:
        """Validate a request into a Sequence, or end the RPC with INVALID_ARGUMENT.
        `prompt`: the request's repeated field as it is (the engine reads it through numpy,
        one copy; `list()` of a 32k-token field alone costs about 1 ms). `check(seq)` may
        name a role's own reason to refuse; `output_offset`: the request's
        `num_output_tokens` (a migrated continuation, see Sequence)."""
        try:
            if len(request_id) > MAX_REQUEST_ID_CHARS:  # the KV control channel refuses it
                raise ValueError(f"request_id has {len(request_id)} characters; at most "
                                 f"{MAX_REQUEST_ID_CHARS}")
            params = SamplingParams(**sampling_fields(sampling))
            seq = self.engine.make_sequence(prompt, params, seq_id=request_id,
                                            prefill_only=prefill_only,
                                            output_offset=output_offset)
            problem = check(seq) if check is not None else None
        except ValueError as exc:
            problem = str(exc)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return seq

    async def admit(self, context, seq: Sequence, place: Callable[[Sequence], Any] | None = None,
                    **state: Any) -> tuple[ReqState, Any]:
        """Enter seq in the table (fields of its ReqState in `state`) and place it on the
        engine: `place(seq)` runs on the engine thread (default: the scheduler's `add`) and
        its result is returned. A refusal ends the RPC with a status and leaves nothing
        behind."""
        try:
            st = self.table.add(ReqState(seq.seq_id, seq.num_prompt_tokens, **state))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        place = place or self.engine.scheduler.add
        try:
            placed = await self.on_engine(lambda: place(seq))
        except ValueError as exc:
            self.table.pop(st.req_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BaseException:  # cancelled while placing: undo whatever got placed
            self.table.pop(st.req_id)
            self.engine_loop.call(lambda: self.engine.abort(seq.seq_id))
            raise
        return st, placed

    # -- abort and streaming ----------------------------------------------------------------
    async def abort_request(self, req_id: str, code=grpc.StatusCode.CANCELLED,
                            message: str = "aborted", trailing_metadata: tuple = ()) -> bool:
        """Free everything of req_id (engine blocks, transfers; blocks a transfer may still
        write once it is safe, see `Role.engine_abort`) and end its RPCs (with this status;
        `trailing_metadata` goes with it, e.g. proto.faults.PEER)."""
        st = self.table.get(req_id)
        if st is not None:  # first: the failed result an abort causes must not end it
            self.table.deliver([(st, StreamEnd("abort", (code, message)))])
        if self.role is not None:
            self.role.abort(req_id)
        role = self.role
        found = await self.on_engine(lambda: role.engine_abort(req_id) if role is not None
                                     else self.engine.abort(req_id))
        if st is not None:
            self.table.resolve(st, error=RequestAborted(code, message, trailing_metadata))
            self.table.discard(st)
        return bool(found or st is not None)

    async def stream_tokens(self, st: ReqState, context) -> AsyncIterator[pb.TokenChunk]:
        """TokenChunks from st.queue: every token queued when a message goes out, at least
        `stream_interval` of them after the stream's first message (the end goes at once);
        aborts on cancel."""
        ok = False
        every = self.cfg.stream_interval
        items: list = []
        first = True
        try:
            while True:
                items.append(await st.queue.get())
                while not st.queue.empty():
                    items.append(st.queue.get_nowait())
                if every > 1 and not first and sum(
                        isinstance(t, (int, Sampled)) for t in items) < every and not any(
                        isinstance(t, StreamEnd) for t in items):
                    continue  # fewer than stream_interval tokens and no end: wait for more
                first = False
                items, queued = [], items
                toks = [t if isinstance(t, int) else t.token for t in queued
                        if isinstance(t, (int, Sampled))]
                lps = [logprobs_proto(t.logprobs) for t in queued if isinstance(t, Sampled)]
                end = next((t for t in queued if isinstance(t, StreamEnd)), None)
                if end is not None and end.error is not None:
                    if toks:
                        yield pb.TokenChunk(token_ids=toks, logprobs=lps)
                    ok = True  # the request is already gone
                    await context.abort(*end.error)
                if end is None:
                    yield pb.TokenChunk(token_ids=toks, logprobs=lps)
                    continue
                yield pb.TokenChunk(token_ids=toks, finished=True, finish_reason=end.reason,
                                    timings=timings(st), logprobs=lps)
                ok = True
                return
        finally:
            if not ok:  # caller went away: free the request's blocks
                await self.abort_request(st.req_id)
            self.table.discard(st)

    # -- load -------------------------------------------------------------------------------
    def load(self) -> pb.WorkerLoad:
        """Engine thread only (through on_engine)."""
        s = self.engine.kv_stats()
        queued = 0
        if self.role is not None and self.role.queues_prefill:
            queued = sum(st.prompt_len for st in list(self.table.states.values())
                         if st.computed_s is None)
        bm = self.engine.scheduler.block_manager
        return pb.WorkerLoad(free_blocks=s["free_blocks"], total_blocks=s["total_blocks"],
                             running=s["running"], waiting=s["waiting"],
                             queued_prefill_tokens=queued,
                             prefix_cache_queries=bm.num_queried_tokens,
                             prefix_cache_hits=bm.num_hit_tokens)

    # -- engine thread hooks ----------------------------------------------------------------
    def _before_run(self, out: SchedulerOutput) -> LayerHook | None:
        now = time.monotonic()
        for c in out.chunks:
            st = self.table.get(c.seq_id)
            if st is not None and st.scheduled_s is None:
                st.scheduled_s = now
        return self.role.before_run(out) if self.role is not None else None

    def _on_result(self, out: SchedulerOutput, res: StepResult) -> None:
        items: list[tuple[ReqState, object]] = []
        now = time.monotonic()
        for sid, tok in res.new_tokens.items():
            st = self.table.get(sid)
            lp = res.logprobs.get(sid)
            if st is not None and st.computed_s is None:
                st.computed_s = now  # token 0 of a local prefill: its prefill_ms ends here
            if st is not None and not (self.role is not None and self.role.on_token(st, tok, lp)):
                items.append((st, tok if lp is None else Sampled(tok, lp)))
        for seq in res.finished:
            st = self.table.get(seq.seq_id)
            if st is not None and not seq.prefill_only:
                items.append((st, StreamEnd(seq.finish_reason or "abort")))
        self.table.deliver(items)


def logprobs_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(logprob=lp.logprob, top_ids=lp.top_ids, top_logprobs=lp.top_logprobs)


def timings(st: ReqState) -> pb.Timings:
    """Where a request's time went on this worker (milliseconds)."""
    t = pb.Timings()
    if st.scheduled_s is not None:
        t.queue_ms = (st.scheduled_s - st.arrival_s) * 1e3
    if st.computed_s is not None and st.scheduled_s is not None:
        t.prefill_ms = (st.computed_s - st.scheduled_s) * 1e3
    if st.kv_done_s is not None and st.computed_s is not None:
        t.transfer_ms = (st.kv_done_s - st.computed_s) * 1e3
    return t

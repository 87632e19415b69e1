"""The prefill role: run the prompt, push its KV layer by layer into the blocks the decode
worker reserved; reply with the first token as soon as it is sampled, and again once every
layer is sent.

Life of one request here: `prefill()` (asyncio loop) admits the prompt as a prefill-only
sequence at once; its KV destination (the decode worker's reservation) comes with it, or
later in `set_kv_target()` (the coordinator reserves on the decode worker while the prompt
already runs). In the step that completes the prompt, `before_run()` (engine thread) begins
the request's `KvPush` and returns a layer hook that marks each layer ready as soon as the
model has written it; `on_token()` takes the first token, closes the push with it and
releases the first reply. The push starts the transfer once it has both the blocks and the
destination, replaying what happened before (prefill/kv_push.py). `_on_sent()` (transfer
thread) frees the blocks and releases the final reply. A destination that never comes ends
the request after the transfer timeout. Batching is in prefill/batching.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from pdserve.engine.config import EngineConfig
from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import FINISH_REASONS
from pdserve.kvtransfer.link import SenderLink
from pdserve.prefill.batching import completes_prompt, prefill_engine_config, prompt_blocks
from pdserve.prefill.kv_push import EngineStream, KvPush, KvTarget
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.faults import PEER
from pdserve.worker.core import WorkerCore, logprobs_proto, timings
from pdserve.worker.role import LayerHook, Role, register_role
from pdserve.worker.state import ReqState, RequestAborted


@register_role("prefill")
class PrefillRole(Role):
    transfer_backend = True
    queues_prefill = True
    # How long a SetKvTarget waits for the Prefill of its request id: the two calls share a
    # connection, but the Prefill's prompt-sized message may be handled second.
    arrival_wait_s = 5.0
    ended_ids_kept = 4096  # recently ended request ids (a late SetKvTarget: FAILED_PRECONDITION)

    def __init__(self, core: WorkerCore, sender: SenderLink | None = None) -> None:
        super().__init__(core)
        eng = core.engine
        self.sender = sender or SenderLink(core.cfg.transfer, eng.kv_caches, core.cfg.host,
                                           core.cfg.advertised_host, on_fatal=core.fail)
        self.layerwise = core.cfg.transfer.layerwise
        self.stream = EngineStream(eng.cfg.device)
        self._arrivals: dict[str, asyncio.Future] = {}  # SetKvTarget calls awaiting a Prefill
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def engine_config(cls, cfg: EngineConfig) -> EngineConfig:
        return prefill_engine_config(cfg)

    def close(self) -> None:
        self.sender.close()

    def abort(self, req_id: str) -> None:
        st = self.core.table.get(req_id)
        if st is not None and st.kv_push is not None:
            st.kv_push.close()
        self.sender.abort(req_id)

    # -- Worker.Prefill ---------------------------------------------------------------------
    async def prefill(self, request: pb.PrefillRequest, context) -> AsyncIterator[pb.PrefillReply]:
        """Two replies: token 0 as soon as it is sampled, then the transfer's completion."""
        try:
            async for reply in self._prefill(request, context):
                yield reply
        finally:
            self._ended_now(request.request_id)

    async def _prefill(self, request: pb.PrefillRequest, context) -> AsyncIterator[pb.PrefillReply]:
        core, rid = self.core, request.request_id
        target = None
        if request.kv_address:
            target = KvTarget(bytes(request.kv_address), list(request.dst_block_ids),
                              request.decode_worker_id)
        elif request.dst_block_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "dst_block_ids without kv_address")
        check = None if target is None else \
            (lambda seq: self._blocks_problem(seq.num_prompt_tokens, target.dst_block_ids))
        seq = await core.new_sequence(context, rid, request.prompt_token_ids, request.sampling,
                                      prefill_only=True, check=check,
                                      output_offset=request.num_output_tokens)
        if target is not None and not self.sender.connected(target.address):
            try:  # a handshake blocks: off the loop (an open pair costs nothing here)
                await asyncio.to_thread(self.sender.connect, target.address)
            except Exception as exc:
                # fault "peer": this worker is fine, the decode worker is not (the
                # coordinator must not drop this worker for it).
                await context.abort(grpc.StatusCode.UNAVAILABLE, _unreachable(exc),
                                    trailing_metadata=PEER)
        timeout_s = core.cfg.transfer.timeout_s
        push = KvPush(self.sender, self.stream, rid, timeout_s, self._on_sent, target)
        loop = asyncio.get_running_loop()
        st, _ = await core.admit(context, seq, kv_push=push, done=loop.create_future(),
                                 first=loop.create_future())
        self._arrived(rid)
        expiry = None if target is not None else \
            loop.call_later(timeout_s, self._target_expired, st, timeout_s)
        try:
            await st.first
            yield self._reply(st, kv_done=False)
            await st.done
        except RequestAborted as exc:
            core.table.discard(st)
            _retrieve(st.done)
            await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata)
        except asyncio.CancelledError:
            _retrieve(st.done)
            await core.abort_request(st.req_id)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        core.table.discard(st)
        yield self._reply(st, kv_done=True)

    def _blocks_problem(self, prompt_len: int, dst_block_ids: list[int]) -> str | None:
        need = -(-prompt_len // self.core.engine.block_size)
        n = len(dst_block_ids)
        return None if n == need else f"dst_block_ids has {n} blocks; the prompt needs {need}"

    @staticmethod
    def _reply(st: ReqState, kv_done: bool) -> pb.PrefillReply:
        reply = pb.PrefillReply(first_token=st.first_token, kv_bytes=st.kv_bytes,
                                timings=timings(st), finished=st.first_finishes,
                                finish_reason=st.finish_reason, kv_done=kv_done)
        if st.first_logprobs is not None:
            reply.first_logprobs.CopyFrom(logprobs_proto(st.first_logprobs))
        return reply

    # -- Worker.SetKvTarget -----------------------------------------------------------------
    async def set_kv_target(self, request: pb.KvTarget, context) -> pb.KvTargetReply:
        """The destination of a Prefill sent without one. A destination this worker cannot
        use ends that Prefill too, with the same status."""
        core, rid = self.core, request.request_id
        st = await self._prefill_state(rid, context)
        if st is None:
            if rid in self._ended:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"request {rid!r} has ended on this worker")
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no Prefill of request {rid!r} on this worker")
        if st.kv_push.target is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"request {rid!r} already has a KV target")
        target = KvTarget(bytes(request.kv_address), list(request.dst_block_ids),
                          request.decode_worker_id)
        problem = "no kv_address" if not target.address else \
            self._blocks_problem(st.prompt_len, target.dst_block_ids)
        status: tuple = ()
        if problem:
            status = (grpc.StatusCode.INVALID_ARGUMENT, problem, ())
        elif not self.sender.connected(target.address):
            try:
                await asyncio.to_thread(self.sender.connect, target.address)
            except Exception as exc:
                status = (grpc.StatusCode.UNAVAILABLE, _unreachable(exc), PEER)
        if status:
            if core.table.get(rid) is st:  # its Prefill ends the same way
                await core.abort_request(rid, *status)
            await context.abort(*status)
        why = st.kv_push.set_target(target)
        if why is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"request {rid!r} {why}")
        return pb.KvTargetReply()

    async def _prefill_state(self, req_id: str, context) -> ReqState | None:
        """The request's state, once its Prefill is admitted (waits a bounded time for it)."""
        st = self.core.table.get(req_id)
        if st is not None or req_id in self._ended:
            return st
        remaining = getattr(context, "time_remaining", lambda: None)()
        wait_s = self.arrival_wait_s if remaining is None else min(self.arrival_wait_s,
                                                                   remaining)
        fut = self._arrivals.setdefault(req_id, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(wait_s, 0.0))
        except asyncio.TimeoutError:
            pass
        finally:
            if self._arrivals.get(req_id) is fut:
                del self._arrivals[req_id]
        return self.core.table.get(req_id)

    def _arrived(self, req_id: str) -> None:
        fut = self._arrivals.pop(req_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _ended_now(self, req_id: str) -> None:
        self._ended[req_id] = None
        while len(self._ended) > self.ended_ids_kept:
            self._ended.popitem(last=False)
        self._arrived(req_id)

    def _target_expired(self, st: ReqState, timeout_s: float) -> None:
        """No destination came within the transfer timeout: end the request (frees it)."""
        if st.kv_push.target is not None or self.core.table.get(st.req_id) is not st:
            return
        task = asyncio.get_running_loop().create_task(self.core.abort_request(
            st.req_id, grpc.StatusCode.ABORTED,
            f"KV transfer failed: no KV target (SetKvTarget) came within {timeout_s:g} s"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- engine thread ----------------------------------------------------------------------
    def before_run(self, out: SchedulerOutput) -> LayerHook | None:
        """Begin the push of every prompt that completes in this step; mark each layer."""
        core, starting = self.core, []
        per_layer = self.layerwise and \
            out.num_batched_tokens >= core.cfg.transfer.layerwise_min_tokens
        for c in out.chunks:
            st = core.table.get(c.seq_id)
            if st is None or not completes_prompt(c):
                continue
            st.kv_push.begin(prompt_blocks(c, st.prompt_len, core.engine.block_size))
            starting.append(st.kv_push)
        if not starting or not per_layer:
            return None

        def hook(layer: int) -> None:
            for push in starting:
                push.layer_done(layer)
        return hook

    def on_token(self, st: ReqState, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Token 0: decide whether it ends the request, and close the push with it. Its
        logprobs go back in the PrefillReply, with the token (the coordinator emits both)."""
        eng = self.core.engine
        st.computed_s = time.monotonic()
        st.first_token = token
        st.first_logprobs = logprobs
        seq = eng.scheduler.get(st.req_id)
        if seq is not None:
            status = eng.scheduler.stop_status(seq, token)
            st.first_finishes = status is not None
            st.finish_reason = FINISH_REASONS[status] if status is not None else ""
        self.core.table.resolve_first(st)  # the first reply leaves while the KV moves
        st.kv_push.finish({"first_token": int(token)})  # marks every layer ready
        return True

    # -- transfer thread --------------------------------------------------------------------
    def _on_sent(self, req_id: str, err: str | None, nbytes: int) -> None:
        """All layers and the final message are out, or the transfer failed."""
        core, eng = self.core, self.core.engine
        core.engine_loop.call(lambda: eng.abort(req_id) if err else
                              eng.scheduler.release(req_id))
        st = core.table.get(req_id)
        if st is None:  # aborted meanwhile: nothing waits for it
            return
        st.kv_done_s = time.monotonic()
        if err is not None:
            core.table.resolve(st, error=RequestAborted(grpc.StatusCode.ABORTED,
                                                        f"KV transfer failed: {err}"))
        else:
            st.kv_bytes = nbytes
            core.table.resolve(st, result=True)


def _unreachable(exc: Exception) -> str:
    return f"cannot reach the decode worker's KV endpoint: {exc}"


def _retrieve(fut: asyncio.Future | None) -> None:
    """Mark a future's exception as seen (no 'never retrieved' warning when unawaited)."""
    if fut is not None and fut.done() and not fut.cancelled():
        fut.exception()

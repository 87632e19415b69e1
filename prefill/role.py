"""The prefill role: run the prompt, push its KV layer by layer into the blocks the decode
worker reserved; reply with the first token as soon as it is sampled, and again once every
layer is sent.

Life of one request here: `prefill()` (asyncio loop) connects to the decode worker's KV
endpoint and admits the prompt as a prefill-only sequence; in the step that completes it,
`before_run()` (engine thread) starts the transfer and returns a layer hook that marks each
layer ready as soon as the model has written it; `on_token()` takes the first token and
closes the transfer with it, and releases the first reply; `_on_sent()` (transfer thread)
frees the blocks and releases the final reply. Batching is in prefill/batching.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from pdserve.engine.config import EngineConfig
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import FINISH_REASONS
from pdserve.kvtransfer.link import SenderLink
from pdserve.prefill.batching import completes_prompt, prefill_engine_config, prompt_blocks
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.faults import PEER
from pdserve.worker.core import WorkerCore, timings
from pdserve.worker.role import LayerHook, Role, register_role
from pdserve.worker.state import ReqState, RequestAborted


@register_role("prefill")
class PrefillRole(Role):
    transfer_backend = True
    queues_prefill = True

    def __init__(self, core: WorkerCore, sender: SenderLink | None = None) -> None:
        super().__init__(core)
        eng = core.engine
        self.sender = sender or SenderLink(core.cfg.transfer, eng.kv_caches, core.cfg.host,
                                           core.cfg.advertised_host, on_fatal=core.fail)
        self.layerwise = core.cfg.transfer.layerwise

    @classmethod
    def engine_config(cls, cfg: EngineConfig) -> EngineConfig:
        return prefill_engine_config(cfg)

    def close(self) -> None:
        self.sender.close()

    def abort(self, req_id: str) -> None:
        self.sender.abort(req_id)

    # -- Worker.Prefill ---------------------------------------------------------------------
    async def prefill(self, request: pb.PrefillRequest, context) -> AsyncIterator[pb.PrefillReply]:
        """Two replies: token 0 as soon as it is sampled, then the transfer's completion."""
        core, bs = self.core, self.core.engine.block_size
        n_dst = len(request.dst_block_ids)

        def check(seq) -> str | None:
            need = -(-seq.num_prompt_tokens // bs)
            return None if n_dst == need else \
                f"dst_block_ids has {n_dst} blocks; the prompt needs {need}"
        seq = await core.new_sequence(context, request.request_id, request.prompt_token_ids,
                                      request.sampling, prefill_only=True, check=check,
                                      output_offset=request.num_output_tokens)
        address = bytes(request.kv_address)
        try:
            await asyncio.to_thread(self.sender.connect, address)
        except Exception as exc:
            # fault "peer": this worker is fine, the decode worker is not (the coordinator
            # must not drop this worker for it).
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cannot reach the decode worker's KV endpoint: {exc}",
                                trailing_metadata=PEER)
        loop = asyncio.get_running_loop()
        st, _ = await core.admit(
            context, seq, dst_address=address,
            dst_block_ids=list(request.dst_block_ids),
            done=loop.create_future(), first=loop.create_future())
        try:
            await st.first
            yield self._reply(st, kv_done=False)
            await st.done
        except RequestAborted as exc:
            core.table.pop(st.req_id)
            _retrieve(st.done)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            _retrieve(st.done)
            await core.abort_request(st.req_id)
            raise
        core.table.pop(st.req_id)
        yield self._reply(st, kv_done=True)

    @staticmethod
    def _reply(st: ReqState, kv_done: bool) -> pb.PrefillReply:
        return pb.PrefillReply(first_token=st.first_token, kv_bytes=st.kv_bytes,
                               timings=timings(st), finished=st.first_finishes,
                               finish_reason=st.finish_reason, kv_done=kv_done)

    # -- engine thread ----------------------------------------------------------------------
    def before_run(self, out: SchedulerOutput) -> LayerHook | None:
        """Start the transfer of every prompt that completes in this step; push per layer."""
        core, starting = self.core, []
        per_layer = self.layerwise and \
            out.num_batched_tokens >= core.cfg.transfer.layerwise_min_tokens
        for c in out.chunks:
            st = core.table.get(c.seq_id)
            if st is None or not completes_prompt(c):
                continue
            self.sender.start(st.req_id, st.dst_address,
                              prompt_blocks(c, st.prompt_len, core.engine.block_size),
                              st.dst_block_ids, core.cfg.transfer.timeout_s,
                              lambda rid, err, nbytes, st=st: self._on_sent(st, err, nbytes))
            st.pushed_per_layer = per_layer
            starting.append(st.req_id)
        if not starting or not per_layer:
            return None

        def hook(layer: int) -> None:
            for rid in starting:
                self.sender.layer_ready(rid, layer)
        return hook

    def on_token(self, st: ReqState, token: int) -> bool:
        """Token 0: decide whether it ends the request, and close the transfer with it."""
        eng = self.core.engine
        st.computed_s = time.monotonic()
        st.first_token = token
        seq = eng.scheduler.get(st.req_id)
        if seq is not None:
            status = eng.scheduler.stop_status(seq, token)
            st.first_finishes = status is not None
            st.finish_reason = FINISH_REASONS[status] if status is not None else ""
        self.core.table.resolve_first(st)  # the first reply leaves while the KV moves
        self.sender.finish(st.req_id, {"first_token": int(token)})  # marks every layer ready
        return True

    # -- transfer thread --------------------------------------------------------------------
    def _on_sent(self, st: ReqState, err: str | None, nbytes: int) -> None:
        """All layers and the final message are out, or the transfer failed."""
        core = self.core
        st.kv_done_s = time.monotonic()
        eng = core.engine
        core.engine_loop.call(lambda: eng.abort(st.req_id) if err else
                              eng.scheduler.release(st.req_id))
        if err is not None:
            core.table.resolve(st, error=RequestAborted(grpc.StatusCode.ABORTED,
                                                        f"KV transfer failed: {err}"))
        else:
            st.kv_bytes = nbytes
            core.table.resolve(st, result=True)


def _retrieve(fut: asyncio.Future | None) -> None:
    """Mark a future's exception as seen (no 'never retrieved' warning when unawaited)."""
    if fut is not None and fut.done() and not fut.cancelled():
        fut.exception()

"""Prefill role: run the prompt, push its KV layer by layer to the decode worker, reply with
the first token once every layer is sent."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc

from pdserve.engine.block_manager import cdiv
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker_state import ReqState, RequestAborted

if TYPE_CHECKING:
    from pdserve.worker_server import WorkerServer


class PrefillRole:
    def __init__(self, worker: WorkerServer) -> None:
        from pdserve.kv_link import open_sender
        self.w = worker
        self.sender = open_sender(worker.cfg, worker.engine.kv_caches, worker.engine.block_size)
        self.layerwise = worker.cfg.transfer.layerwise

    def close(self) -> None:
        self.sender.close()

    def abort(self, req_id: str) -> None:
        self.sender.abort(req_id)

    async def prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillReply:
        w = self.w
        seq = await w.new_sequence(context, request.request_id, request.prompt_token_ids,
                                   request.sampling, prefill_only=True)
        n_blocks = cdiv(len(seq.prompt_token_ids), w.engine.block_size)
        if len(request.dst_block_ids) != n_blocks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"dst_block_ids has {len(request.dst_block_ids)} blocks; the prompt "
                                f"needs {n_blocks}")
        try:
            st = w.table.add(ReqState(request.request_id, "prefill", len(seq.prompt_token_ids)))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        try:
            await asyncio.to_thread(self.sender.connect, bytes(request.kv_address))
        except Exception as exc:
            w.table.pop(st.req_id)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cannot reach the decode worker's KV endpoint: {exc}")
        st.dst_address = bytes(request.kv_address)
        st.dst_block_ids = list(request.dst_block_ids)
        st.done = asyncio.get_running_loop().create_future()
        try:
            await w.on_engine(lambda: w.engine.scheduler.add(seq))
        except ValueError as exc:
            w.table.pop(st.req_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await st.done
        except RequestAborted as exc:
            w.table.pop(st.req_id)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            await w.abort_request(st.req_id)
            raise
        w.table.pop(st.req_id)
        return pb.PrefillReply(first_token=st.first_token, kv_bytes=st.kv_bytes,
                               timings=w.timings(st), finished=st.first_finishes,
                               finish_reason=st.finish_reason)

    # -- engine thread ----------------------------------------------------------------------
    def before_run(self, out: SchedulerOutput):
        """Start the transfer of every prompt that completes in this step; push per layer."""
        starting: list[str] = []
        bs = self.w.engine.block_size
        for c in out.chunks:
            st = self.w.table.get(c.seq_id)
            if st is None or st.kind != "prefill" or not c.sample:
                continue
            src = list(c.block_ids[: cdiv(st.prompt_len, bs)])
            self.sender.start(st.req_id, st.dst_address, src, st.dst_block_ids,
                              self.w.cfg.transfer.timeout_s,
                              lambda rid, err, st=st: self._on_sent(st, err))
            starting.append(st.req_id)
        if not starting or not self.layerwise:
            return None

        def hook(layer: int) -> None:
            for rid in starting:
                self.sender.layer_ready(rid, layer)
        return hook

    def on_first_token(self, st: ReqState, token: int) -> None:
        w = self.w
        st.computed_s = time.monotonic()
        st.first_token = token
        seq = w.engine.scheduler.get(st.req_id)
        params = seq.params if seq is not None else None
        if params is not None:
            stop = (not params.ignore_eos and token in w.engine.eos_token_ids) or \
                token in params.stop_token_ids
            st.first_finishes = stop or params.max_tokens == 1
            st.finish_reason = "stop" if stop else ("length" if st.first_finishes else "")
        if not self.layerwise:
            for layer in range(w.engine.model_cfg.num_layers):
                self.sender.layer_ready(st.req_id, layer)
        self.sender.finish(st.req_id, {"first_token": int(token)})

    def _on_sent(self, st: ReqState, err: str | None) -> None:
        """Transfer thread: all layers and the final message are out, or it failed."""
        w = self.w
        st.kv_done_s = time.monotonic()
        w.engine_loop.call(lambda: w.engine.abort(st.req_id) if err else
                           w.engine.scheduler.release(st.req_id))
        if err is not None:
            w.table.resolve(st, error=RequestAborted(grpc.StatusCode.ABORTED,
                                                     f"KV transfer failed: {err}"))
        else:
            st.kv_bytes = self.sender.request_bytes(st.req_id)
            w.table.resolve(st, result=True)

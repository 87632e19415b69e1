"""Decode role: reserve blocks for a prompt, receive its KV, admit it, stream tokens."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker_state import ReqState, StreamEnd

if TYPE_CHECKING:
    from pdserve.worker_server import WorkerServer


class DecodeRole:
    def __init__(self, worker: WorkerServer) -> None:
        from pdserve.kv_link import open_receiver
        self.w = worker
        self.receiver = open_receiver(worker.cfg, worker.engine.kv_caches, worker.engine.block_size)

    def close(self) -> None:
        self.receiver.close()

    def abort(self, req_id: str) -> None:
        self.receiver.abort(req_id)

    async def reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveReply:
        w = self.w
        seq = await w.new_sequence(context, request.request_id, request.prompt_token_ids,
                                   request.sampling)
        try:
            st = w.table.add(ReqState(request.request_id, "decode", len(seq.prompt_token_ids)))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        try:
            blocks = await w.on_engine(lambda: w.engine.scheduler.reserve_remote(seq))
        except ValueError as exc:
            w.table.pop(st.req_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if blocks is None:
            w.table.pop(st.req_id)
            return pb.ReserveReply(accepted=False, reason="no free KV blocks on this decode worker")
        st.scheduled_s = time.monotonic()
        self.receiver.expect(st.req_id, list(blocks), w.cfg.transfer.timeout_s,
                             lambda rid, aux, err: self._on_kv(st, aux, err))
        return pb.ReserveReply(accepted=True, kv_address=self.receiver.address,
                               block_ids=list(blocks))

    def _on_kv(self, st: ReqState, aux: dict | None, err: str | None) -> None:
        """Transfer thread: every layer arrived (aux holds the first token), or it failed."""
        w = self.w
        st.computed_s = st.kv_done_s = time.monotonic()
        if err is not None:
            w.engine_loop.call(lambda: w.engine.abort(st.req_id))
            w.table.deliver([(st, StreamEnd("abort", (grpc.StatusCode.ABORTED,
                                                      f"KV transfer failed: {err}")))])
            return

        def admit() -> None:
            seq = w.engine.scheduler.admit_remote(st.req_id, int(aux["first_token"]))
            if seq.is_finished:
                w.table.deliver([(st, StreamEnd(seq.finish_reason or "stop"))])
        w.engine_loop.call(admit)

    async def stream(self, request: pb.DecodeRequest, context):
        st = self.w.table.get(request.request_id)
        if st is None or st.kind != "decode":
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no reservation for request {request.request_id!r} on this worker")
        async for chunk in self.w.stream_tokens(st, context):
            yield chunk

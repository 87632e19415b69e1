"""The decode role: reserve blocks for a prompt, receive its KV, admit it, stream tokens.

A decode worker also serves Worker.Generate (`generate`): the coordinator's conditional
disaggregation sends it prompts too short to be worth a transfer, and it prefills them
itself, on the colocated role's path (decode/both.py `generate_locally`).

Life of one request here: `reserve()` (asyncio loop) admits the prompt as a sequence
waiting for remote KV and posts the receive; the coordinator then opens `decode_stream()`;
`_on_kv()` (transfer thread) admits the sequence with token 0 once every layer has landed;
the engine thread's tokens reach the stream through the worker core. Batching is in
decode/batching.py.
"""

from __future__ import annotations

import time

import grpc

from pdserve.decode import batching
from pdserve.decode.both import generate_locally
from pdserve.engine.config import EngineConfig
from pdserve.kvtransfer.link import ReceiverLink
from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import Role, register_role
from pdserve.worker.state import ReqState, StreamEnd


@register_role("decode")
class DecodeRole(Role):
    transfer_backend = True

    def __init__(self, core: WorkerCore, receiver: ReceiverLink | None = None) -> None:
        super().__init__(core)
        self.receiver = receiver or ReceiverLink(core.cfg.transfer, core.engine.kv_caches,
                                                 core.cfg.host, core.cfg.advertised_host,
                                                 on_fatal=core.fail)

    @classmethod
    def engine_config(cls, cfg: EngineConfig) -> EngineConfig:
        return batching.decode_engine_config(cfg)

    def close(self) -> None:
        self.receiver.close()

    def abort(self, req_id: str) -> None:
        self.receiver.abort(req_id)

    # -- Worker.Reserve / Worker.DecodeStream -----------------------------------------------
    async def reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveReply:
        core = self.core
        seq = await core.new_sequence(context, request.request_id, request.prompt_token_ids,
                                      request.sampling, output_offset=request.num_output_tokens)
        st, blocks = await core.admit(
            context, seq, place=lambda s: batching.reserve(core.engine.scheduler, s))
        if blocks is None:
            core.table.pop(st.req_id)
            return pb.ReserveReply(accepted=False, reason=batching.NO_ROOM)
        st.scheduled_s = time.monotonic()
        self.receiver.expect(st.req_id, list(blocks), core.cfg.transfer.timeout_s,
                             lambda rid, aux, err: self._on_kv(st, aux, err))
        return pb.ReserveReply(accepted=True, kv_address=self.receiver.address,
                               block_ids=list(blocks))

    async def decode_stream(self, request: pb.DecodeRequest, context):
        st = self.core.table.get(request.request_id)
        if st is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no reservation for request {request.request_id!r} on this worker")
        async for chunk in self.core.stream_tokens(st, context):
            yield chunk

    async def generate(self, request: pb.GenerateWorkerRequest, context):
        """A local prefill (conditional disaggregation): no prefill worker, no transfer."""
        async for chunk in generate_locally(self.core, request, context):
            yield chunk

    # -- transfer thread --------------------------------------------------------------------
    def _on_kv(self, st: ReqState, aux: dict | None, err: str | None) -> None:
        """Every layer arrived (aux holds the first token), or the transfer failed."""
        core, eng = self.core, self.core.engine
        st.computed_s = st.kv_done_s = time.monotonic()
        first = (aux or {}).get("first_token")
        if err is None and not (type(first) is int and 0 <= first < eng.model_cfg.vocab_size):
            err = f"the prefill worker sent no valid first token: {first!r:.40}"
        if err is not None:
            core.engine_loop.call(lambda: eng.abort(st.req_id))
            core.table.deliver([(st, StreamEnd("abort", (grpc.StatusCode.ABORTED,
                                                         f"KV transfer failed: {err}")))])
            return

        def admit() -> None:
            seq = batching.admit(eng.scheduler, st.req_id, first)
            if seq.is_finished:
                core.table.deliver([(st, StreamEnd(seq.finish_reason or "stop"))])
        core.engine_loop.call(admit)

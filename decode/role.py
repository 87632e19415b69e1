"""The decode role: reserve blocks for a prompt, receive its KV, admit it, stream tokens.

A decode worker also serves Worker.Generate (`generate`): the coordinator's conditional
disaggregation sends it prompts too short to be worth a transfer, and it prefills them
itself, on the colocated role's path (decode/both.py `generate_locally`).

Life of one request here: `reserve()` (asyncio loop) admits the prompt as a sequence
waiting for remote KV and posts the receive; the coordinator then opens `decode_stream()`;
`_on_kv()` (transfer thread) admits the sequence with token 0 once every layer has landed;
the engine thread's tokens reach the stream through the worker core. Batching is in
decode/batching.py.

Blocks a transfer may still write (a peer copy into this worker's pool) never go back to
the pool early. A request aborted while its transfer is pending ends for its client at
once, but its blocks are *fenced* (`Scheduler.abort(fence=...)`: out of the free pool,
counted in `kv_stats()["fenced_blocks"]`) until the receiver reports the transfer's result
(which follows an abort within its drain timeout or deadline, or at close). A failed
result that the receiver lists in `held_blocks()` (a copy that did not land) keeps those
blocks fenced until `on_release`; everything else is freed then. Shutdown does not wait:
close() fails the pending transfers (the receiver logs what it leaves held) and fenced
blocks go with the process.
"""

from __future__ import annotations

import logging
import time

import grpc

from pdserve.decode import batching
from pdserve.decode.both import generate_locally
from pdserve.engine.config import EngineConfig
from pdserve.engine.sequence import Sequence
from pdserve.kvtransfer.link import ReceiverLink
from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import Role, register_role
from pdserve.worker.state import ReqState, StreamEnd

log = logging.getLogger("pdserve.decode")


@register_role("decode")
class DecodeRole(Role):
    transfer_backend = True

    def __init__(self, core: WorkerCore, receiver: ReceiverLink | None = None) -> None:
        """receiver: a ReceiverLink's surface (tests pass a fake, and wire its releases to
        `on_kv_released` themselves)."""
        super().__init__(core)
        self.receiver = receiver or ReceiverLink(core.cfg.transfer, core.engine.kv_caches,
                                                 core.cfg.host, core.cfg.advertised_host,
                                                 on_fatal=core.fail,
                                                 on_release=self.on_kv_released)
        # engine thread: sequences aborted while their transfer was pending, their blocks
        # fenced until its result (by id(): a later request may reuse the request id)
        self._orphans: dict[int, Sequence] = {}

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
        dst = list(blocks)
        try:
            self.receiver.expect(st.req_id, dst, core.cfg.transfer.timeout_s,
                                 lambda rid, aux, err: self._on_kv(st, seq, dst, aux, err))
        except Exception:  # no transfer will write them: the blocks are free again
            core.table.discard(st)
            core.engine_loop.call(lambda: self._settle(st, seq, dst, None, set()))
            raise
        return pb.ReserveReply(accepted=True, kv_address=self.receiver.address,
                               block_ids=dst)

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
    def _on_kv(self, st: ReqState, seq: Sequence, dst: list[int], aux: dict | None,
               err: str | None) -> None:
        """Every layer arrived (aux holds the first token), or the transfer failed (its
        blocks that the receiver holds stay fenced: asked here, where it lists them)."""
        core, eng = self.core, self.core.engine
        st.computed_s = st.kv_done_s = time.monotonic()
        first = (aux or {}).get("first_token")
        if err is None and not (type(first) is int and 0 <= first < eng.model_cfg.vocab_size):
            err = f"the prefill worker sent no valid first token: {first!r:.40}"
        if err is not None:
            held = set(self.receiver.held_blocks().get(st.req_id, ())) & set(dst)
            core.engine_loop.call(lambda: self._settle(st, seq, dst, None, held))
            core.table.deliver([(st, StreamEnd("abort", (grpc.StatusCode.ABORTED,
                                                         f"KV transfer failed: {err}")))])
            return
        core.engine_loop.call(lambda: self._settle(st, seq, dst, first, set()))

    def on_kv_released(self, req_id: str, blocks: list[int]) -> None:
        """The receiver's on_release: a held request's blocks are no longer written."""
        self.core.engine_loop.call(lambda: self._release(req_id, blocks))

    # -- engine thread ----------------------------------------------------------------------
    def _settle(self, st: ReqState, seq: Sequence, dst: list[int], first: int | None,
                held: set[int]) -> None:
        """seq's transfer ended (first: its token 0; None: failed, or never posted): admit
        it, or free its blocks but those in `held` (fenced until on_kv_released)."""
        sch = self.core.engine.scheduler
        if self._orphans.pop(id(seq), None) is not None:  # aborted meanwhile: dst fenced
            sch.unfence(seq.seq_id, [b for b in dst if b not in held])
        elif sch.remote.get(seq.seq_id) is not seq:
            return  # gone some other way (never fenced)
        elif first is None:
            sch.abort(seq.seq_id, fence=held)
        else:
            batching.admit(sch, seq.seq_id, first)
            if seq.is_finished:
                self.core.table.deliver([(st, StreamEnd(seq.finish_reason or "stop"))])
        if held:
            log.warning("decode: request %r failed while a peer copy may still write %d of "
                        "its KV blocks; they stay out of the pool until the receiver releases "
                        "them (%d fenced in all)", seq.seq_id, len(held),
                        sch.block_manager.num_fenced_blocks)

    def _release(self, req_id: str, blocks: list[int]) -> None:
        n = self.core.engine.scheduler.unfence(req_id, blocks)
        log.info("decode: %d KV blocks of request %r back in the pool (%d still fenced)", n,
                 req_id, self.core.engine.scheduler.block_manager.num_fenced_blocks)

    def engine_abort(self, req_id: str) -> bool:
        """A request still waiting for its KV keeps the blocks its transfer may write
        fenced until the transfer's result (_settle)."""
        sch = self.core.engine.scheduler
        seq = sch.remote.get(req_id)
        if seq is None:
            return sch.abort(req_id)
        self._orphans[id(seq)] = seq
        return sch.abort(req_id, fence=set(batching.transfer_blocks(sch, seq)))

"""The sender's peer copy (one host): map the receiver's pool, copy ready layers straight
into its reserved blocks, `end` once every copy landed. The rest of KVSender (the staged
backend path, requests, results) is in sender.py; this is its half for peer copies, and
the launch of a copy behind its layers' events, which gathers for the backend use too."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from . import peer_pool
from .control import decode_address
from .endpoint import Peer
from .sender_state import TxMsg, TxReq
from .trace import gpu_begin, gpu_end, mark

log = logging.getLogger("pdserve.kvtransfer")


class DirectCopy:
    """KVSender's peer copy methods (a mixin: they use its layout, backend and requests)."""

    layout: Any
    backend: Any
    device: Any
    options: Any
    _msgs: list[TxMsg]
    _copy_stream: torch.cuda.Stream | None

    def _open_peer_pool(self, peer: Peer, offer: dict) -> None:
        try:
            peer.pool = peer_pool.open_pool(offer, self.layout.word, self.layout.row_words,
                                           self.device)
            peer.pool_blocks = int(offer["rows"]) // self.layout.num_layers
        except Exception as e:  # the backend path still works: say why once, per pair
            log.warning("kv sender: no peer copy to %s, using the %s backend: %s",
                        decode_address(peer.key)["host"], self.backend.name, e)

    def _pump_direct(self, req: TxReq, ready: int) -> None:
        """Peer copy: ready layers in one copy into the receiver's pool: once, after the
        forward (default), or with peer_copy_during_forward a quarter of the model at a time
        while it computes (each launch costs the model's launch-bound forward GIL time, and
        its thread blocks the model's SMs). `end` once all copies landed (the receiver
        reads nothing before it), or, on GPU, once the last is launched, naming the event
        that follows it."""
        nl, nb = self.layout.num_layers, len(req.src)
        if not req.go:
            return  # never write into blocks the receiver has not confirmed
        if not (req.finished or self.options.peer_copy_during_forward):
            return  # copy after the forward (TransferOptions.peer_copy_during_forward)
        group = nl if req.finished else max(1, nl // 4)
        if req.layer_pos < ready and nb and (ready - req.layer_pos >= group or ready == nl):
            try:
                copied = self._copy_direct(req, req.layer_pos, ready)
            except Exception as e:  # e.g. a GPU that cannot reach the peer's memory
                log.warning("kv sender: peer copy failed, the backend carries this pair "
                            "from now on: %s", e)
                req.peer.pool = None
                self._fail(req, f"peer copy failed: {e}")
                return
            self._msgs.append(TxMsg(req, -1, copied=copied))
            mark("tx", "peer_copy", req.req_id, (ready - req.layer_pos) * nb)
            req.inflight += 1
            req.k += 1
            req.nbytes += (ready - req.layer_pos) * nb * self.layout.row_nbytes
            req.layer_pos = ready
        if req.finished and (nb == 0 or req.layer_pos >= nl):
            end = {"t": "end", "req": req.req_id, "aux": req.aux, "msgs": req.k}
            ring = req.peer.ring
            if req.inflight and ring is not None and ring.free:
                # the copy may still run: the receiver waits for this event, not for our word
                req.slot = ring.free.pop()
                ring.events[req.slot].record(torch.cuda.current_stream(self.device))
                end["ev"] = req.slot
                mark("tx", "ev_recorded", req.req_id)
            elif req.inflight:
                return  # `end` once every copy is done
            req.peer.conn.send_now(end)
            mark("tx", "end_sent", req.req_id)
            req.state = "ended"

    def _copy_direct(self, req: TxReq, l0: int, l1: int) -> torch.cuda.Event | None:
        # while the model still computes (layer-wise), leave it most SMs
        ctas = self.layout.copy_ctas if l1 < self.layout.num_layers else None
        return self._launch(req, l0, l1, "peer_copy", lambda: self.layout.peer_copy(
            req.index, req.dindex, req.peer.pool, req.peer.pool_blocks, l0, l1, ctas))

    def _launch(self, req: TxReq, l0: int, l1: int, name: str,
                copy: Callable[[], None]) -> torch.cuda.Event | None:
        """copy() once layers [l0, l1) of req are written: on the GPU queued on the copy
        stream (the progress thread's current stream, see Endpoint._run) behind their
        events; returns the event of its end (None on CPU, where it is done)."""
        if self._copy_stream is None:
            copy()
            return None
        for ev in {id(e): e for e in (req.events.get(x) for x in range(l0, l1)) if e}.values():
            self._copy_stream.wait_event(ev)
        mark("tx", name + "_waited", req.req_id)
        g0 = gpu_begin()
        copy()
        gpu_end("tx", name, req.req_id, g0)
        mark("tx", name + "_launched", req.req_id)
        done = torch.cuda.Event()
        done.record(self._copy_stream)
        return done

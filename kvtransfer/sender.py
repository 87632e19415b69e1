"""KVSender (prefill side): pushes a request's blocks into the receiver's reserved blocks.

start() opens the request (and the pair on first use); layer_ready() marks layers whose KV
is written (a CUDA event on GPU: the gather waits for it on the GPU, never on the host);
finish() marks the rest ready and attaches aux (e.g. the first token). Ready layers are
packed into messages of up to one staging buffer (several layers per message when they are
ready together, see pack.next_rect), each gathered on the copy stream and sent by the
backend after the gather's event. A request completes when the receiver reports every
block in place ("done") and our sends have completed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import peer_pool
from .backend import Backend
from .common import GeometryMismatchError, ReqId, TransferError, TransferOptions, TransferResult
from .control import ControlConn, FrameReader, address_bytes, decode_address, encode, handshake
from .endpoint import Endpoint, FatalCallback, Peer, ResultCallback
from .pack import Rect, ids_to_bytes, next_rect
from .schema import SENDER_READY
from .sender_direct import DirectCopy
from .sender_state import TxMsg, TxReq
from .trace import mark

log = logging.getLogger("pdserve.kvtransfer")

MAX_GRANTS = 1 << 16  # a receiver's grants kept for requests not begun yet, per pair


class KVSender(DirectCopy, Endpoint):
    """Prefill side. Addresses come from KVReceiver.address (bytes, or its str form)."""

    _role = "sender"

    def __init__(self, kv_caches: Sequence[torch.Tensor], backend: str | Backend = "ucx",
                 options: TransferOptions | None = None,
                 on_result: ResultCallback | None = None,
                 on_fatal: FatalCallback | None = None) -> None:
        super().__init__(kv_caches, backend, options, on_result, on_fatal)
        self._reqs: dict[ReqId, TxReq] = {}
        self._msgs: list[TxMsg] = []
        self._by_addr: dict[bytes, Peer] = {}
        self._connect_lock = threading.Lock()
        self._min_rows = max(1, self.options.min_message_bytes // self.layout.row_nbytes)
        # requests whose layer readiness nothing reads: a peer copy after the forward waits
        # for finish() only. layer_ready() drops them in the caller, before any CUDA event
        # or wake-up: otherwise each layer of the forward would wake the progress thread,
        # whose Python then takes the GIL from the model's launches
        self._layers_unused: set[ReqId] = set()
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------------
    def connect(self, address: bytes | str) -> None:
        """Open the pair to a receiver ahead of time (start() does it on first use).

        Raises GeometryMismatchError when the two KV pools differ, TransferError otherwise.
        """
        self._peer_for(address)

    def connected(self, address: bytes | str) -> bool:
        """The pair to `address` is open: connect() and start() need no handshake."""
        peer = self._by_addr.get(address_bytes(address))
        return peer is not None and peer.alive

    def _peer_for(self, address: bytes | str) -> Peer:
        self._check_open()
        key = address_bytes(address)
        peer = self._by_addr.get(key)  # an open pair: no address to decode, no lock to take
        if peer is not None and peer.alive:
            return peer
        info = decode_address(key)
        with self._connect_lock:
            peer = self._by_addr.get(key)
            if peer is not None and peer.alive:
                return peer
            if info["backend"] != self.backend.name:
                raise TransferError(f"transfer backend mismatch: sender uses {self.backend.name!r}, "
                                    f"receiver uses {info['backend']!r}")
            token = self.backend.new_token()
            hello = {"t": "hello", "geometry": self.geometry.to_dict(), "backend": self.backend.name,
                     "addr": self.backend.address(), "token": token, "max_rows": self.staging.rows}
            ring = None
            if self.options.peer_copy and self.layout.flat is not None:
                hello["host"] = peer_pool.host_id()  # the receiver then offers its pool
                if self._cuda:
                    ring = peer_pool.EventRing(self.device)
                    hello["events"] = ring.handles
            sock, reader, reply = handshake(info["host"], info["port"], hello,
                                            self.options.connect_timeout_s, self._secret,
                                            self.options.max_frame_bytes)
            if reply["t"] != "welcome":
                sock.close()
                why = reply.get("why", f"unexpected reply {reply['t']!r}")
                if reply.get("kind") == "geometry":
                    raise GeometryMismatchError(why)
                raise TransferError(f"KV receiver refused the connection: {why}")
            peer = self._call(self._do_connect, sock, reader, key, info, token, reply, ring)
            self._by_addr[key] = peer
        return peer

    def start(self, req_id: ReqId, address: bytes | str, src_block_ids: Sequence[int],
              dst_block_ids: Sequence[int] | None = None, deadline_s: float | None = None,
              layerwise: bool | None = None) -> None:
        """Begin pushing req_id's blocks src_block_ids (request order) to the receiver."""
        src = self.layout.check_block_ids(src_block_ids, "source")
        dst = None if dst_block_ids is None else \
            self.layout.check_block_ids(dst_block_ids, "destination", 1 << 32)
        if dst is not None and len(dst) != len(src):
            raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
        mark("tx", "start", req_id, len(src))
        peer = self._peer_for(address)
        self._claim(req_id)
        if (peer.pool is not None and dst is not None and len(dst)
                and not self.options.peer_copy_during_forward):
            self._layers_unused.add(req_id)  # a peer copy after the forward (_pump_direct)
        lw = self.options.layerwise if layerwise is None else layerwise
        self._submit(self._do_start, req_id, peer, src, dst, deadline_s or self.options.deadline_s, lw)

    def layer_ready(self, req_id: ReqId | list[ReqId] | tuple[ReqId, ...], layer: int,
                    event: torch.cuda.Event | None = None) -> None:
        """Layer `layer` of req_id (or of every id in a list: one call per model layer for a
        whole batch) is written. On GPU, `event` (default: recorded now on the caller's
        current stream) marks when; the gather waits for it on the GPU, not on the host."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        unused = self._layers_unused
        ids = ([r for r in req_id if r not in unused] if isinstance(req_id, (list, tuple))
               else [] if req_id in unused else [req_id])
        if not ids:
            return  # peer copies after the forward: finish() marks every layer at once
        ev = self._event(event)
        self._submit(self._do_ready_many, ids, range(layer, layer + 1), ev)

    def finish(self, req_id: ReqId, aux: dict | None = None,
               event: torch.cuda.Event | None = None) -> None:
        """Every layer is written; aux (small, msgpack-able) reaches the receiver's result."""
        encode({"aux": aux})  # fail here, in the caller, if aux cannot be sent
        mark("tx", "finish_call", req_id)
        self._layers_unused.discard(req_id)
        self._submit(self._do_ready, req_id, range(self.layout.num_layers), self._event(event),
                     aux, True)

    def abort(self, req_id: ReqId, reason: str = "aborted by the sender") -> None:
        """Give a request up; the receiver is told; the result (ok=False) follows."""
        self._layers_unused.discard(req_id)
        self._submit(self._do_abort, req_id, reason)

    def _event(self, event: torch.cuda.Event | None) -> torch.cuda.Event | None:
        if not self._cuda or event is not None:
            return event
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    # ---- commands (progress thread) ------------------------------------------------------------
    def _do_connect(self, sock: Any, reader: FrameReader, key: bytes, info: dict, token: bytes,
                    reply: dict, ring: peer_pool.EventRing | None) -> Peer:
        peer = self._add_peer(ControlConn(sock, SENDER_READY, reader))
        peer.key = key
        peer.handle = self.backend.connect(info.get("addr", b""), token, True)
        peer.conn_id = int(reply["conn"])
        peer.max_rows = min(self.staging.rows, int(reply["max_rows"]))
        if "pool" in reply:
            self._open_peer_pool(peer, reply["pool"])
            peer.ring = ring if reply.get("events") else None
        peer.ready = True
        return peer

    def _do_start(self, req_id: ReqId, peer: Peer, src: np.ndarray, dst: np.ndarray | None,
                  deadline_s: float, layerwise: bool) -> None:
        req = TxReq(req_id, peer, src, dst, time.monotonic() + deadline_s, time.perf_counter(),
                     layerwise, [False] * self.layout.num_layers)
        self._reqs[req_id] = req
        if not peer.alive:
            self._fail(req, "the receiver connection is closed", notify=False)
            return
        peer.reqs.add(req_id)
        # the receiver's grant (sent at its expect()): our begin settles it, used or not
        granted = req_id in peer.grants
        peer.grants.pop(req_id, None)
        direct = peer.pool is not None and dst is not None and len(dst) > 0  # else nothing to hold
        if direct and int(dst.max()) >= peer.pool_blocks:
            if granted:
                peer.conn.send({"t": "unused", "req": req_id})
            self._fail(req, f"destination block id {int(dst.max())} is out of the receiver's "
                            f"pool of {peer.pool_blocks} blocks")
            return
        req.go = granted and direct  # write as soon as layers are ready, no round trip
        begin = {"t": "begin", "req": req_id, "nblocks": len(src), "direct": direct,
                 "granted": req.go}
        if dst is not None:
            begin["dst"] = ids_to_bytes(dst)
        peer.conn.send_now(begin)  # without a grant, its `go` comes back while we index
        mark("tx", "begin_sent", req_id)
        # H2D now, off the critical path
        if direct:
            req.index, req.dindex = self.layout.index_pair(src, dst, self._copy_stream)
        else:
            req.index = self.layout.index(src, self._copy_stream)
        mark("tx", "index", req_id)

    def _do_ready(self, req_id: ReqId, layers: range, event: Any, aux: dict | None,
                  finished: bool) -> None:
        req = self._reqs.get(req_id)
        if req is None or req.state != "active":
            return
        mark("tx", "ready_cmd", req_id)
        for layer in layers:
            if not req.ready[layer]:
                req.ready[layer] = True
                if event is not None:
                    req.events[layer] = event
        while req.ready_prefix < len(req.ready) and req.ready[req.ready_prefix]:
            req.ready_prefix += 1
        if finished:
            req.finished, req.aux = True, aux
            mark("tx", "finish_cmd", req_id)
        self._pump(req)  # now, not after the rest of the queued commands

    def _do_ready_many(self, req_ids: list[ReqId], layers: range, event: Any) -> None:
        for rid in req_ids:
            self._do_ready(rid, layers, event, None, False)

    def _do_abort(self, req_id: ReqId, reason: str) -> None:
        req = self._reqs.get(req_id)
        if req is not None:
            self._fail(req, reason, notify=True)

    # ---- control messages --------------------------------------------------------------------------
    def _on_message(self, peer: Peer, msg: dict[str, Any]) -> None:
        t, rid = msg["t"], msg["req"]
        req = self._reqs.get(rid)
        if req is not None and req.peer is not peer:
            req = None
        mark("tx", "rx_" + t, rid)
        if req is None:
            if t == "grant" and rid not in peer.grants:
                peer.grants[rid] = None  # for a start() to come
                if len(peer.grants) > MAX_GRANTS:  # a begin without one waits for `go`
                    peer.grants.popitem(last=False)
            elif t == "fail":  # a grant taken back (or a request we never began)
                peer.grants.pop(rid, None)
                peer.conn.send({"t": "unused", "req": rid})
            return
        if t == "done" and req.state == "ended":
            req.acked = True
        elif t in ("go", "grant"):  # a grant that crossed our begin is as good as its go
            req.go = True
            if req.state == "active":
                self._pump(req)
        elif t == "fail":
            self._fail(req, f"receiver: {msg.get('why')}", notify=False)

    # ---- progress ------------------------------------------------------------------------------------
    def _progress(self) -> None:
        if self._msgs:
            self._msgs = [m for m in self._msgs if not self._advance(m)]
        for req in list(self._reqs.values()):
            if req.state == "active" and not self._pump(req):
                break  # out of staging
        now = time.monotonic()
        for req in list(self._reqs.values()):
            if req.state in ("active", "ended") and now > req.deadline:
                self._fail(req, "deadline exceeded: the transfer did not complete in time")
            if req.state == "ended" and req.acked and req.inflight == 0:
                self._finish(req, None)
            elif req.state == "failed":
                if req.inflight == 0:
                    self._finish(req, req.error)
                elif req.peer.alive and now > req.failed_at + self.options.drain_timeout_s:
                    self._peer_lost(req.peer, f"in-flight data of failed request {req.req_id!r} "
                                              f"did not drain in {self.options.drain_timeout_s} s")

    def _pump(self, req: TxReq) -> bool:
        """Cut, gather and post every message that is ready; False if staging ran out."""
        peer, nl, nb = req.peer, self.layout.num_layers, len(req.src)
        ready = req.ready_prefix if (req.layerwise or req.ready_prefix == nl) else 0
        if req.dindex is not None:
            self._pump_direct(req, ready)
            return True
        while True:
            rect = next_rect(nl, nb, req.layer_pos, req.block_pos, ready, peer.max_rows,
                             self._min_rows, req.k)
            if rect is None:
                break
            buf = self.staging.acquire()
            if buf is None:
                return False
            view = self.staging.view(buf, rect.rows)
            after = self._gather(req, rect, view)
            tag = (peer.conn_id << 32) | (peer.seq & 0xFFFFFFFF)
            peer.seq += 1
            # the receiver can post its receive while we gather the next message
            peer.conn.send_now({"t": "data", "req": req.req_id, "tag": tag, "l0": rect.l0,
                                "l1": rect.l1, "b0": rect.b0, "b1": rect.b1})
            self._msgs.append(TxMsg(req, buf, self.backend.post_send(peer.handle, view, tag, after)))
            mark("tx", "posted", req.req_id, rect.rows)
            req.inflight += 1
            req.k += 1
            req.nbytes += rect.rows * self.layout.row_nbytes
            if rect.b1 >= nb:
                req.layer_pos, req.block_pos = rect.l1, 0
            else:
                req.block_pos = rect.b1
        if req.finished and (nb == 0 or req.layer_pos >= nl):
            peer.conn.send({"t": "end", "req": req.req_id, "aux": req.aux})
            req.state = "ended"
        return True

    def _gather(self, req: TxReq, rect: Rect, view: torch.Tensor) -> torch.cuda.Event | None:
        # alone on the GPU (no send in flight): every SM copies; else leave SMs to the wire
        ctas = None if self._msgs else self.layout.full_ctas
        return self._launch(req, rect.l0, rect.l1, "gather",
                            lambda: self.layout.gather(req.index, rect, view, ctas))

    def _advance(self, m: TxMsg) -> bool:
        if m.buf < 0:  # a peer copy: nothing to release, nothing can fail after the launch
            if m.copied is not None and not m.copied.query():
                return False
            m.req.inflight -= 1
            mark("tx", "peer_copy_done", m.req.req_id)
            return True
        try:
            if not self.backend.poll(m.op):
                return False
            err = None
        except TransferError as e:
            err = str(e)
        mark("tx", "send_done", m.req.req_id, err)
        self.staging.release(m.buf)
        m.req.inflight -= 1
        if err is not None:
            self._fail(m.req, f"send failed: {err}")
            if m.req.peer.alive:  # the pair is broken: drop it; the next start() reconnects
                self._peer_lost(m.req.peer, f"transfer backend failed: {err}")
        return True

    def _fail(self, req: TxReq, why: str, notify: bool = True) -> None:
        if req.state == "failed":
            return
        req.state, req.error, req.failed_at = "failed", why, time.monotonic()
        if notify and req.peer.alive:
            req.peer.conn.send({"t": "abort", "req": req.req_id, "why": why})

    def _finish(self, req: TxReq, error: str | None) -> None:
        del self._reqs[req.req_id]
        self._layers_unused.discard(req.req_id)  # ended before its finish()
        if req.dindex is not None:  # no copy of it runs any more (inflight == 0)
            self.layout.release(req.index)
        if req.slot is not None:
            req.peer.ring.free.append(req.slot)
        req.peer.reqs.discard(req.req_id)
        if error is not None and req.dindex is not None and req.peer.alive:
            # the receiver keeps its blocks until no copy of ours can still write into them
            req.peer.conn.send({"t": "end", "req": req.req_id, "halted": True})
        mark("tx", "finish", req.req_id, error)
        now = time.perf_counter()
        self._report(TransferResult(req.req_id, error is None, None, error, req.nbytes,
                                    now - req.t0, now, req.k,
                                    "peer_copy" if req.dindex is not None else self.backend.name))

    def _on_peer_lost(self, peer: Peer, why: str) -> None:
        if peer.key is not None and self._by_addr.get(peer.key) is peer:
            del self._by_addr[peer.key]
        for rid in list(peer.reqs):
            req = self._reqs.get(rid)
            if req is not None:
                self._fail(req, f"receiver lost: {why}", notify=False)

    def _busy(self) -> bool:
        # copies or sends in flight, or an answer due within a round trip (done, go): poll,
        # rather than sleep, so that answer is read the moment it lands
        return bool(self._msgs) or any(
            r.state == "ended" or (r.finished and not r.go and r.dindex is not None)
            for r in self._reqs.values())

    def _next_deadline(self) -> float | None:
        live = [r.deadline for r in self._reqs.values() if r.state in ("active", "ended")]
        return min(live) if live else None

    def _fail_all(self, why: str) -> None:
        for req in list(self._reqs.values()):
            self._finish(req, req.error or why)

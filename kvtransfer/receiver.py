"""KVReceiver (decode side): expects requests into reserved blocks, receives and scatters.

For every data header, in the order the sender sent them, it posts a receive into a free
staging buffer, then scatters the rows into the request's blocks (on its own CUDA stream,
chained to the receive on the GPU for stream-ordered backends). A request is reported once
its `end` arrived and every row is in place; a failed one once nothing of it is in flight.
Data of unknown or failed requests is still received (and dropped): both sides stay in step.

A new connection is a stranger until its handshake ends: with a cluster secret it must pass
the challenge-response of auth.py first, and only then does its backend address reach the
backend. Strangers are capped (max_pending_handshakes) and timed out (connect_timeout_s).

A result is the moment the owner gets a request's blocks back, except for a failed request
listed in held_blocks() then: a peer copy may still write those (receiver_direct.py), and
on_release(req_id, blocks) says when they are the owner's.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from . import auth, peer_pool
from .backend import Backend
from .common import GeometryMismatchError, ReqId, TransferError, TransferOptions, TransferResult
from .control import ControlConn, address_to_str, encode_address
from .endpoint import Endpoint, FatalCallback, Peer, ResultCallback
from .pack import Rect, ids_to_bytes
from .receiver_direct import DirectReceive, ReleaseCallback
from .receiver_state import Held, RxMsg, RxReq
from .schema import RECEIVER_HANDSHAKE, RECEIVER_READY, ProtocolError
from .trace import gpu_begin, gpu_end, mark

log = logging.getLogger("pdserve.kvtransfer")


class KVReceiver(DirectReceive, Endpoint):
    """Decode side. Give `address` to senders; call expect() before a sender starts."""

    _role = "receiver"

    def __init__(self, kv_caches: Sequence[torch.Tensor], backend: str | Backend = "ucx",
                 options: TransferOptions | None = None,
                 on_result: ResultCallback | None = None,
                 on_fatal: FatalCallback | None = None,
                 on_release: ReleaseCallback | None = None) -> None:
        """on_release(req_id, blocks): held blocks of a failed request are the owner's again
        (progress thread, like on_result; see held_blocks())."""
        super().__init__(kv_caches, backend, options, on_result, on_fatal)
        o = self.options
        self._held: list[Held] = []
        self._dropping: int | None = None  # the peer _drop is dropping (it may live on)
        self._on_release = on_release
        self.landings_timed_out = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((o.host, o.port))
        except OSError as e:
            self._listener.close()
            self.backend.close()
            raise TransferError(f"KV receiver cannot listen on {o.host}:{o.port}: {e}") from e
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        host = o.advertise_host or (socket.gethostname() if o.host == "0.0.0.0" else o.host)
        self.address: bytes = encode_address(host, self.port, self.backend.name,
                                             self.backend.address())
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        self._reqs: dict[ReqId, RxReq] = {}
        self._tombs: OrderedDict[ReqId, str] = OrderedDict()  # recently failed: why
        self._msgs: list[RxMsg] = []
        self._next_conn = 1
        if o.peer_copy and self.layout.flat is not None and not self._cuda \
                and not peer_pool.share_cpu_pool(self.layout.flat):  # now, before it serves
            self.options = replace(o, peer_copy=False)
        self._thread.start()

    @property
    def address_str(self) -> str:
        return address_to_str(self.address)

    # ---- public API ------------------------------------------------------------------------
    def expect(self, req_id: ReqId, block_ids: Sequence[int], deadline_s: float | None = None) -> None:
        """Reserve-side call: blocks block_ids (in request order) will receive req_id's KV."""
        dst = self.layout.check_block_ids(block_ids, "destination")
        if len(np.unique(dst)) != len(dst):
            raise ValueError("destination block ids must be distinct")
        self._claim(req_id)
        self._submit(self._do_expect, req_id, dst, ids_to_bytes(dst),
                     deadline_s or self.options.deadline_s)

    def abort(self, req_id: ReqId, reason: str = "aborted by the receiver") -> None:
        """Give a request up; its sender is told; the result (ok=False) follows."""
        self._submit(self._do_abort, req_id, reason)

    # ---- commands ---------------------------------------------------------------------------
    def _do_expect(self, req_id: ReqId, dst: np.ndarray, dst_bytes: bytes,
                   deadline_s: float) -> None:
        now = time.monotonic()
        req = RxReq(req_id, dst, dst_bytes, now + deadline_s, time.perf_counter())
        if len(dst):
            # every peer that may copy into our pool may begin writing as soon as it begins
            # this request: no `go` round trip on its critical path. Each settles its grant
            # (its begin, or `unused` when we take it back); until then the blocks stay ours.
            for peer in self._peers.values():
                if peer.offered and peer.alive:
                    peer.conn.send_now({"t": "grant", "req": req_id})
                    req.granted.add(peer.id)
        req.index = self.layout.index(dst, self._copy_stream)
        mark("rx", "expect_index", req_id, len(dst))
        self._tombs.pop(req_id, None)
        self._reqs[req_id] = req

    def _do_abort(self, req_id: ReqId, reason: str) -> None:
        req = self._reqs.get(req_id)
        if req is not None:
            self._fail(req, reason, notify=True)

    # ---- control messages ---------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        pending = sum(1 for p in self._peers.values() if not p.ready)
        if pending >= self.options.max_pending_handshakes:
            log.warning("kv receiver: refusing %s: %d connections already in their handshake",
                        addr, pending)
            sock.close()
            return
        self._add_peer(ControlConn(sock, RECEIVER_HANDSHAKE,
                                   max_frame_bytes=self.options.max_frame_bytes))

    def _on_message(self, peer: Peer, msg: dict[str, Any]) -> None:
        t = msg["t"]
        mark("rx", "rx_" + t, msg.get("req"))
        if not peer.ready:
            self._on_hello(peer, msg)
            return
        req = self._reqs.get(msg.get("req"))
        if req is None and t == "begin":
            self._run_commands()  # an expect() that returned before the sender started
            req = self._reqs.get(msg.get("req"))
        if t == "begin":
            self._on_begin(peer, msg, req)
            return
        if t == "unused":
            if req is not None:
                req.granted.discard(peer.id)
            return
        if t == "end" and req is not None and peer.id in req.writers:
            self._on_direct_end(peer, req, msg)
            return
        if req is not None and req.peer is not None and req.peer is not peer:
            req = None  # another pair's request: never touch it
        if t == "data":
            live = req if req is not None and req.state == "active" else None
            rect = Rect(msg["l0"], msg["l1"], msg["b0"], msg["b1"])
            if msg["tag"] >> 32 != peer.conn_id:  # another pair's tag: never match its data
                raise ProtocolError(f"data tag {msg['tag']:#x} is not of this pair")
            if not (0 <= rect.l0 < rect.l1 <= self.layout.num_layers and 0 <= rect.b0 < rect.b1
                    and rect.rows <= self.staging.rows
                    and (live is None or rect.b1 <= len(live.dst))):
                raise ValueError(f"data header out of bounds: {msg}")
            peer.fifo.append(RxMsg(peer, live, msg["tag"], rect))
            if live is not None:
                live.inflight += 1
        elif t == "end" and req is not None and req.state == "active":
            req.ended, req.aux, req.ended_at = True, msg.get("aux"), time.monotonic()
        elif t == "abort" and req is not None:
            self._fail(req, f"aborted by the sender: {msg.get('why')}", notify=False)

    def _on_hello(self, peer: Peer, msg: dict[str, Any]) -> None:
        try:
            if not auth.receiver_step(self._secret, peer, msg):
                return
            if msg["t"] != "hello":
                raise TransferError(f"expected hello, got {msg['t']!r}")
            if msg.get("backend") != self.backend.name:
                raise TransferError(f"transfer backend mismatch: sender uses {msg.get('backend')!r}, "
                                    f"receiver uses {self.backend.name!r}")
            self.geometry.check_compatible(msg.get("geometry") or {})
            peer.handle = self.backend.connect(msg.get("addr", b""), msg.get("token", b""), False)
        except (TransferError, ValueError, RuntimeError) as e:
            kind = "geometry" if isinstance(e, GeometryMismatchError) else "refused"
            log.warning("kv receiver: refusing peer %d: %s", peer.id, e)
            peer.conn.send({"t": "error", "kind": kind, "why": str(e)})
            peer.conn.accept = frozenset()  # nothing more from it: it is closed once flushed
            peer.close_when_flushed = True
            return
        peer.conn_id = self._next_conn
        self._next_conn += 1
        peer.max_rows = min(self.staging.rows, int(msg.get("max_rows", self.staging.rows)))
        peer.ready = True
        peer.conn.accept = RECEIVER_READY
        welcome = {"t": "welcome", "conn": peer.conn_id, "max_rows": self.staging.rows}
        if self.options.peer_copy and self.layout.flat is not None \
                and msg.get("host") == peer_pool.host_id():
            try:
                welcome["pool"] = peer_pool.offer(self.layout.flat)
                peer.offered = True
            except Exception as e:  # the backend path still works
                log.warning("kv receiver: cannot share the pool with peer %d: %s", peer.id, e)
        if peer.offered and self._cuda and msg.get("events"):
            try:
                peer.events = peer_pool.open_events(msg["events"], self.device)
                welcome["events"] = True
            except Exception as e:  # its `end` then waits for its copies
                log.warning("kv receiver: cannot use peer %d's copy events: %s", peer.id, e)
        peer.conn.send(welcome)

    # ---- progress -------------------------------------------------------------------------------
    def _progress(self) -> None:
        if self._msgs:
            self._msgs = [m for m in self._msgs if not self._advance(m)]
        for peer in list(self._peers.values()):
            while peer.fifo and self.staging.free:
                self._post(peer.fifo.popleft())
        now = time.monotonic()
        for req in list(self._reqs.values()):
            if req.state in ("expected", "active") and now > req.deadline:
                self._fail(req, "deadline exceeded: the KV did not arrive in time" +
                           (" (the sender's last peer copy did not land; its blocks stay held)"
                            if req.landing is not None else ""))
            if req.landing is not None:  # a peer copy that may still be writing
                self._check_landing(req, now)
            held = req.granted | req.writers  # peers that may still write into our blocks
            if req.state == "active" and req.ended and req.inflight == 0 and not held and \
                    req.landing is None and req.rows_done == len(req.dst) * self.layout.num_layers:
                self._finish(req, None)
            elif req.state == "failed" and req.inflight == 0 and not held:
                if req.landing is not None:  # reported now, its blocks held until it lands
                    self._hold(req)
                self._finish(req, req.error)
            elif req.state == "failed" and now > req.failed_at + self.options.drain_timeout_s:
                self._drop(held | ({req.peer.id} if req.inflight and req.peer else set()), req)
            elif req.ended and req.granted and now > req.ended_at + self.options.drain_timeout_s:
                self._drop(req.granted, req)
        if self._held:
            self._poll_held()

    def _drop(self, peer_ids: set[int], req: RxReq) -> None:
        """Peers that did not settle what they owe of req in drain_timeout_s: the pair is
        broken (its data or its answer is lost); dropping it frees what it held."""
        for pid in list(peer_ids):
            if pid in self._peers:
                self._dropping = pid
                try:
                    self._peer_lost(self._peers[pid], f"in-flight data or grant of request "
                                    f"{req.req_id!r} did not settle in "
                                    f"{self.options.drain_timeout_s} s")
                finally:
                    self._dropping = None

    def _post(self, m: RxMsg) -> None:
        m.buf = self.staging.acquire()
        view = self.staging.view(m.buf, m.rect.rows)
        m.op = self.backend.post_recv(m.peer.handle, view, m.tag)
        mark("rx", "recv_posted", m.req.req_id if m.req else None, m.rect.rows)
        self._msgs.append(m)

    def _scatter(self, m: RxMsg) -> None:
        view = self.staging.view(m.buf, m.rect.rows)
        if self._copy_stream is None:
            self.layout.scatter(m.req.index, m.rect, view)
        else:  # the progress thread's current stream is the copy stream (see Endpoint._run)
            if m.op.event is not None:
                self._copy_stream.wait_event(m.op.event)
            g0 = gpu_begin()
            # the only message in flight (a pipeline's drain): every SM copies
            alone = len(self._msgs) <= 1 and not any(p.fifo for p in self._peers.values())
            self.layout.scatter(m.req.index, m.rect, view, self.layout.full_ctas if alone else None)
            gpu_end("rx", "scatter", m.req.req_id, g0)
            m.scatter_ev = torch.cuda.Event()
            m.scatter_ev.record(self._copy_stream)
        m.scattered = True
        mark("rx", "scatter_launched", m.req.req_id, m.rect.rows)

    def _advance(self, m: RxMsg) -> bool:
        """Move one message on; True once it is finished (buffer released)."""
        live = m.req is not None and m.req.state == "active"
        if live and not m.scattered and self.backend.stream_ordered and m.op.event is not None:
            self._scatter(m)  # chained after the recv on the GPU: no host round trip
        if m.error is None and not m.op.done:
            try:
                if not self.backend.poll(m.op):
                    return False
            except TransferError as e:
                m.error = str(e)
        if m.error is None and live and not m.scattered:
            self._scatter(m)
        if m.scatter_ev is not None and not m.scatter_ev.query():
            return False
        mark("rx", "msg_done", m.req.req_id if m.req else None)
        self.staging.release(m.buf)
        if m.error is not None and m.peer.alive:  # the pair is broken: drop it (and its requests)
            self._peer_lost(m.peer, f"transfer backend failed: {m.error}")
        if m.req is not None:
            m.req.inflight -= 1
            if m.error is not None:
                self._fail(m.req, f"receive failed: {m.error}")
            elif m.scattered:
                m.req.rows_done += m.rect.rows
                m.req.msgs_done += 1
        return True

    def _fail(self, req: RxReq, why: str, notify: bool = True) -> None:
        if req.state == "failed":
            return
        req.state, req.error, req.failed_at = "failed", why, time.monotonic()
        if notify and req.peer is not None and req.peer.alive:
            req.peer.conn.send({"t": "fail", "req": req.req_id, "why": why})
        self._revoke(req, why)
        for m in list(req.peer.fifo) if req.peer is not None else ():
            if m.req is req:  # not posted yet: will be drained, no longer counted
                m.req = None
                req.inflight -= 1

    def _finish(self, req: RxReq, error: str | None) -> None:
        mark("rx", "finish", req.req_id, error)
        del self._reqs[req.req_id]
        if req.peer is not None:
            req.peer.reqs.discard(req.req_id)
            if error is None and req.peer.alive:
                req.peer.conn.send({"t": "done", "req": req.req_id})
        if error is not None:
            self._tombs[req.req_id] = error
            while len(self._tombs) > 4096:
                self._tombs.popitem(last=False)
        nbytes = req.rows_done * self.layout.row_nbytes
        now = time.perf_counter()
        self._report(TransferResult(req.req_id, error is None, req.aux if error is None else None,
                                    error, nbytes, now - req.t0, now, req.msgs_done,
                                    "peer_copy" if req.direct else self.backend.name))

    def _on_peer_lost(self, peer: Peer, why: str) -> None:
        for m in peer.fifo:  # never posted: nothing to release, no longer in flight
            if m.req is not None:
                m.req.inflight -= 1
        peer.fifo.clear()
        for rid in list(peer.reqs):
            req = self._reqs.get(rid)
            if req is not None:
                self._fail(req, f"sender lost: {why}", notify=False)
        # its copies die with its process, but a sender we drop (stuck, say in a hung GPU
        # call) may live on: an event of its that has not fired stays held until it fires
        gone = self._dropping != peer.id
        for req in self._reqs.values():  # no `end` or `unused` will come from it; a copy it
            req.granted.discard(peer.id)  # launched ends within milliseconds
            req.writers.discard(peer.id)
            if req.peer is peer and gone:
                req.landing = None  # its event dies with it
        self._poll_held(lost_peer=peer.id if gone else None)

    def _busy(self) -> bool:
        return bool(self._msgs) or any(p.fifo for p in self._peers.values()) or \
            any(r.landing is not None for r in self._reqs.values())

    def _next_deadline(self) -> float | None:
        live = [r.deadline for r in self._reqs.values() if r.state in ("expected", "active")]
        return min(live) if live else None

    def _fail_all(self, why: str) -> None:
        for req in list(self._reqs.values()):
            req.state, req.error = "failed", req.error or why
            if req.landing is not None:
                self._hold(req)
            self._finish(req, req.error)
        if self._held:
            log.warning("kv receiver closed with %d blocks of %d requests still held: their "
                        "peer copies never landed", sum(len(h.blocks) for h in self._held),
                        len({h.req_id for h in self._held}))

    def _close_sockets(self) -> None:
        self._listener.close()
        super()._close_sockets()

"""The receiver's side of a request's begin and of peer copies (one host): grants, `go`,
and the holds that keep a request's blocks until no sender can write into them.

A grant (sent at expect() to each peer offered our pool) lets the sender that begins the
request write at once. Until every grant is settled (that peer's begin, or its `unused`
once we took the grant back), and every writer's `end` arrived (and, on GPU, the event it
names fired), the blocks stay the request's, whatever happened to it.

A landing that never fires (the sender's GPU or kernel hung after its `end`): the request
fails landing_timeout_s after that `end` (or at its deadline, or on abort) with a clear
error, and its result is reported then; its blocks are *held* (`held_blocks()`), not the
owner's, until the event fires or the pair ends (a sender whose process exits takes its
copies with its CUDA context); `on_release(req_id, blocks)` then gives them back. Not when
this receiver drops the pair itself (a grant or data not settled in drain_timeout_s: its
sender may be alive, stuck in the hung GPU): its events then have to fire. A sender that
closes the pair, or breaks the protocol, while its process lives on with a hung copy cannot
be told apart from one that exited. If neither ever happens, the blocks stay held for the
receiver's life (its owner serves with that many fewer blocks); every hold is logged (a
warning with the total held) and counted (`landings_timed_out`), and close() logs what it
leaves held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .common import ReqId
from .endpoint import Peer
from .receiver_state import Held, RxReq
from .schema import ProtocolError
from .trace import mark

log = logging.getLogger("pdserve.kvtransfer")
ReleaseCallback = Callable[[ReqId, list], None]


class DirectReceive:
    """KVReceiver's begin and peer copy methods (a mixin: they use its requests and peers)."""

    layout: Any
    options: Any
    _peers: dict[int, Peer]
    _tombs: Any
    _cond: threading.Condition
    _held: list[Held]
    _on_release: ReleaseCallback | None
    landings_timed_out: int  # requests failed because their peer copy's event never fired

    def held_blocks(self) -> dict[ReqId, list[int]]:
        """Blocks of reported (failed) requests that a sender's copy may still write, by
        request: not the owner's to reuse until on_release(req_id, blocks) gives them back.
        Checked from a failed result's callback, it already lists that request."""
        with self._cond:
            out: dict[ReqId, list[int]] = {}
            for h in self._held:
                out.setdefault(h.req_id, []).extend(h.blocks)
            return out

    def _on_begin(self, peer: Peer, msg: dict[str, Any], req: RxReq | None) -> None:
        rid = msg["req"]
        granted = req is not None and peer.id in req.granted
        if granted:
            req.granted.discard(peer.id)
        if msg.get("direct") and (granted and msg.get("granted") or
                                  req is not None and req.state == "expected"):
            # from its grant or our `go` on, our blocks are this sender's to write until its
            # `end` (halted after a failure): a failed request keeps them until then too
            req.direct = True
            req.writers.add(peer.id)
        if req is None or req.state != "expected":
            why = self._tombs.get(rid) or (f"request {rid!r} is not expected by this receiver"
                                           if req is None else f"request {rid!r} already begun")
            if req is not None and req.state == "active":  # two senders: neither is whole
                self._fail(req, f"request {rid!r} begun by a second sender")
            peer.conn.send({"t": "fail", "req": rid, "why": why})
            return
        req.peer, req.state = peer, "active"
        peer.reqs.add(rid)
        self._revoke(req, "begun by another sender")  # the others answer `unused`
        if msg["nblocks"] != len(req.dst):
            self._fail(req, f"sender has {msg['nblocks']} blocks, receiver reserved {len(req.dst)}")
        elif msg.get("dst") is not None and msg["dst"] != req.dst_bytes:
            self._fail(req, "sender's destination block ids differ from the reserved ones")
        elif req.direct and not (granted and msg.get("granted")):
            peer.conn.send_now({"t": "go", "req": rid})  # the sender waits for it

    def _on_direct_end(self, peer: Peer, req: RxReq, msg: dict[str, Any]) -> None:
        """A peer copy's `end`: every block is written (or, halted, none is being written)."""
        req.writers.discard(peer.id)
        if msg.get("halted"):
            self._fail(req, "the sender stopped the peer copy", notify=False)
        elif req.state == "active" and req.peer is peer:
            req.landing = self._landing_event(peer, msg)
            req.ended, req.aux, req.ended_at = True, msg.get("aux"), time.monotonic()
            req.rows_done = len(req.dst) * self.layout.num_layers
            req.msgs_done = msg.get("msgs", 1)

    def _landing_event(self, peer: Peer, msg: dict[str, Any]) -> Any:
        """The event an `end` names (its last copy may still run: done once it fired), or
        None (every copy is done). A seam: tests return an event that never fires."""
        if "ev" not in msg:
            return None
        if peer.events is None or msg["ev"] >= len(peer.events):
            raise ProtocolError(f"end names event {msg['ev']}, not one of this pair")
        return peer.events[msg["ev"]]

    def _check_landing(self, req: RxReq, now: float) -> None:
        """Poll an ended peer copy's event; fail the request once it is overdue (its blocks
        are then held by _hold, not given back)."""
        try:
            fired = bool(req.landing.query())
        except RuntimeError as e:  # the sender's event is gone with it: so is its copy
            self._fail(req, f"the sender's copy event failed: {e}", notify=False)
            fired = True
        if fired:
            mark("rx", "landed", req.req_id)
            req.landing = None
        elif req.state == "active" and now > req.ended_at + self.options.landing_timeout_s:
            self.landings_timed_out += 1
            self._fail(req, f"peer copy did not land: the sender's copy event did not fire "
                       f"within {self.options.landing_timeout_s:g} s of its end (a hung sender "
                       f"GPU?); the request's {len(req.dst)} blocks stay held until it fires "
                       "or the sender is gone")

    def _hold(self, req: RxReq) -> None:
        """A failed request about to be reported whose peer copy has not landed: keep its
        blocks out of the owner's hands (held_blocks) until _poll_held releases them."""
        h = Held(req.req_id, req.dst.tolist(), req.landing, req.peer.id, time.monotonic())
        req.landing = None
        with self._cond:
            self._held.append(h)
            total = sum(len(x.blocks) for x in self._held)
        log.warning("kv receiver: request %r failed while peer %d's copy into its %d blocks "
                    "may still run; they stay held until its event fires or the sender goes "
                    "(%d blocks held in all)", req.req_id, h.peer_id, len(h.blocks), total)

    def _poll_held(self, lost_peer: int | None = None) -> None:
        """Give back held blocks whose copy landed (or, lost_peer: whose sender is gone)."""
        for h in list(self._held):
            if h.peer_id == lost_peer:
                why = "the sender is gone"
            else:
                try:
                    if not h.landing.query():
                        continue
                    why = "its copy landed"
                except RuntimeError as e:
                    why = f"its copy event failed: {e}"
            with self._cond:
                self._held.remove(h)
            log.info("kv receiver: %d blocks of request %r released after %.1f s held: %s",
                     len(h.blocks), h.req_id, time.monotonic() - h.since, why)
            if self._on_release is not None:
                try:
                    self._on_release(h.req_id, h.blocks)
                except Exception:
                    log.exception("kv receiver: release callback raised")

    def _revoke(self, req: RxReq, why: str) -> None:
        """Take back the grants not settled yet (each such peer answers `unused`, or, had it
        begun, its begin and `end` are on their way)."""
        for pid in req.granted:
            peer = self._peers.get(pid)
            if peer is not None and peer.alive:
                peer.conn.send({"t": "fail", "req": req.req_id, "why": why})

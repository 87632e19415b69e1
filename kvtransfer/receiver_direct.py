"""The receiver's side of a request's begin and of peer copies (one host): grants, `go`,
and the holds that keep a request's blocks until no sender can write into them.

A grant (sent at expect() to each peer offered our pool) lets the sender that begins the
request write at once. Until every grant is settled (that peer's begin, or its `unused`
once we took the grant back), and every writer's `end` arrived (and, on GPU, the event it
names fired), the blocks stay the request's, whatever happened to it.
"""

from __future__ import annotations

import time
from typing import Any

from .endpoint import Peer
from .receiver_state import RxReq
from .schema import ProtocolError


class DirectReceive:
    """KVReceiver's begin and peer copy methods (a mixin: they use its requests and peers)."""

    layout: Any
    _peers: dict[int, Peer]
    _tombs: Any

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
            if "ev" in msg:  # its last copy may still run: done once this event fired
                if peer.events is None or msg["ev"] >= len(peer.events):
                    raise ProtocolError(f"end names event {msg['ev']}, not one of this pair")
                req.landing = peer.events[msg["ev"]]
            req.ended, req.aux, req.ended_at = True, msg.get("aux"), time.monotonic()
            req.rows_done = len(req.dst) * self.layout.num_layers
            req.msgs_done = msg.get("msgs", 1)

    def _landed(self, req: RxReq) -> bool:
        try:
            return req.landing.query()
        except RuntimeError as e:  # the sender's event is gone with it: so is its copy
            self._fail(req, f"the sender's copy event failed: {e}", notify=False)
            return True

    def _revoke(self, req: RxReq, why: str) -> None:
        """Take back the grants not settled yet (each such peer answers `unused`, or, had it
        begun, its begin and `end` are on their way)."""
        for pid in req.granted:
            peer = self._peers.get(pid)
            if peer is not None and peer.alive:
                peer.conn.send({"t": "fail", "req": req.req_id, "why": why})

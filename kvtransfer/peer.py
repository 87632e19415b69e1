"""One control connection of an endpoint (Peer), and the progress thread's timer setting."""

from __future__ import annotations

import ctypes
import selectors
import sys
import time
from collections import OrderedDict, deque
from typing import Any

import torch

from .common import ReqId
from .control import ControlConn


def fine_timers() -> None:
    """This thread's sleeps end when asked (Linux timer slack 1 us, not 50): its select()
    timeout is the poll interval while copies are in flight, so the slack would add half
    of it to noticing each one's end. Elsewhere, or if refused, nothing changes."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK
        except (OSError, AttributeError):
            pass


class Peer:
    """One control connection to another endpoint, and the backend connection beside it."""

    def __init__(self, pid: int, conn: ControlConn) -> None:
        self.id = pid
        self.conn = conn
        self.handle: Any = None  # backend peer
        self.alive = True
        self.ready = False  # handshake done
        self.conn_id = 0  # tag prefix of this pair (assigned by the receiver)
        self.seq = 0  # messages sent on this pair (tag suffix)
        self.max_rows = 0  # largest message both sides can stage
        self.reqs: set[ReqId] = set()
        self.fifo: deque[Any] = deque()  # receiver: data headers waiting for staging, in order
        self.key: bytes | None = None  # sender: the address it was opened with
        self.pool: torch.Tensor | None = None  # sender: the receiver's pool, mapped (peer copy)
        self.pool_blocks = 0  # blocks a layer in that pool
        self.grants: OrderedDict[ReqId, None] = OrderedDict()  # sender: not begun yet
        self.offered = False  # receiver: this peer was offered our pool (it gets grants)
        self.ring: Any = None  # sender: its peer_pool.EventRing, the receiver opened it
        self.events: list[Any] | None = None  # receiver: the sender's ring, opened here
        self.close_when_flushed = False
        self.mask = selectors.EVENT_READ
        self.opened_at = time.monotonic()
        self.nonce: bytes | None = None  # receiver: this side's handshake nonce
        self.peer_nonce: bytes | None = None  # receiver: the sender's handshake nonce

"""The receiver's state of one request (RxReq), of one data message (RxMsg), and of the
blocks of a failed request that a peer copy may still write (Held)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .backend import Op
from .common import ReqId
from .endpoint import Peer
from .pack import Rect


@dataclass(eq=False)
class RxReq:
    req_id: ReqId
    dst: np.ndarray  # int64 block ids
    dst_bytes: bytes  # as a begin carries them
    deadline: float
    t0: float
    index: torch.Tensor | None = None
    peer: Peer | None = None
    state: str = "expected"  # expected -> active -> (reported) | failed
    rows_done: int = 0
    msgs_done: int = 0
    inflight: int = 0
    ended: bool = False
    aux: dict | None = None
    error: str | None = None
    failed_at: float = 0.0
    direct: bool = False  # the sender writes into our blocks itself (peer copy)
    # Peer copy holds, by peer id; the blocks are ours again once both are empty:
    granted: set[int] = field(default_factory=set)  # offered the blocks, not settled yet
    writers: set[int] = field(default_factory=set)  # may write into them until their `end`
    ended_at: float = 0.0
    landing: torch.cuda.Event | None = None  # the sender's event after its last copy


@dataclass(eq=False)
class RxMsg:
    peer: Peer
    req: RxReq | None  # None: drained (unknown/failed request)
    tag: int
    rect: Rect
    buf: int = -1
    op: Op | None = None
    scatter_ev: torch.cuda.Event | None = None
    scattered: bool = False
    error: str | None = None


@dataclass(eq=False)
class Held:
    """A reported (failed) request's blocks that the sender's last copy may still write:
    not the owner's until `landing` fired or peer `peer_id` is gone (receiver_direct.py)."""

    req_id: ReqId
    blocks: list[int]
    landing: Any  # the sender's event (anything with query())
    peer_id: int
    since: float  # time.monotonic() when it was held

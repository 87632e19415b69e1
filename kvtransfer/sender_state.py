"""The sender's state of one request (TxReq) and of one message or peer copy in flight (TxMsg)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .backend import Op
from .common import ReqId
from .endpoint import Peer


@dataclass(eq=False)
class TxReq:
    req_id: ReqId
    peer: Peer
    src: np.ndarray  # int64 block ids
    dst: np.ndarray | None
    deadline: float
    t0: float
    layerwise: bool
    ready: list[bool]
    events: dict[int, Any] = field(default_factory=dict)
    index: torch.Tensor | None = None
    dindex: torch.Tensor | None = None  # peer copy: destination rows in the peer's pool
    go: bool = False  # peer copy: the receiver holds the blocks for us (grant or `go`)
    ready_prefix: int = 0
    layer_pos: int = 0
    block_pos: int = 0
    k: int = 0  # messages cut so far
    inflight: int = 0
    finished: bool = False
    aux: dict | None = None
    state: str = "active"  # active -> ended (end sent) -> acked/reported | failed
    acked: bool = False
    error: str | None = None
    failed_at: float = 0.0
    nbytes: int = 0
    slot: int | None = None  # peer copy: the pair's event its `end` named (peer_pool.EventRing)


@dataclass(eq=False)
class TxMsg:
    req: TxReq
    buf: int  # -1: a peer copy (no staging buffer)
    op: Op | None = None
    copied: Any = None  # a peer copy's CUDA event (None on CPU: done when launched)

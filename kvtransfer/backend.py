"""Transfer backend API (the same small surface for every backend) and its registry.

A backend moves one contiguous tensor per message between two peers. It knows nothing of
requests, blocks or layers; the endpoints (sender.py, receiver.py) build those on top.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch


class Op:
    """One posted send or recv.

    `event` is set by stream-ordered backends once the op is enqueued on the backend's CUDA
    stream: work that depends on the op (a scatter after a recv) may wait on it on the GPU
    without a host round trip. `error` holds the failure text once poll() raised.
    """

    __slots__ = ("peer", "tensor", "tag", "nbytes", "event", "error", "done")

    def __init__(self, peer: Any, tensor: torch.Tensor, tag: int) -> None:
        self.peer = peer
        self.tensor = tensor  # keeps the buffer alive while the op is in flight
        self.tag = tag
        self.nbytes = tensor.numel() * tensor.element_size()
        self.event: torch.cuda.Event | None = None
        self.error: str | None = None
        self.done = False


class Backend(ABC):
    """Point-to-point tensor transport between this process and its peers.

    Lifecycle: address() is advertised to peers; the side that opens the control connection
    (the initiator, the KV sender) calls new_token() and sends it with its address; then
    both sides call connect(peer_address, token, initiator) and may post ops at once (a
    backend queues them until the connection is up). Ops to one peer complete in posting
    order on stream-ordered backends; tags match sends to recvs on tag-matching backends,
    and the endpoints use the same tag on both sides either way.

    All methods except address()/new_token() are called from one thread (the endpoint's
    progress thread); they never block for long.
    """

    name: str = ""
    stream_ordered: bool = False  # True: ops run on CUDA streams and set Op.event

    @abstractmethod
    def address(self) -> bytes:
        """This endpoint's address, what a peer needs to reach it (may be empty)."""

    def new_token(self) -> bytes:
        """Out-of-band data the initiator creates for one new connection (NCCL unique id)."""
        return b""

    @abstractmethod
    def connect(self, peer_address: bytes, token: bytes, initiator: bool) -> Any:
        """Start a connection to a peer; returns an opaque peer handle at once."""

    @abstractmethod
    def post_send(self, peer: Any, tensor: torch.Tensor, tag: int,
                  after: torch.cuda.Event | None = None) -> Op:
        """Post an async send of a contiguous tensor; `after`: start only once it fired."""

    @abstractmethod
    def post_recv(self, peer: Any, tensor: torch.Tensor, tag: int) -> Op:
        """Post an async receive into a contiguous tensor of exactly the sent size."""

    @abstractmethod
    def poll(self, op: Op) -> bool:
        """True once the op completed; raises TransferError if it failed. Never blocks."""

    @abstractmethod
    def abort(self, peer: Any) -> None:
        """Tear a peer's connection down; its pending ops then fail (poll raises)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; the backend is unusable afterwards."""


_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "ucx": "pdserve.kvtransfer.ucx:UcxBackend",
    "nccl": "pdserve.kvtransfer.nccl:NcclBackend",
}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Register a backend factory `factory(device=torch.device, **kwargs) -> Backend`."""
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, device: torch.device, **kwargs: Any) -> Backend:
    """Instantiate a registered backend (imported lazily: ucxx and libnccl are optional)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown transfer backend {name!r}; choose from {backend_names()}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry(device=device, **kwargs)

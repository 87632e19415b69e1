"""NCCL backend: one 2-rank non-blocking communicator per peer pair, over our pynccl binding.

The initiator (the KV sender, rank 0) creates the unique id; it travels over the control
channel and the receiver joins as rank 1. Communicators are non-blocking (config
blocking=0): no call hangs the progress thread, and abort (ncclCommAbort) always returns.
Every op of a pair goes on that pair's own CUDA stream, in posting order; completion is a
CUDA event recorded after the op (Op.event), so dependent GPU work never waits on the host.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext

import torch

from .backend import Backend, Op
from .common import TransferError
from .pynccl import NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclLibrary, default_library
from .trace import gpu_begin, gpu_end

HIGH_PRIORITY = -1  # CUDA stream priority: lower is higher; -1 is valid on every device


class _NcclOp(Op):
    __slots__ = ("is_send", "after")


class _NcclPeer:
    __slots__ = ("comm", "rank", "other", "stream", "busy", "pending", "queue", "error", "aborted")

    def __init__(self, comm: int, rank: int, stream: torch.cuda.Stream, busy: bool) -> None:
        self.comm = comm
        self.rank = rank
        self.other = 1 - rank
        self.stream = stream
        self.busy = busy  # the last call returned ncclInProgress: no new call until success
        self.pending: _NcclOp | None = None  # op whose enqueue is still in progress
        self.queue: deque[_NcclOp] = deque()  # posted, not yet handed to NCCL
        self.error: str | None = None
        self.aborted = False


class NcclBackend(Backend):
    """Point-to-point over NCCL send/recv between two GPUs (any transport NCCL picks)."""

    name = "nccl"
    stream_ordered = True
    trace_role = "nccl"  # how PDSERVE_KV_TRACE names this backend's ops (kvtransfer/trace.py)

    def __init__(self, device: torch.device, library: NcclLibrary | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the nccl backend needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lib = library or default_library()
        self._peers: list[_NcclPeer] = []

    def address(self) -> bytes:
        return b""  # NCCL peers meet through the unique id sent over the control channel

    def new_token(self) -> bytes:
        return self.lib.get_unique_id()

    def connect(self, peer_address: bytes, token: bytes, initiator: bool) -> _NcclPeer:
        rank = 0 if initiator else 1
        with torch.cuda.device(self.device):
            comm, res = self.lib.comm_init_rank(2, token, rank, blocking=False)
            # high priority: when the gather/scatter and this pair's send/recv kernels wait
            # for SMs together, the send/recv is scheduled first (the wire must not idle)
            stream = torch.cuda.Stream(self.device, priority=HIGH_PRIORITY)
        peer = _NcclPeer(comm, rank, stream, busy=res == NCCL_IN_PROGRESS)
        self._peers.append(peer)
        return peer

    def _new_op(self, peer: _NcclPeer, tensor: torch.Tensor, tag: int, is_send: bool,
                after: torch.cuda.Event | None) -> _NcclOp:
        if not tensor.is_cuda or not tensor.is_contiguous():
            raise ValueError("the nccl backend needs contiguous CUDA tensors")
        op = _NcclOp(peer, tensor, tag)
        op.is_send, op.after = is_send, after
        peer.queue.append(op)
        self._pump(peer)
        return op

    def post_send(self, peer: _NcclPeer, tensor: torch.Tensor, tag: int,
                  after: torch.cuda.Event | None = None) -> Op:
        return self._new_op(peer, tensor, tag, True, after)

    def post_recv(self, peer: _NcclPeer, tensor: torch.Tensor, tag: int) -> Op:
        return self._new_op(peer, tensor, tag, False, None)

    # ---- internals ----------------------------------------------------------------------
    def _record(self, peer: _NcclPeer, op: _NcclOp) -> None:
        ev = torch.cuda.Event()
        ev.record(peer.stream)
        op.event = ev

    def _fail_peer(self, peer: _NcclPeer, why: str) -> None:
        if peer.error is None:
            peer.error = why
        if not peer.aborted:
            peer.aborted = True
            self.lib.comm_abort(peer.comm)  # kernels of this comm exit; events then fire
        while peer.queue:
            op = peer.queue.popleft()
            op.error = peer.error
        if peer.pending is not None:
            peer.pending.error = peer.error
            peer.pending = None

    def _ready(self, peer: _NcclPeer) -> bool:
        if peer.error is not None:
            return False
        if peer.busy:
            state = self.lib.comm_get_async_error(peer.comm)
            if state == NCCL_IN_PROGRESS:
                return False
            if state != NCCL_SUCCESS:
                self._fail_peer(peer, f"NCCL communicator error: {self.lib.error_string(state)}")
                return False
            peer.busy = False
            if peer.pending is not None:  # its enqueue finished: now it is on the stream
                self._record(peer, peer.pending)
                peer.pending = None
        return True

    def _pump(self, peer: _NcclPeer) -> None:
        if not self._ready(peer) or not peer.queue:  # _ready also finishes a pending enqueue
            return
        idx = self.device.index
        with torch.cuda.device(idx) if torch.cuda.current_device() != idx else nullcontext():
            while peer.queue and self._ready(peer):
                op = peer.queue.popleft()
                if op.after is not None:
                    peer.stream.wait_event(op.after)
                    op.after = None
                fn = self.lib.send if op.is_send else self.lib.recv
                g0 = gpu_begin(peer.stream)
                res = fn(op.tensor.data_ptr(), op.nbytes, peer.other, peer.comm,
                         peer.stream.cuda_stream)
                gpu_end(self.trace_role, "send" if op.is_send else "recv", op.nbytes, g0, peer.stream)
                if res == NCCL_SUCCESS:
                    self._record(peer, op)
                elif res == NCCL_IN_PROGRESS:
                    peer.busy, peer.pending = True, op
                else:
                    what = "ncclSend" if op.is_send else "ncclRecv"
                    op.error = f"{what} failed: {self.lib.error_string(res)}"
                    self._fail_peer(peer, op.error)

    def poll(self, op: Op) -> bool:
        assert isinstance(op, _NcclOp)
        if op.done:
            return True
        peer: _NcclPeer = op.peer
        self._pump(peer)
        if op.event is not None and not op.event.query():
            if peer.error is None and not peer.busy:
                state = self.lib.comm_get_async_error(peer.comm)
                if state not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                    self._fail_peer(peer, f"NCCL async error: {self.lib.error_string(state)}")
            return False  # even a failed op is done only when its kernel has exited
        if op.event is None and op.error is None and peer.error is None:
            return False  # still queued or being enqueued
        op.done = True
        err = op.error or peer.error
        if err is not None:
            op.error = err
            raise TransferError(err)
        return True

    def abort(self, peer: _NcclPeer) -> None:
        self._fail_peer(peer, peer.error or "connection aborted")

    def close(self) -> None:
        for peer in self._peers:
            if not peer.aborted:
                peer.aborted = True
                self.lib.comm_abort(peer.comm)
        self._peers.clear()

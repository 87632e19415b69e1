"""UCX backend on ucxx (core API): one worker with its own progress thread, tagged messages.

Host tensors go as numpy views, CUDA tensors through the CUDA array interface. UCX is not
stream-ordered: a send whose data is produced on a CUDA stream is posted once the producing
event has fired (checked in poll(), never waited on).
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import Backend, Op
from .common import TransferError


def _set_cuda_device(index: int) -> None:  # runs first thing on ucxx's progress thread
    torch.cuda.set_device(index)


class _UcxPeer:
    __slots__ = ("ep", "closed")

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.closed = False


class _UcxOp(Op):
    __slots__ = ("req", "after", "arr", "is_send")


class UcxBackend(Backend):
    """ucxx worker + endpoints created from worker addresses (the address is the worker's)."""

    name = "ucx"
    stream_ordered = False

    def __init__(self, device: torch.device, polling: bool = False,
                 close_timeout_s: float = 0.1) -> None:
        import ucxx  # noqa: F401  (loads libucx and applies ucxx's UCX defaults)
        from ucxx._lib import libucxx as ucx_api
        from ucxx._lib.arr import Array

        self._api = ucx_api
        self._array = Array
        self.device = torch.device(device)
        self._close_timeout_ns = int(close_timeout_s * 1e9)
        # ucxx itself exports UCX_MEMTYPE_CACHE, which this UCX no longer knows: no warning
        self._ctx = ucx_api.UCXContext({"WARN_UNUSED_ENV_VARS": "n"})
        self._worker = ucx_api.UCXWorker(self._ctx)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._worker.set_progress_thread_start_callback(_set_cuda_device, cb_args=(index,))
        # blocking (epoll) progress: no core burnt while idle; polling=True trades a core
        # for lower latency
        self._worker.start_progress_thread(polling_mode=polling, epoll_timeout=1)
        self._peers: list[_UcxPeer] = []
        self._closed = False

    def address(self) -> bytes:
        return self._worker.address.tobytes()

    def connect(self, peer_address: bytes, token: bytes, initiator: bool) -> _UcxPeer:
        addr = self._api.UCXAddress.create_from_buffer(peer_address)
        ep = self._worker.create_endpoint_from_worker_address(addr, True)
        peer = _UcxPeer(ep)
        self._peers.append(peer)
        return peer

    def _buffer(self, tensor: torch.Tensor) -> Any:
        if not tensor.is_contiguous():
            raise ValueError("UCX backend needs contiguous tensors")
        flat = tensor.reshape(-1).view(torch.uint8)
        return self._array(flat if flat.is_cuda else flat.numpy())

    def _new_op(self, peer: _UcxPeer, tensor: torch.Tensor, tag: int, is_send: bool) -> _UcxOp:
        op = _UcxOp(peer, tensor, tag)
        op.req, op.after, op.arr, op.is_send = None, None, None, is_send
        return op

    def _issue(self, op: _UcxOp) -> None:
        peer: _UcxPeer = op.peer
        if peer.closed:
            raise TransferError("UCX endpoint closed")
        op.arr = self._buffer(op.tensor)
        tag = self._api.UCXXTag(op.tag)
        op.req = peer.ep.tag_send(op.arr, tag) if op.is_send else peer.ep.tag_recv(op.arr, tag)

    def post_send(self, peer: _UcxPeer, tensor: torch.Tensor, tag: int,
                  after: torch.cuda.Event | None = None) -> Op:
        op = self._new_op(peer, tensor, tag, True)
        op.after = after
        if after is None or after.query():
            op.after = None
            self._guarded_issue(op)
        return op

    def post_recv(self, peer: _UcxPeer, tensor: torch.Tensor, tag: int) -> Op:
        op = self._new_op(peer, tensor, tag, False)
        self._guarded_issue(op)
        return op

    def _guarded_issue(self, op: _UcxOp) -> None:
        try:
            self._issue(op)
        except Exception as e:  # surfaced by the next poll(), like any other failure
            op.error = f"UCX post failed: {e}"

    def poll(self, op: Op) -> bool:
        assert isinstance(op, _UcxOp)
        if op.done:
            return True
        if op.error is None and op.req is None:  # a send waiting for its producer event
            if op.peer.closed:
                op.error = "UCX endpoint closed before the send was posted"
            elif op.after is not None and not op.after.query():
                return False
            else:
                op.after = None
                self._guarded_issue(op)
        if op.error is None:
            if not op.req.completed:
                return False
            try:
                op.req.check_error()
            except Exception as e:
                op.error = f"UCX {'send' if op.is_send else 'recv'} failed: {type(e).__name__}: {e}"
        op.done = True
        op.req = op.arr = None
        if op.error is not None:
            raise TransferError(op.error)
        return True

    def abort(self, peer: _UcxPeer) -> None:
        if peer.closed:
            return
        peer.closed = True
        try:  # cancels the endpoint's in-flight requests, so their poll() completes
            peer.ep.close_blocking(self._close_timeout_ns, 1)
        except Exception:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in self._peers:
            self.abort(peer)
        self._peers.clear()
        self._worker.stop_progress_thread()

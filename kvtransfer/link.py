"""Binds a worker's KV pool to the transfer layer, with one completion callback per request.

Callbacks run on the transfer endpoint's progress thread and must only hand work on.
`on_fatal(why)` runs once if that thread dies: the worker must stop serving (worker/core.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from .common import TransferConfig, TransferOptions, TransferResult
from .receiver import KVReceiver
from .sender import KVSender


def _options(cfg: TransferConfig, kv_caches: Sequence[torch.Tensor], host: str,
             advertise_host: str | None) -> TransferOptions:
    # A staging buffer never needs to exceed the whole pool; small pools get small buffers.
    pool_bytes = sum(t.numel() * t.element_size() for t in kv_caches)
    layer_block_bytes = kv_caches[0][0].numel() * kv_caches[0].element_size()
    staging = max(layer_block_bytes, min(cfg.staging_bytes, pool_bytes // 4))
    return TransferOptions(staging_bytes=staging, layerwise=cfg.layerwise,
                           deadline_s=cfg.timeout_s, host=host, secret=cfg.secret,
                           peer_copy=cfg.peer_copy,
                           peer_copy_during_forward=cfg.peer_copy_during_forward,
                           landing_timeout_s=cfg.landing_timeout_s,
                           advertise_host=advertise_host)


class _Callbacks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cbs: dict[str, Callable[[TransferResult], None]] = {}

    def put(self, req_id: str, cb: Callable[[TransferResult], None]) -> None:
        with self._lock:
            self._cbs[req_id] = cb

    def fire(self, r: TransferResult) -> None:
        with self._lock:
            cb = self._cbs.pop(str(r.req_id), None)
        if cb is not None:
            cb(r)


class SenderLink:
    """Prefill side."""

    def __init__(self, cfg: TransferConfig, kv_caches: Sequence[torch.Tensor], host: str,
                 advertise_host: str | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self._cbs = _Callbacks()
        self.sender = KVSender(
            kv_caches, cfg.backend, _options(cfg, kv_caches, host, advertise_host),
            on_result=self._cbs.fire, on_fatal=on_fatal)

    def connect(self, address: bytes) -> None:
        """Open the pair ahead of time (blocks for the handshake; raises on mismatch)."""
        self.sender.connect(address)

    def connected(self, address: bytes) -> bool:
        """The pair to `address` is open (connect() would return at once)."""
        return self.sender.connected(address)

    def start(self, req_id: str, address: bytes, src: list[int], dst: list[int],
              deadline_s: float, on_done: Callable[[str, str | None, int], None]) -> None:
        """on_done(req_id, error or None, bytes sent) runs once, on the progress thread."""
        self._cbs.put(req_id, lambda r: on_done(req_id, None if r.ok else (r.error or "failed"),
                                                r.nbytes))
        try:
            self.sender.start(req_id, address, src, dst, deadline_s)
        except Exception as exc:  # report like any other failure
            self._cbs.fire(TransferResult(req_id=req_id, ok=False, error=str(exc)))

    def layer_ready(self, req_id: str, layer: int) -> None:
        self.sender.layer_ready(req_id, layer)

    def finish(self, req_id: str, aux: dict) -> None:
        self.sender.finish(req_id, aux)

    def abort(self, req_id: str) -> None:
        try:
            self.sender.abort(req_id)
        except Exception:  # closed: nothing left to abort
            pass

    def close(self) -> None:
        self.sender.close()


class ReceiverLink:
    """Decode side.

    A request's blocks are the owner's again at its on_done, except for a failed request
    that held_blocks() lists at that moment (a peer copy into them may still run): those
    only once on_release(req_id, blocks) runs (progress thread, like on_done; see
    KVReceiver). After abort() an on_done still follows, within the transfer's deadline
    or drain timeout, or at close()."""

    def __init__(self, cfg: TransferConfig, kv_caches: Sequence[torch.Tensor], host: str,
                 advertise_host: str | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 on_release: Callable[[str, list[int]], None] | None = None) -> None:
        self._cbs = _Callbacks()
        self.receiver = KVReceiver(
            kv_caches, cfg.backend, _options(cfg, kv_caches, host, advertise_host),
            on_result=self._cbs.fire, on_fatal=on_fatal,
            on_release=None if on_release is None else
            lambda rid, blocks: on_release(str(rid), list(blocks)))
        self.address: bytes = self.receiver.address

    def held_blocks(self) -> dict[str, list[int]]:
        """Blocks of failed requests a peer copy may still write, by request id: not the
        owner's until on_release gives them back. From a failed on_done it lists that one."""
        return {str(k): v for k, v in self.receiver.held_blocks().items()}

    def expect(self, req_id: str, block_ids: list[int], deadline_s: float,
               on_done: Callable[[str, dict | None, str | None], None]) -> None:
        self._cbs.put(req_id, lambda r: on_done(req_id, r.aux if r.ok else None,
                                                None if r.ok else (r.error or "failed")))
        self.receiver.expect(req_id, block_ids, deadline_s)

    def abort(self, req_id: str) -> None:
        try:
            self.receiver.abort(req_id)
        except Exception:
            pass

    def close(self) -> None:
        self.receiver.close()


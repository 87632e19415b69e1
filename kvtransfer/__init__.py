"""KV-cache transfer between prefill and decode workers.

Prefill side: `KVSender(kv_caches, backend).start(req, address, src_blocks)`, then
`layer_ready(req, layer)` as layers are written and `finish(req, aux)`; decode side:
`KVReceiver(kv_caches, backend)`, `address` for the coordinator, `expect(req, dst_blocks)`.
Both report `TransferResult`s through poll()/wait()/a callback. Backends: "ucx", "nccl".
"""

from __future__ import annotations

from . import peer_pool
from .backend import Backend, Op, backend_names, create_backend, register_backend
from .common import (
    SCHEMA_VERSION,
    GeometryMismatchError,
    KVGeometry,
    ReqId,
    TransferError,
    TransferOptions,
    TransferResult,
)
from .control import address_to_str, decode_address
from .receiver import KVReceiver
from .sender import KVSender

__all__ = [
    "Backend", "Op", "backend_names", "create_backend", "register_backend",
    "SCHEMA_VERSION", "GeometryMismatchError", "KVGeometry", "ReqId", "TransferError",
    "TransferOptions", "TransferResult", "address_to_str", "decode_address",
    "KVReceiver", "KVSender", "peer_pool",
]

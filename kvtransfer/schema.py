"""What a control message may contain: one schema per message type, checked before use.

A peer's message is accepted only if its type is one this side expects at this point of the
conversation and every field it uses has the right type and lies within its limits; anything
else raises ProtocolError (the endpoint then drops that peer and keeps serving the others).
Unknown extra fields are ignored. Limits bound what a peer can make this side allocate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import peer_pool
from .common import TransferError

MAX_ID_CHARS = 256  # request ids
MAX_TEXT_CHARS = 4096  # reasons
MAX_ADDR_BYTES = 64 << 10  # a backend's address (a UCX worker address is ~1 KiB)
MAX_TOKEN_BYTES = 4096  # a backend's connection token (an NCCL unique id is 128 bytes)
MAX_BLOCKS = 1 << 22  # blocks of one request
MAX_DIM = 1 << 20  # layers, block size, heads, head_dim
NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
_U32, _I64, _U64 = (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1

Check = Callable[[Any], bool]


class ProtocolError(TransferError):
    """A peer sent a message this side does not accept (malformed, oversized, out of turn)."""


def _int(lo: int, hi: int) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _str(max_chars: int) -> Check:
    return lambda v: type(v) is str and len(v) <= max_chars


def _bytes(max_bytes: int, exact: bool = False) -> Check:
    return lambda v: type(v) is bytes and (len(v) == max_bytes if exact else len(v) <= max_bytes)


def _req(v: Any) -> bool:
    return (type(v) is int and -_I64 - 1 <= v <= _I64) or (type(v) is str and len(v) <= MAX_ID_CHARS)


def _block_ids(v: Any) -> bool:  # little-endian uint32 each (pack.ids_to_bytes): O(1) to check
    return v is None or (type(v) is bytes and len(v) <= 4 * MAX_BLOCKS and len(v) % 4 == 0)


def _handles(v: Any) -> bool:  # a sender's interprocess events (peer_pool.EventRing)
    return type(v) is list and len(v) <= peer_pool.EVENTS and all(
        type(h) is bytes and len(h) <= peer_pool.MAX_EVENT_HANDLE for h in v)


def _bool(v: Any) -> bool:
    return type(v) is bool


def _aux(v: Any) -> bool:  # the serving layer's data: a small map with str keys (or nothing)
    return v is None or (type(v) is dict and all(type(k) is str for k in v))


_GEOMETRY: dict[str, Check] = {
    "num_layers": _int(1, MAX_DIM), "block_size": _int(1, MAX_DIM),
    "num_kv_heads": _int(1, MAX_DIM), "head_dim": _int(1, MAX_DIM), "dtype": _str(32),
}


def _geometry(v: Any) -> bool:
    return type(v) is dict and all(k in v and ok(v[k]) for k, ok in _GEOMETRY.items())


_ROWS = _int(1, _U32)
_LAYER = _int(0, MAX_DIM)
_BLOCK = _int(0, MAX_BLOCKS)
_WHY = _str(MAX_TEXT_CHARS)
_NONCE = _bytes(NONCE_BYTES, exact=True)
_MAC = _bytes(MAC_BYTES, exact=True)

# type -> {field: (check, required)}
SCHEMAS: dict[str, dict[str, tuple[Check, bool]]] = {
    # sender -> receiver
    "auth": {"nonce": (_NONCE, True), "mac": (_MAC, False)},  # and receiver -> sender (mac)
    "hello": {"geometry": (_geometry, True), "backend": (_str(32), True),
              "addr": (_bytes(MAX_ADDR_BYTES), True), "token": (_bytes(MAX_TOKEN_BYTES), True),
              "max_rows": (_ROWS, False), "mac": (_MAC, False),
              "host": (_str(MAX_TEXT_CHARS), False),  # peer copy offered on the same host
              "events": (_handles, False)},  # ... and `end` may name one of these
    "begin": {"req": (_req, True), "nblocks": (_BLOCK, True), "dst": (_block_ids, False),
              "direct": (_bool, False),  # the sender writes into the pool itself
              "granted": (_bool, False)},  # ... already, under the receiver's grant
    "unused": {"req": (_req, True)},  # a grant this sender did not use and never will
    "data": {"req": (_req, True), "tag": (_int(0, _U64), True), "l0": (_LAYER, True),
             "l1": (_LAYER, True), "b0": (_BLOCK, True), "b1": (_BLOCK, True)},
    "end": {"req": (_req, True), "aux": (_aux, False), "msgs": (_int(0, _U32), False),
            "halted": (_bool, False),  # halted: a failed peer copy writes no more
            "ev": (_int(0, peer_pool.EVENTS - 1), False)},  # ... once this event fired
    "abort": {"req": (_req, True), "why": (_WHY, False)},
    # receiver -> sender
    "welcome": {"conn": (_int(1, _U32), True), "max_rows": (_ROWS, True),
                "pool": (peer_pool.check, False), "events": (_bool, False)},
    "error": {"kind": (_str(32), False), "why": (_WHY, False)},
    "done": {"req": (_req, True)},
    "go": {"req": (_req, True)},  # a peer copy may write into the reserved blocks now
    "grant": {"req": (_req, True)},  # ... may, once its sender begins it (sent at expect())
    "fail": {"req": (_req, True), "why": (_WHY, False)},
}

# What each side accepts, before and after its handshake.
RECEIVER_HANDSHAKE = frozenset({"auth", "hello"})
RECEIVER_READY = frozenset({"begin", "data", "end", "abort", "unused"})
SENDER_HANDSHAKE = frozenset({"auth", "welcome", "error"})
SENDER_READY = frozenset({"done", "fail", "go", "grant"})


def validate(msg: dict[str, Any], accept: frozenset[str]) -> dict[str, Any]:
    """msg (already a map with a known schema version) if it is acceptable now, else raise."""
    t = msg.get("t")
    if type(t) is not str or t not in accept:
        raise ProtocolError(f"unexpected control message type {t!r:.40} (expected one of "
                            f"{sorted(accept)})")
    for name, (ok, required) in SCHEMAS[t].items():
        if name not in msg:
            if required:
                raise ProtocolError(f"control message {t!r} lacks field {name!r}")
        elif not ok(msg[name]):
            raise ProtocolError(f"control message {t!r} has an invalid {name!r}: "
                                f"{msg[name]!r:.80}")
    return msg

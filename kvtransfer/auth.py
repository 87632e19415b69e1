"""The control handshake's challenge-response: both sides prove they hold the cluster secret.

    sender -> receiver   auth  {nonce: Ns}
    receiver -> sender   auth  {nonce: Nr, mac: HMAC(K, "receiver" | Ns | Nr)}
    sender -> receiver   hello {..., mac: HMAC(K, "sender" | Nr | Ns | H(addr) | H(token))}
    receiver -> sender   welcome | error

Nonces are fresh random 32 bytes per connection, so a recorded proof is useless on another
connection; the labels keep a receiver's proof from passing as a sender's. The sender's
proof covers the backend address and token it sends, so the receiver hands UCX or NCCL only
what a secret holder sent, and only after checking it (hmac.compare_digest).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from .common import TransferError
from .schema import NONCE_BYTES

_RECEIVER = b"pdserve-kv/1/receiver\0"
_SENDER = b"pdserve-kv/1/sender\0"


def secret_bytes(secret: bytes | str | None) -> bytes | None:
    """The secret as bytes (a str is UTF-8 encoded); None or empty: no authentication."""
    if not secret:
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def receiver_proof(secret: bytes, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
    return _mac(secret, _RECEIVER, sender_nonce, receiver_nonce)


def sender_proof(secret: bytes, sender_nonce: bytes, receiver_nonce: bytes, addr: bytes,
                 token: bytes) -> bytes:
    return _mac(secret, _SENDER, receiver_nonce, sender_nonce, hashlib.sha256(addr).digest(),
                hashlib.sha256(token).digest())


def check(expected: bytes, got: bytes | None) -> bool:
    return got is not None and hmac.compare_digest(expected, got)


def receiver_step(secret: bytes | None, peer: Any, msg: dict[str, Any]) -> bool:
    """The receiver's side, one message at a time (peer keeps the nonces): True once the
    hello proved the secret (or there is none). Raises TransferError on a wrong or missing
    proof, so a peer that fails is refused before any of its data is used."""
    if secret is None:
        if msg["t"] == "auth":
            raise TransferError("this KV receiver has no cluster secret, the sender has one")
        return True
    if msg["t"] == "auth" and peer.nonce is None:
        peer.peer_nonce, peer.nonce = msg["nonce"], new_nonce()
        peer.conn.send({"t": "auth", "nonce": peer.nonce,
                        "mac": receiver_proof(secret, peer.peer_nonce, peer.nonce)})
        return False
    if msg["t"] != "hello" or peer.nonce is None:
        raise TransferError("authentication required: this KV receiver has a cluster secret")
    proof = sender_proof(secret, peer.peer_nonce, peer.nonce, msg["addr"], msg["token"])
    if not check(proof, msg.get("mac")):
        raise TransferError("authentication failed: wrong cluster secret")
    return True

"""The control channel: msgpack maps over one TCP connection per (sender, receiver) pair.

Every header carries "v" (SCHEMA_VERSION) and "t" (its type). Sender -> receiver:
  auth  {nonce}                              only with a cluster secret (see auth.py)
  hello {geometry, backend, addr, token, mac?}  answered by welcome or error
  begin {req, nblocks, dst?}                 a request starts (dst: block ids, checked)
  data  {req, tag, l0, l1, b0, b1}           payload message follows on the backend with tag
  end   {req, aux}                           every layer was sent; aux for the serving layer
  abort {req, why}                           the sender gave the request up
Receiver -> sender:
  auth {nonce, mac}                          only with a cluster secret
  welcome {conn, max_rows} | error {why}     conn: this pair's tag prefix
  done {req}                                 every block landed in place
  fail {req, why}                            the receiver gave the request up
Framing: a 4-byte big-endian length, then one msgpack map. A header announcing more than
max_frame_bytes is refused before its body is read. Each message is checked against its
schema (schema.py) for the point of the conversation it arrives at, before anyone uses it.
"""

from __future__ import annotations

import base64
import errno
import socket
from typing import Any

import msgpack

from . import auth
from .common import SCHEMA_VERSION, TransferError
from .schema import MAX_TEXT_CHARS, SENDER_HANDSHAKE, ProtocolError, validate

MAX_FRAME_BYTES = 1 << 20  # default; TransferOptions.max_frame_bytes
_HEADER = 4
_RECV_BYTES = 1 << 16
_READ_BUDGET = 4 << 20  # bytes read from one peer per loop turn (the others get their turn)


def encode(msg: dict[str, Any]) -> bytes:
    """One message's msgpack body (no frame header)."""
    return msgpack.packb({"v": SCHEMA_VERSION, **msg}, use_bin_type=True)


def frame(msg: dict[str, Any]) -> bytes:
    body = encode(msg)
    return len(body).to_bytes(_HEADER, "big") + body


def _checked(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict) or "t" not in msg:
        raise ProtocolError(f"malformed control message: {msg!r:.200}")
    if msg.get("v") != SCHEMA_VERSION:
        raise ProtocolError(
            f"control schema version mismatch: peer sent v={msg.get('v')!r:.20}, this side "
            f"speaks v={SCHEMA_VERSION}")
    return msg


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # any malformed body: msgpack raises several kinds
        raise ProtocolError(f"undecodable control message: {type(e).__name__}: {e}") from e
    return _checked(msg)


def encode_address(host: str, port: int, backend: str, backend_addr: bytes) -> bytes:
    """What a receiver advertises: control host:port + backend name and address."""
    return msgpack.packb({"v": SCHEMA_VERSION, "host": host, "port": port, "backend": backend,
                          "addr": backend_addr}, use_bin_type=True)


def address_bytes(address: bytes | str) -> bytes:
    """An address as bytes; a str is the base64 form from address_to_str()."""
    try:
        return base64.urlsafe_b64decode(address) if isinstance(address, str) else bytes(address)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a kvtransfer address: {e}") from e


def decode_address(address: bytes | str) -> dict[str, Any]:
    """Inverse of encode_address (accepts the bytes or their str form); checks every field."""
    raw = address_bytes(address)
    try:
        info = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise ValueError(f"not a kvtransfer address: {e}") from e
    if not isinstance(info, dict) or info.get("v") != SCHEMA_VERSION or "port" not in info:
        raise ValueError(f"not a kvtransfer address (or another schema version): {info!r:.200}")
    if not (type(info.get("host")) is str and type(info["port"]) is int
            and 0 < info["port"] < 65536 and type(info.get("backend")) is str
            and type(info.get("addr")) is bytes):
        raise ValueError(f"not a kvtransfer address (bad field types): {info!r:.200}")
    return info


def address_to_str(address: bytes) -> str:
    return base64.urlsafe_b64encode(address).decode()


class FrameReader:
    """Splits a byte stream into checked messages; refuses an oversized frame at its header."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER:
            n = int.from_bytes(self._buf[:_HEADER], "big")
            if n > self.max_frame_bytes:
                raise ProtocolError(f"control frame of {n} bytes exceeds the limit of "
                                    f"{self.max_frame_bytes}")
            if len(self._buf) < _HEADER + n:
                break
            body = bytes(self._buf[_HEADER:_HEADER + n])
            del self._buf[:_HEADER + n]
            out.append(_decode(body))
        return out


class ControlConn:
    """A non-blocking TCP connection carrying framed msgpack maps; driven by the progress
    thread. `accept`: the message types valid now (schema.py); others end the connection."""

    def __init__(self, sock: socket.socket, accept: frozenset[str],
                 reader: FrameReader | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.accept = accept
        self._reader = reader or FrameReader(max_frame_bytes)
        self._out = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        if not self.closed:
            if isinstance(msg.get("why"), str) and len(msg["why"]) > MAX_TEXT_CHARS:
                msg = {**msg, "why": msg["why"][:MAX_TEXT_CHARS]}
            self._out += frame(msg)

    def send_now(self, msg: dict[str, Any]) -> None:
        """send() and write at once, for a message the peer waits on; a lost peer is left
        to the progress loop's flush, which reports it."""
        self.send(msg)
        try:
            self.flush()
        except ConnectionError:
            pass

    @property
    def wants_write(self) -> bool:
        return bool(self._out) and not self.closed

    def flush(self) -> None:
        """Write what the socket takes now; ConnectionError if the peer is gone."""
        while self._out and not self.closed:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise ConnectionError(f"control connection lost: {e}") from e
            del self._out[:n]

    def read(self) -> list[dict[str, Any]]:
        """Every complete message available now (envelope checked; the endpoint validates
        each against `accept` just before using it, as a message may change `accept`).
        ConnectionError on EOF or error, ProtocolError on a bad frame."""
        msgs: list[dict[str, Any]] = []
        budget = _READ_BUDGET
        while budget > 0:
            try:
                chunk = self.sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise ConnectionError(f"control connection lost: {e}") from e
            if not chunk:
                raise ConnectionError("control connection closed by the peer")
            msgs += self._reader.feed(chunk)
            budget -= len(chunk)
            if len(chunk) < _RECV_BYTES:
                break
        return msgs

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def _recv_one(sock: socket.socket, reader: FrameReader, pending: list[dict[str, Any]],
              where: str) -> dict[str, Any]:
    while not pending:
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            raise TransferError(f"KV receiver at {where} closed the connection during the "
                                "handshake")
        pending += reader.feed(chunk)
    return validate(pending.pop(0), SENDER_HANDSHAKE)


def handshake(host: str, port: int, hello: dict[str, Any], timeout_s: float,
              secret: bytes | None = None, max_frame_bytes: int = MAX_FRAME_BYTES,
              ) -> tuple[socket.socket, FrameReader, dict[str, Any]]:
    """Blocking: connect, authenticate (with a secret), send hello, wait for welcome or error.

    Returns the socket, its reader (it may hold bytes already) and the validated reply.
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise TransferError(f"cannot reach the KV receiver at {where}: {e}") from e
    reader, pending = FrameReader(max_frame_bytes), []
    try:
        sock.settimeout(timeout_s)
        if secret is not None:
            ns = auth.new_nonce()
            sock.sendall(frame({"t": "auth", "nonce": ns}))
            reply = _recv_one(sock, reader, pending, where)
            if reply["t"] == "error":
                return sock, reader, reply
            nr = reply.get("nonce")
            if reply["t"] != "auth" or not auth.check(auth.receiver_proof(secret, ns, nr),
                                                      reply.get("mac")):
                raise TransferError(f"KV receiver at {where} failed authentication (does it "
                                    "hold the same cluster secret?)")
            hello = {**hello, "mac": auth.sender_proof(secret, ns, nr, hello["addr"],
                                                       hello["token"])}
        sock.sendall(frame(hello))
        reply = _recv_one(sock, reader, pending, where)
        if reply["t"] == "auth":
            raise ProtocolError(f"KV receiver at {where} asked for authentication out of turn")
        if pending:
            raise ProtocolError(f"KV receiver at {where} sent messages before the handshake "
                                "ended")
        return sock, reader, reply
    except TimeoutError as e:
        sock.close()
        raise TransferError(f"handshake with {where} timed out after {timeout_s} s") from e
    except OSError as e:
        sock.close()
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            raise TransferError(f"KV receiver at {where} reset the connection") from e
        raise TransferError(f"handshake with {where} failed: {e}") from e
    except BaseException:
        sock.close()
        raise

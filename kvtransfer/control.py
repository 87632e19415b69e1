"""The control channel: msgpack maps over one TCP connection per (sender, receiver) pair.

Every header carries "v" (SCHEMA_VERSION) and "t" (its type). Sender -> receiver:
  hello {geometry, backend, addr, token}     first message; answered by welcome or error
  begin {req, nblocks, dst?}                 a request starts (dst: block ids, checked)
  data  {req, tag, l0, l1, b0, b1}           payload message follows on the backend with tag
  end   {req, aux}                           every layer was sent; aux for the serving layer
  abort {req, why}                           the sender gave the request up
Receiver -> sender:
  welcome {conn, max_rows} | error {why}     conn: this pair's tag prefix
  done {req}                                 every block landed in place
  fail {req, why}                            the receiver gave the request up
The stream is msgpack's own framing (no length prefix needed).
"""

from __future__ import annotations

import base64
import errno
import socket
from typing import Any

import msgpack

from .common import SCHEMA_VERSION, TransferError

_MAX_BUFFER_BYTES = 64 << 20


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **msg}, use_bin_type=True)


def _new_unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=_MAX_BUFFER_BYTES, strict_map_key=False)


def _checked(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict) or "t" not in msg:
        raise TransferError(f"malformed control message: {msg!r:.200}")
    if msg.get("v") != SCHEMA_VERSION:
        raise TransferError(
            f"control schema version mismatch: peer sent v={msg.get('v')!r}, this side speaks "
            f"v={SCHEMA_VERSION}")
    return msg


def encode_address(host: str, port: int, backend: str, backend_addr: bytes) -> bytes:
    """What a receiver advertises: control host:port + backend name and address."""
    return msgpack.packb({"v": SCHEMA_VERSION, "host": host, "port": port, "backend": backend,
                          "addr": backend_addr}, use_bin_type=True)


def address_bytes(address: bytes | str) -> bytes:
    """An address as bytes; a str is the base64 form from address_to_str()."""
    return base64.urlsafe_b64decode(address) if isinstance(address, str) else bytes(address)


def decode_address(address: bytes | str) -> dict[str, Any]:
    """Inverse of encode_address (accepts the bytes or their str form)."""
    raw = address_bytes(address)
    try:
        info = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise ValueError(f"not a kvtransfer address: {e}") from e
    if not isinstance(info, dict) or info.get("v") != SCHEMA_VERSION or "port" not in info:
        raise ValueError(f"not a kvtransfer address (or another schema version): {info!r:.200}")
    return info


def address_to_str(address: bytes) -> str:
    return base64.urlsafe_b64encode(address).decode()


class ControlConn:
    """A non-blocking TCP connection carrying msgpack maps; driven by the progress thread."""

    def __init__(self, sock: socket.socket, unpacker: msgpack.Unpacker | None = None) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._unpacker = unpacker or _new_unpacker()
        self._out = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        if not self.closed:
            self._out += encode(msg)

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
        """Every complete message available now; ConnectionError on EOF or error."""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise ConnectionError(f"control connection lost: {e}") from e
            if not chunk:
                raise ConnectionError("control connection closed by the peer")
            self._unpacker.feed(chunk)
            if len(chunk) < (1 << 20):
                break
        return [_checked(m) for m in self._unpacker]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def handshake(host: str, port: int, hello: dict[str, Any],
              timeout_s: float) -> tuple[socket.socket, msgpack.Unpacker, dict[str, Any]]:
    """Blocking: connect, send hello, wait for the first reply (welcome or error)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise TransferError(f"cannot reach the KV receiver at {host}:{port}: {e}") from e
    unpacker = _new_unpacker()
    try:
        sock.settimeout(timeout_s)
        sock.sendall(encode(hello))
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise TransferError(f"KV receiver at {host}:{port} closed the connection "
                                    "during the handshake")
            unpacker.feed(chunk)
            for msg in unpacker:
                return sock, unpacker, _checked(msg)
    except TimeoutError as e:
        sock.close()
        raise TransferError(f"handshake with {host}:{port} timed out after {timeout_s} s") from e
    except OSError as e:
        sock.close()
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            raise TransferError(f"KV receiver at {host}:{port} reset the connection") from e
        raise TransferError(f"handshake with {host}:{port} failed: {e}") from e
    except BaseException:
        sock.close()
        raise

"""Runs an ASGI app with uvicorn (httptools parser) inside the caller's event loop.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but neither the size
nor the read time of a request head, so `LimitedHttpTools` adds both: a head larger than
MAX_HEAD_BYTES gets 431, one not complete HEAD_TIMEOUT_S after its first byte (or after the
connection opened) gets 408; requests the parser rejects (bad Content-Length, bad request
line, ...) get uvicorn's 400. Every such answer closes the connection after it is written.
Body size and body read time are the app's (http_gateway.read_body).

With a `TLSConfig` that has a certificate it serves HTTPS (uvicorn's ssl_certfile /
ssl_keyfile) with the same files as the gRPC server; with a client CA it requires client
certificates signed by it (ssl_ca_certs, CERT_REQUIRED). A plaintext request to an HTTPS
port fails its handshake and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdserve.proto.tls import TLSConfig

log = logging.getLogger("pdserve.coordinator.http")
MAX_HEAD_BYTES = 64 << 10
HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


class LimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_bytes = self._parsed_head_bytes = 0  # bytes read / parsed of this head
        self._reading_head = True
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._reject(408, "timed out reading the request head")
        elif not self.transport.is_closing():
            self.transport.close()  # a connection that never sent a byte

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.max_head_bytes:
            self._reject(431, f"request head over {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_head_bytes = 0
        self._start_head_timer()

    def _count_head(self, n: int) -> None:
        """A head parsed from one large read never crosses reads: count it as parsed."""
        self._parsed_head_bytes += n
        if self._parsed_head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")  # the parser answers send_400_response

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head, self._head_bytes = True, 0

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._reject(431, f"request head over {self.max_head_bytes} bytes")
        else:
            self._reject(400, msg)

    def _reject(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": None}}).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the coordinator's CLI owns SIGINT/SIGTERM


class HttpServer:
    """`await start()` binds and serves `app` on the running loop; `await stop()`."""

    def __init__(self, app: Any, host: str, port: int, tls: TLSConfig | None = None) -> None:
        self.app, self.host, self.port = app, host, port
        self.tls = tls if tls is not None and tls.serves_tls else None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        ssl_kw = self._ssl()  # a wrong TLS file fails here, before anything is bound
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, http=LimitedHttpTools, loop="none", lifespan="off", ws="none",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=2, **ssl_kw)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()
                raise OSError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.005)
        return self.port

    def _ssl(self) -> dict[str, Any]:
        """uvicorn's TLS settings: HTTPS with the certificate, client certificates when a
        client CA is set."""
        if self.tls is None:
            return {}
        self.tls.check()
        kw: dict[str, Any] = {"ssl_certfile": self.tls.cert_file, "ssl_keyfile": self.tls.key_file}
        if self.tls.client_ca_file:
            kw.update(ssl_ca_certs=self.tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kw

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            self._task.cancel()
            log.warning("HTTP server did not stop cleanly", exc_info=True)

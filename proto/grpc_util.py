"""gRPC helpers shared by the coordinator and the workers.

- `add_standard_services(server, names)`: grpc.health.v1 + server reflection on a grpc.aio
  server; returns the health servicer (call `set_serving` / `enter_graceful_shutdown`).
- `new_server(guard)` / `new_channel(address, credential, tls)`: grpc.aio objects with the
  project's options; the guard (proto/guard.py) checks credentials and request bytes, the
  credential goes on every call of the channel. `listen(server, host, port, tls)`: bind, with
  AddressInUse (one clear line) when taken. `new_sync_channel(address, tls)`: a blocking
  channel (the Python `Client`). With a `TLSConfig` (proto/tls.py) servers listen with TLS
  and channels dial with it; without one, both are plaintext.
- `check_auth(context, token)`: `authorization: Bearer TOKEN` metadata check.

Keepalive: clients ping every 30 s (also with no call open); servers allow pings every 10 s
with or without data and calls, so no side ever sends GOAWAY "too_many_pings".
- `install_uvloop()`: use uvloop when it is installed.
"""

from __future__ import annotations

import errno
import hmac
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.proto import pdserve_pb2
from pdserve.proto.tls import TLSConfig

MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # no cap: idle channels keep pinging
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # accept the clients' keepalive pings (every 30 s) even on a channel with no call open
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]

COORDINATOR_SERVICE = pdserve_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
WORKER_SERVICE = pdserve_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class AioHealth:
    """Thin wrapper over the aio health servicer: one status for the server and its services."""

    def __init__(self, servicer: health.aio.HealthServicer, names: Sequence[str]) -> None:
        self.servicer = servicer
        self.names = ("", *names)

    async def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.names:
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


async def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> AioHealth:
    """Add grpc.health.v1 (SERVING for "" and each name) and reflection to an aio server.

    `service_names` are the full names of the application services on the server, e.g.
    `[WORKER_SERVICE]`. Call before `server.start()`.
    """
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    refl_names = [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(refl_names, server)
    h = AioHealth(servicer, names)
    await h.set_serving(True)
    return h


class AddressInUse(OSError):
    """The address a server was asked to listen on is taken."""


def listen(server: grpc.aio.Server, host: str, port: int, tls: TLSConfig | None = None) -> int:
    """add_insecure_port (add_secure_port when `tls` has a certificate) with a clear error:
    AddressInUse when host:port is taken (checked with a plain socket first, so gRPC's own
    bind error log does not precede it); TLSError when a TLS file is wrong."""
    creds = tls.server_credentials() if tls is not None and tls.serves_tls else None
    if port:
        bare = host.strip("[]")
        with socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET) as probe:
            # as gRPC binds: connections in TIME_WAIT (a restarted server) do not block it,
            # a live listener does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bare, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(errno.EADDRINUSE, f"cannot listen on {host}:{port}: the "
                                       f"address is in use (another pdserve?); choose another "
                                       f"port") from None
                raise
    try:
        if creds is not None:
            return server.add_secure_port(f"{host}:{port}", creds)
        return server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise AddressInUse(errno.EADDRINUSE, f"cannot listen on {host}:{port}: {exc}") from None


def new_server(guard: grpc.aio.ServerInterceptor | None = None) -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[guard] if guard else None)


def new_channel(address: str, credential: str | None = None,
                tls: TLSConfig | None = None) -> grpc.aio.Channel:
    """An aio channel; with a credential, every call carries `authorization: Bearer <it>`;
    with a `tls` that has a certificate or a CA, it dials with TLS."""
    from pdserve.proto.guard import credential_interceptors

    icp: list[Any] = credential_interceptors(credential)
    if tls is not None and tls.dials_tls:
        return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                       options=CHANNEL_OPTIONS, interceptors=icp or None)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=icp or None)


def new_sync_channel(address: str, tls: TLSConfig | None = None) -> grpc.Channel:
    """A blocking channel with the project's options; TLS as in new_channel."""
    if tls is not None and tls.dials_tls:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


async def check_auth(context: grpc.aio.ServicerContext, token: str | None) -> None:
    """Abort with UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`."""
    if not token:
        return
    got = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            got = value if isinstance(value, str) else value.decode()
            break
    if not got:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing credentials: send metadata 'authorization: Bearer <token>'")
    scheme, _, given = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid auth token")


def install_uvloop() -> bool:
    """Make uvloop the asyncio event loop policy when it is installed; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    import asyncio
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True

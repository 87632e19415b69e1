"""What every pdserve gRPC server checks before a handler runs, and the credentials clients send.

Two planes, two credentials (docs/architecture.md, "Security"):
- client plane (Coordinator.Generate, Abort, ListWorkers, Stats): the API key where one is
  configured (the cluster secret is accepted too);
- cluster plane (Coordinator.Register, Heartbeat and every Worker RPC): the
  cluster secret where one is configured; a coordinator without one falls back to its API
  key (the behaviour before the cluster secret existed).
Both travel as `authorization: Bearer <credential>` metadata. Health and reflection stay open.

`Guard` also turns request bytes that do not parse into INVALID_ARGUMENT (grpc.aio would
hand the handler None and end the call UNKNOWN).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from pdserve.proto import pdserve_pb2

CLIENT, CLUSTER = "client", "cluster"


def _methods(service: str) -> list[str]:
    desc = pdserve_pb2.DESCRIPTOR.services_by_name[service]
    return [f"/{desc.full_name}/{m.name}" for m in desc.methods]


_CLUSTER_COORDINATOR = {"Register", "Heartbeat"}
COORDINATOR_PLANES: dict[str, str] = {
    m: CLUSTER if m.rsplit("/", 1)[1] in _CLUSTER_COORDINATOR else CLIENT
    for m in _methods("Coordinator")}
WORKER_PLANES: dict[str, str] = {m: CLUSTER for m in _methods("Worker")}


def bearer(metadata: Any) -> str | None:
    """The credential of `authorization: Bearer X` in call metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            got = value if isinstance(value, str) else value.decode(errors="replace")
            scheme, _, given = got.partition(" ")
            return given.strip() if scheme.lower() == "bearer" else ""
    return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # DecodeError and whatever else bad bytes set off
            return _Malformed(f"malformed request message: {e}")
    return parse


class Guard(grpc.aio.ServerInterceptor):
    """Server interceptor: credentials of each method's plane, then well-formed requests.

    `planes`: full method name -> CLIENT or CLUSTER (methods not listed pass untouched).
    A credential left None is not required.
    """

    def __init__(self, planes: Mapping[str, str], api_key: str | None = None,
                 cluster_secret: str | None = None) -> None:
        self.planes = dict(planes)
        self.api_key = api_key or None
        self.cluster_secret = cluster_secret or None

    def accepted(self, plane: str) -> list[str]:
        """Credentials that open `plane` ([] = open to anyone)."""
        if plane == CLUSTER:
            cred = self.cluster_secret or self.api_key
            return [cred] if cred else []
        return [c for c in (self.api_key, self.cluster_secret) if c] if self.api_key else []

    def denied(self, plane: str, metadata: Any) -> str | None:
        accepted = self.accepted(plane)
        if not accepted:
            return None
        given = bearer(metadata)
        if given is None:
            return "missing credentials: send metadata 'authorization: Bearer <token>'"
        if not any(_same(given, c) for c in accepted):  # every one compared: no early exit
            what = "cluster secret" if plane == CLUSTER and self.cluster_secret else "auth token"
            return f"invalid {what}"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        plane = self.planes.get(details.method)
        if handler is None or plane is None:
            return handler
        why = self.denied(plane, details.invocation_metadata)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=_safe(handler.request_deserializer),
                                    unary_unary=_unary(handler.unary_unary, why))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=_safe(handler.request_deserializer),
                                    unary_stream=_unary_stream(handler.unary_stream, why))
        return handler  # no client-streaming methods in pdserve


async def _check(request: Any, context, why: str | None) -> None:
    if why is not None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)


def _unary(behavior, why: str | None):
    async def call(request, context):
        await _check(request, context, why)
        return await behavior(request, context)
    return call


def _unary_stream(behavior, why: str | None):
    async def call(request, context):
        await _check(request, context, why)
        async for item in behavior(request, context):
            yield item
    return call


class _Credential:
    """Adds `authorization: Bearer <credential>` to a call's metadata."""

    def __init__(self, credential: str) -> None:
        self._pair = ("authorization", f"Bearer {credential}")

    def _details(self, details):
        md = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in md:
            md.add(*self._pair)
        return details._replace(metadata=md)


# grpc.aio files a client interceptor under one call kind only: one class per kind
class _UnaryCredential(_Credential, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamCredential(_Credential, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def credential_interceptors(credential: str | None) -> list[Any]:
    """Client interceptors that send `credential` on every call of a channel."""
    if not credential:
        return []
    return [_UnaryCredential(credential), _StreamCredential(credential)]

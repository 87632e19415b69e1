"""The error the Python clients raise (coordinator/client.py), with a TLS hint when a call
could not connect."""

from __future__ import annotations

import grpc

from pdserve.proto.tls import TLSConfig, unavailable_hint


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, tls: TLSConfig | None = None) -> ClientError:
        """The error of a failed call; UNAVAILABLE says when TLS may be the reason."""
        return cls(e.code(), (e.details() or "") + _hint(e, tls))


def _hint(e: grpc.RpcError, tls: TLSConfig | None) -> str:
    """For an UNAVAILABLE error: whether TLS may be the reason (proto/tls.py)."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    return unavailable_hint(tls, e.details() or "")

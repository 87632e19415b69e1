"""A small etcd v3 client over etcd's gRPC gateway (JSON over HTTP/1.1, `/v3/...`).

Only what the worker registry needs: leases (grant, keep alive, revoke) and keys (put
under a lease, read a prefix, delete). Blocking calls on the standard library's
http.client; asyncio callers run them in a thread. Several endpoints may be given: a call
that cannot reach one tries the next.

    etcd = Etcd(["http://127.0.0.1:2379"])
    lease = etcd.grant(ttl_s=3)
    etcd.put("/pdserve/workers/prefill-0", b"...", lease=lease)
    etcd.keepalive(lease)                     # the remaining TTL; 0: the lease is gone
    for kv in etcd.get_prefix("/pdserve/workers/"): ...

Why not a package: `etcd3` (last release 2020) breaks with protobuf >= 4, which pdserve
needs; the maintained ones bring their own gRPC stubs or runtimes for five calls. The JSON
gateway is part of every etcd >= 3.4 (`/v3/` paths), so this needs nothing but etcd.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class EtcdError(RuntimeError):
    """No endpoint answered, or etcd answered with an error."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """"http://a:2379,http://b:2379" or a list -> ["http://a:2379", ...] (scheme optional)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip() if "://" in e else f"http://{e.strip()}" for e in items if e.strip()]
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class Etcd:
    def __init__(self, endpoints: str | Sequence[str], timeout_s: float = 2.0) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self._current = 0

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            url = urlsplit(self.endpoints[index])
            conn = http.client.HTTPConnection(url.hostname, url.port or 2379,
                                              timeout=self.timeout_s)
            try:
                conn.request("POST", f"/v3/{path}", json.dumps(body),
                             {"Content-Type": "application/json"})
                reply = conn.getresponse()
                data = json.loads(reply.read() or b"{}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{self.endpoints[index]}: {e}")
                continue
            finally:
                conn.close()
            self._current = index
            if reply.status != 200 or "error" in data:
                raise EtcdError(f"etcd {path}: HTTP {reply.status}: "
                                f"{data.get('message') or data.get('error')}")
            return data
        raise EtcdError(f"no etcd endpoint answered /v3/{path}: {'; '.join(errors)}")

    # -- leases ----------------------------------------------------------------------------
    def grant(self, ttl_s: int) -> int:
        return int(self._call("lease/grant", {"TTL": int(ttl_s)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh the lease once; its TTL in seconds, 0 when it has expired (or is unknown)."""
        reply = self._call("lease/keepalive", {"ID": lease})
        return int(reply.get("result", reply).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """Drop the lease and every key under it (a clean exit)."""
        try:
            self._call("lease/revoke", {"ID": lease})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # -- keys ------------------------------------------------------------------------------
    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._call("kv/put", body)

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        reply = self._call("kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [KeyValue(base64.b64decode(kv["key"]).decode(),
                         base64.b64decode(kv.get("value", "")), int(kv.get("mod_revision", 0)),
                         int(kv.get("lease", 0))) for kv in reply.get("kvs", [])]

    def delete(self, key: str) -> None:
        self._call("kv/deleterange", {"key": _b64(key)})

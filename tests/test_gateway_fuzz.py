"""Malformed HTTP on raw sockets (127.0.0.1 only): every request gets a 4xx response, none
a dropped connection or a 5xx. Bounded: fixed cases plus a seeded set of byte mutations."""

from __future__ import annotations

import json
import random
import socket

import pytest
from fake_worker import Cluster

from pdserve.coordinator import http_gateway, http_server

pytestmark = pytest.mark.timeout(120)
VALID_BODY = json.dumps({"model": "fake-model", "prompt": "abc", "max_tokens": 2}).encode()


def valid_request(body: bytes = VALID_BODY) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def post(body: bytes, headers: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def status_of(address: str, data: bytes) -> int:
    """Send `data`, return the status of the first response (fails if none comes)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it read everything
        got = b""
        while b"\r\n" not in got:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 "), f"no response to {data[:80]!r}: {got[:80]!r}"
    return int(got.split(b" ", 2)[1])


@pytest.fixture
def gateway(make_cluster, monkeypatch) -> Cluster:
    monkeypatch.setattr(http_server.LimitedHttpTools, "head_timeout_s", 0.5)
    monkeypatch.setattr(http_gateway, "BODY_TIMEOUT_S", 0.5)
    c = make_cluster(http_port=0)
    c.add("both")
    return c


CASES = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST /v1/completions HTTP/1.1\r\nNoColonHere\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400),
    (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", (400, 431)),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"X-Many: 0123456789012345678901234567890123456789\r\n" * 3000
     + b"\r\n", 431),
    (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n", 408),  # head never completes
    (post(b"{", b""), 400),
    (post(b"not json"), 400),
    (post(b"\xff\xfe\x00garbage"), 400),
    (post(b"[1, 2, 3]"), 400),
    (post(b"[" * 100_000 + b"]" * 100_000), 400),
    (post(b'{"prompt": "x", "max_tokens": "many"}'), 400),
    (post(b'{"prompt": "x", "stream": "yes"}'), 400),
    (post(b'{"prompt": "x", "n": null}'), 400),
    (post(b'{"prompt": "x", "temperature": 1e999}'), 400),
    (post(b"", b""), 400),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{", 413),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\"", 408),
    (b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"PUT /v1/completions HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
]


@pytest.mark.parametrize("data,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_malformed_requests_get_4xx(gateway, data, expected):
    status = status_of(gateway.coord.http_address, data)
    assert status in (expected if isinstance(expected, tuple) else (expected,))
    assert status_of(gateway.coord.http_address, valid_request()) == 200  # still serving


def test_mutated_requests_never_5xx_or_dropped(gateway):
    rng = random.Random(1234)
    base = valid_request()
    statuses = []
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i]
            else:
                data.insert(i, rng.randrange(256))
        status = status_of(gateway.coord.http_address, bytes(data))
        assert status < 500, (status, bytes(data))
        statuses.append(status)
    assert any(400 <= s < 500 for s in statuses)
    assert status_of(gateway.coord.http_address, valid_request()) == 200

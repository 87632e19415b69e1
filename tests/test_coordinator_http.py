"""The OpenAI-compatible HTTP gateway: completions (plain and SSE), models, health, errors."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from fake_worker import Cluster, Knobs, assert_no_leaks, fake_outputs, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def cluster_defaults() -> dict:
    return {"http_port": 0}


def request(c: Cluster, method: str, path: str, body=None, headers=None):
    host, port = c.coord.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    if resp.getheader("Content-Type") == "text/event-stream":
        return resp.status, raw.decode()
    return resp.status, json.loads(raw)


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completions_plain_and_stream(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode")
    status, body = request(c, "POST", "/v1/completions",
                           {"model": "fake-model", "prompt": [1, 2, 3], "max_tokens": 6})
    assert status == 200, body
    ch = body["choices"][0]
    assert ch["token_ids"] == fake_outputs([1, 2, 3], 6)[0] and ch["finish_reason"] == "length"
    assert ch["text"] == "$%&'()" and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}

    status, text = request(c, "POST", "/v1/completions",
                           {"prompt": "abc", "max_tokens": 8, "stream": True, "temperature": 0})
    assert status == 200
    events = sse_events(text)
    assert "".join(e["choices"][0]["text"] for e in events) == "defghijk"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_models_and_health(make_cluster):
    c = make_cluster()
    status, body = request(c, "GET", "/health")
    assert status == 503 and body["workers"] == {"prefill": 0, "decode": 0, "both": 0}
    c.add("both")
    assert request(c, "GET", "/health")[0] == 200
    status, body = request(c, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["fake-model"]
    assert request(c, "GET", "/nope")[0] == 404


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt": [1], "temperature": -1}, 400, "temperature must be"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": {"x": 1}}, 400, "prompt must be a string"),
    ({"prompt": "hi", "n": 2}, 400, "n = 1"),
    ({"prompt": [1] * 600}, 400, "maximum length"),
])
def test_bad_requests_are_400(make_cluster, body, status, fragment):
    c = make_cluster()
    c.add("both")
    got, out = request(c, "POST", "/v1/completions", body)
    assert got == status and fragment in out["error"]["message"], out
    assert out["error"]["type"] == "invalid_request_error"


def test_status_mapping_429_503_504_401(make_cluster):
    c = make_cluster(max_queue=0)
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 503 and out["error"]["code"] == "UNAVAILABLE"
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(refuse_reserve=True))
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 429 and "queue is full" in out["error"]["message"]
    d.knobs.refuse_reserve = False
    d.knobs.chunk_delay_s, d.knobs.chunk_tokens = 0.05, 1
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 100, "timeout": 0.2})
    assert got == 504 and out["error"]["code"] == "DEADLINE_EXCEEDED"
    assert_no_leaks(c)

    a = make_cluster(auth_token="tok")
    a.add("both")
    got, out = request(a, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 401 and "missing credentials" in out["error"]["message"]
    got, out = request(a, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2},
                       headers={"Authorization": "Bearer tok"})
    assert got == 200 and out["choices"][0]["token_ids"] == [2, 3]


def test_client_disconnect_aborts_the_request(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02))
    host, port = c.coord.http_address.rsplit(":", 1)
    body = json.dumps({"prompt": [1], "max_tokens": 1000, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
    time.sleep(0.05)
    wait_until(lambda: d.aborts and p.aborts, what="Abort after disconnect")
    assert_no_leaks(c)

"""The OpenAI-compatible HTTP gateway, driven by the official `openai` client (and raw HTTP
where the client would hide the wire): completions and chat, streaming and not, stop
strings, n, usage, models, health, errors, auth, disconnects."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest
from fake_worker import ChatTokenizer, Cluster, Knobs, assert_no_leaks, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cluster_defaults() -> dict:
    return {"http_port": 0, "tokenizer": ChatTokenizer()}


def client(c: Cluster, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{c.coord.http_address}/v1",
                         api_key=kw.pop("api_key", "none"), max_retries=0, timeout=10, **kw)


def request(c: Cluster, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    host, port = c.coord.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.read()
    conn.close()
    if not resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, out.decode() or None
    return resp.status, json.loads(out) if out else None


@pytest.fixture
def pd(make_cluster) -> Cluster:
    c = make_cluster()
    c.add("prefill")
    c.add("decode")
    return c


def test_completions_plain_and_stream(pd):
    oa = client(pd)
    r = oa.completions.create(model="fake-model", prompt=[1, 2, 3], max_tokens=6)
    assert r.choices[0].text == "$%&'()" and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == "fake-model"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 6, 9)

    events = list(oa.completions.create(model="fake-model", prompt="abc", max_tokens=8,
                                        stream=True, temperature=0,
                                        stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == "defghijk"
    finals = [e.choices[0].finish_reason for e in events if e.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 8
    assert all(e.usage is None for e in events[:-1])

    r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=3, echo=True)
    assert r.choices[0].text == "abcdef"
    assert_no_leaks(pd)


def test_chat_plain_and_stream(pd):
    oa = client(pd)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    prompt = "<system>s<user>hi<assistant>"
    r = oa.chat.completions.create(model="fake-model", messages=msgs, max_completion_tokens=4)
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == "?@AB"  # the ids after ">"
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 4

    chunks = list(oa.chat.completions.create(model="fake-model", messages=msgs, max_tokens=4,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "?@AB"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == len(prompt) + 4
    # no max_tokens: up to the context (512 tokens)
    r = oa.chat.completions.create(model="fake-model", messages=msgs)
    assert r.usage.completion_tokens == 512 - len(prompt) and r.choices[0].finish_reason == "length"
    assert_no_leaks(pd)


def test_chat_stream_continuous_usage_as_guidellm_sends_it(pd):
    """guidellm 0.8.1's default chat body: vLLM's stream_options.continuous_usage_stats
    (usage so far on every chunk), max_completion_tokens, stop null, ignore_eos, text parts."""
    body = {"model": "fake-model", "stream": True, "max_completion_tokens": 6, "stop": None,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    status, out = request(pd, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    events = [json.loads(line[6:]) for line in out.split("\n\n")
              if line.startswith("data: {")]
    assert out.rstrip().endswith("data: [DONE]")
    n_prompt = len("<user>hi<assistant>")
    usages = [e["usage"] for e in events]
    assert all(u["prompt_tokens"] == n_prompt for u in usages)
    done = [u["completion_tokens"] for u in usages]
    assert done[0] == 0 and done == sorted(done) and done[-1] == 6  # the role chunk: 0
    assert usages[-1]["total_tokens"] == n_prompt + 6 and events[-1]["choices"] == []
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert len(text) == 6
    # without include_usage, continuous_usage_stats adds nothing (as in vLLM)
    body["stream_options"] = {"continuous_usage_stats": True}
    status, out = request(pd, "POST", "/v1/chat/completions", body)
    assert status == 200 and '"usage"' not in out
    assert_no_leaks(pd)


def test_stop_strings_across_tokens_and_messages(pd):
    oa = client(pd)
    # "abc" -> d e f g h i ...: token 0 comes from prefill, the rest in chunks of 4 from decode
    for stop, text, n in ((["gh"], "def", 5), (["de"], "", 2), (["zz", "fghij"], "de", 7)):
        r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=50, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop"), stop
        assert r.usage.completion_tokens == n
        events = list(oa.completions.create(model="fake-model", prompt="abc", max_tokens=50,
                                            stop=stop, stream=True))
        assert "".join(e.choices[0].text for e in events) == text
        assert events[-1].choices[0].finish_reason == "stop"
    r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=3, stop="xyz")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("def", "length")
    assert_no_leaks(pd)
    stats = pd.coord.orch
    assert stats.requests_failed == 0 and stats.requests_cancelled == 0


def test_n_choices_and_batch_prompts(pd):
    oa = client(pd)
    r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=3, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert {c.text for c in r.choices} == {"def"} and r.usage.completion_tokens == 9
    assert r.usage.prompt_tokens == 3
    r = oa.completions.create(model="fake-model", prompt=["ab", "xy"], max_tokens=2, n=2)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == ["cd", "cd", " !", " !"]
    chunks = list(oa.chat.completions.create(model="fake-model", n=2, max_tokens=3, stream=True,
                                             messages=[{"role": "user", "content": "x"}]))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
    assert by_index == {0: "?@A", 1: "?@A"}
    assert_no_leaks(pd)


def test_models_and_health(make_cluster):
    c = make_cluster()
    status, body = request(c, "GET", "/health")
    assert status == 503 and body["workers"] == {"prefill": 0, "decode": 0, "both": 0}
    assert request(c, "HEAD", "/health") == (503, None)
    c.add("both")
    assert request(c, "GET", "/health")[0] == 200
    assert request(c, "HEAD", "/health") == (200, None)
    oa = client(c)
    assert [m.id for m in oa.models.list().data] == ["fake-model"]
    assert oa.models.retrieve("fake-model").id == "fake-model"
    with pytest.raises(openai.NotFoundError) as e:
        oa.models.retrieve("nope")
    assert e.value.body["type"] == "not_found_error"
    status, body = request(c, "GET", "/nope")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert request(c, "DELETE", "/v1/completions")[0] == 405


@pytest.mark.parametrize("body,status,param,fragment", [
    ({"prompt": [1], "temperature": -1}, 400, None, "temperature must be"),
    ({"prompt": []}, 400, "prompt", "prompt is empty"),
    ({"prompt": {"x": 1}}, 400, "prompt", "invalid value for 'prompt'"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "hi", "n": 1.0}, 400, "n", "valid integer"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix", "suffix"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs", "logprobs must be in [0, 20]"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"1": 2}}, 400, "logit_bias", "logit_bias"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate", "frobnicate"),
    ({"prompt": "hi", "timeout": 0}, 400, "timeout", "timeout"),
    ({"prompt": "hi", "timeout": "soon"}, 400, "timeout", "timeout"),
    ({"prompt": [1] * 600}, 400, "prompt", "maximum context length"),
    ({"prompt": [1] * 500, "max_tokens": 100}, 400, "max_tokens", "maximum context length"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({}, 400, "prompt", "missing required field"),
])
def test_bad_completions(make_cluster, body, status, param, fragment):
    c = make_cluster()
    c.add("both")
    got, out = request(c, "POST", "/v1/completions", body)
    assert got == status and fragment in out["error"]["message"], out
    assert out["error"]["param"] == param
    assert out["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert_no_leaks(c)


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.image_url"),
])
def test_bad_chat(make_cluster, extra, param):
    c = make_cluster()
    c.add("both")
    with pytest.raises(openai.BadRequestError) as e:
        client(c).chat.completions.create(
            model="fake-model", **{"messages": [{"role": "user", "content": "x"}], **extra})
    assert e.value.body["param"] == param and param.split(".")[-1] in e.value.body["message"]


def test_chat_without_template_is_400(make_cluster):
    from fake_worker import FakeTokenizer
    c = make_cluster(tokenizer=FakeTokenizer())
    c.add("both")
    with pytest.raises(openai.BadRequestError) as e:
        client(c).chat.completions.create(model="fake-model",
                                          messages=[{"role": "user", "content": "x"}])
    assert "no chat template" in e.value.body["message"]


def test_status_mapping_429_503_504_401(make_cluster):
    c = make_cluster(max_queue=0)
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 503 and out["error"]["code"] == "UNAVAILABLE"
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(refuse_reserve=True))
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 429 and "queue is full" in out["error"]["message"]
    assert out["error"]["type"] == "rate_limit_error"
    d.knobs.refuse_reserve = False
    d.knobs.chunk_delay_s, d.knobs.chunk_tokens = 0.05, 1
    got, out = request(c, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 100, "timeout": 0.2})
    assert got == 504 and out["error"]["code"] == "DEADLINE_EXCEEDED"
    assert_no_leaks(c)

    a = make_cluster(auth_token="tok")
    a.add("both")
    got, out = request(a, "POST", "/v1/completions", {"prompt": [1]})
    assert got == 401 and "missing credentials" in out["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(a, api_key="wrong").completions.create(model="fake-model", prompt=[1])
    r = client(a, api_key="tok").completions.create(model="fake-model", prompt=[1], max_tokens=2)
    assert r.choices[0].text == '"#'
    assert request(a, "GET", "/health")[0] == 200  # no auth on health and metrics
    assert request(a, "GET", "/metrics")[0] == 200


def test_client_disconnect_aborts_the_request(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02))
    host, port = c.coord.http_address.rsplit(":", 1)
    for n_aborts, stream in enumerate((True, False), 1):
        body = json.dumps({"prompt": [1], "max_tokens": 400, "stream": stream}).encode()
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            if stream:
                got = b""
                while got.count(b"data: ") < 3:
                    got += s.recv(4096)
                assert got.startswith(b"HTTP/1.1 200")
            else:
                wait_until(lambda: d.calls and d.calls[-1][0] == "DecodeStream", what="decoding")
                time.sleep(0.1)
        wait_until(lambda: len(d.aborts) == n_aborts and p.aborts,  # noqa: B023
                   what="Abort after disconnect")
        assert_no_leaks(c)
    wait_until(lambda: c.coord.orch.requests_cancelled == 2, what="cancels counted")
    assert c.coord.orch.requests_failed == 0


def test_stop_matcher_holds_back_only_what_could_start_a_stop():
    from pdserve.coordinator.openai_serving import StopMatcher
    m = StopMatcher(["END", "x"])
    assert m.feed("abcE") == ("ab", False)  # "cE" could still start "END"
    assert m.feed("N") == ("c", False)
    assert m.feed("Dzz") == ("", True)  # "END" matched across three pieces: dropped
    m = StopMatcher(["END"])
    assert m.feed("aEN") == ("a", False) and m.flush() == "EN"

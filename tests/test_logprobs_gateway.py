"""Logprobs through the OpenAI gateway, driven by the official `openai` client: chat and
completions, streaming and not, P/D and colocated, stop strings, and the errors.

Fake workers (pdserve.benchmarks.fake_workers): token i is followed by i + 1 and decodes to
chr(32 + i % 90); each token's logprob is -0.1, and its top-k are token, token + 1, ... with
-0.1, -0.2, ... (fake_logprobs)."""

from __future__ import annotations

import openai
import pytest
from fake_worker import ChatTokenizer, Cluster, assert_no_leaks

pytestmark = pytest.mark.timeout(60)
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def cluster_defaults() -> dict:
    return {"http_port": 0, "tokenizer": ChatTokenizer()}


@pytest.fixture(params=["pd", "both"])
def cluster(request, make_cluster) -> Cluster:
    c = make_cluster()
    for role in (("prefill", "decode") if request.param == "pd" else ("both",)):
        c.add(role)
    return c


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{c.coord.http_address}/v1", api_key="none",
                         max_retries=0, timeout=10)


def ch(i: int) -> str:
    return chr(32 + i % 90)


def test_chat_logprobs_plain_and_stream(cluster):
    oa = client(cluster)
    r = oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=5,
                                   logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    assert len(content) == 5 and "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob == pytest.approx(-0.1) and t.bytes == list(t.token.encode())
        nxt = ch(ord(t.token) - 32 + 1)
        assert [(x.token, round(x.logprob, 4)) for x in t.top_logprobs] == [(t.token, -0.1),
                                                                            (nxt, -0.2)]
    events = list(oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=5,
                                             logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for e in events if e.choices and e.choices[0].logprobs
                for t in e.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    for e in events:  # each chunk carries the logprobs of its own text
        if e.choices and e.choices[0].delta.content:
            assert "".join(t.token for t in e.choices[0].logprobs.content) == \
                e.choices[0].delta.content
    # only top_logprobs = 0: the sampled tokens, no alternatives
    r = oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=3, logprobs=True)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[], [], []]
    r = oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=3)
    assert r.choices[0].logprobs is None
    assert_no_leaks(cluster)


def test_completions_logprobs_plain_and_stream(cluster):
    oa = client(cluster)
    r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=4, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "defg" and lp.tokens == list("defg")
    assert lp.token_logprobs == pytest.approx([-0.1] * 4) and lp.text_offset == [0, 1, 2, 3]
    assert lp.top_logprobs[0] == pytest.approx({"d": -0.1, "e": -0.2, "f": -0.3})
    events = list(oa.completions.create(model="fake-model", prompt="abc", max_tokens=4,
                                        logprobs=3, stream=True))
    tokens = [t for e in events if e.choices and e.choices[0].logprobs
              for t in e.choices[0].logprobs.tokens]
    offsets = [o for e in events if e.choices and e.choices[0].logprobs
               for o in e.choices[0].logprobs.text_offset]
    assert tokens == list("defg") and offsets == [0, 1, 2, 3]
    assert_no_leaks(cluster)


def test_stop_string_drops_the_logprobs_of_cut_tokens(cluster):
    oa = client(cluster)
    r = oa.completions.create(model="fake-model", prompt="abc", max_tokens=8, logprobs=1,
                              stop=["gh"])
    assert r.choices[0].text == "def" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs.tokens == list("def")
    events = list(oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=8,
                                             logprobs=True, stop=["BC"], stream=True))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    toks = [t.token for e in events if e.choices and e.choices[0].logprobs
            for t in e.choices[0].logprobs.content]
    assert text == "?@A" and "".join(toks) == text  # "<assistant>" ends in ">", then ?@ABC..
    assert_no_leaks(cluster)


@pytest.mark.parametrize("kind, body, param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": 2, "echo": True}, "echo"),
])
def test_bad_logprobs_are_400_naming_the_field(make_cluster, kind, body, param):
    c = make_cluster()
    c.add("both")
    oa = client(c)
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            oa.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=2,
                                       extra_body=body)
        else:
            oa.completions.create(model="fake-model", prompt="abc", max_tokens=2,
                                  extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_client_logprobs(cluster):
    from pdserve.coordinator.client import Client
    with Client(cluster.address, timeout_s=10) as cl:
        r = cl.generate(prompt_token_ids=[1, 2], max_tokens=5, logprobs=True, top_logprobs=2)
        assert r.token_ids == [3, 4, 5, 6, 7] and len(r.logprobs) == 5
        assert [(t.token_id, t.logprob) for t in r.logprobs] == \
            [(t, pytest.approx(-0.1)) for t in r.token_ids]
        assert r.logprobs[0].top == [(3, pytest.approx(-0.1)), (4, pytest.approx(-0.2))]
        chunks = list(cl.stream(prompt_token_ids=[1, 2], max_tokens=5, logprobs=True))
        assert [t.top for c in chunks for t in c.logprobs or []] == [[]] * 5
        assert cl.generate(prompt_token_ids=[1, 2], max_tokens=2).logprobs is None
        with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
            cl.generate(prompt_token_ids=[1, 2], max_tokens=2, top_logprobs=2)


def test_cli_coordinator_json_prints_logprobs(cluster, capsys):
    import argparse
    import json

    from pdserve.generate_cli import add_arguments, run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--coordinator", cluster.address, "--prompt-ids", "1,2",
                              "--max-tokens", "3", "--json", "--logprobs", "1"])
    assert run(args) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["token_ids"] == [3, 4, 5]
    assert [(x["token_id"], x["top"]) for x in got["logprobs"]] == \
        [(t, [[t, pytest.approx(-0.1)]]) for t in (3, 4, 5)]


def test_migrated_request_keeps_one_logprob_per_token(make_cluster):
    """A decode worker dies mid-stream: the continuation (re-prefilled on another pair)
    brings the logprobs of its tokens, token 0 of the new pair's included."""
    from fake_worker import Knobs, fake_outputs

    from pdserve.coordinator.client import Client
    c = make_cluster()
    c.add("prefill")
    bad = c.add("decode", knobs=Knobs(chunk_tokens=2, chunk_delay_s=0.01, die_after_chunks=3))
    c.add("decode", num_blocks=32)  # fewer free blocks: least_loaded tries `bad` first
    with Client(c.address, timeout_s=20) as cl:
        r = cl.generate(prompt_token_ids=[1, 2], max_tokens=20, logprobs=True, top_logprobs=1)
        assert cl.stats()["requests_migrated"] == 1 and bad.dead
    assert r.token_ids == fake_outputs([1, 2], 20)[0]
    assert [t.token_id for t in r.logprobs] == r.token_ids
    assert all(t.top == [(t.token_id, pytest.approx(-0.1))] for t in r.logprobs)
    assert_no_leaks(c)

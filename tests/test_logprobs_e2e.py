"""Logprobs end to end on CPU: a 1 prefill + 1 decode cluster (processes, UCX) against the
in-process colocated engine, through the Client and through the `openai` client. Token 0's
logprobs come from the prefill worker, the rest from the decode worker."""

from __future__ import annotations

import socket

import openai
import pytest

from pdserve import LLM, SamplingParams
from pdserve.cluster import LocalCluster
from pdserve.coordinator.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PROMPTS = [[5, 17, 99, 3], list(range(40, 73))]
K = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def want():
    llm = LLM(model="tiny")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=K)
    return llm.generate(PROMPTS, params)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster("tiny", prefill=1, decode=1, devices="cpu", transfer="ucx",
                      http_port=free_port(), start_timeout_s=120) as c:
        c.wait_ready(150)
        yield c


def test_pd_logprobs_equal_colocated(cluster, want):
    with Client(cluster.address, timeout_s=60) as cl:
        for prompt, ref in zip(PROMPTS, want):
            r = cl.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True,
                            logprobs=True, top_logprobs=K)
            assert r.token_ids == ref.token_ids and len(r.logprobs) == 8
            for got, exp in zip(r.logprobs, ref.logprobs):
                assert got.logprob == pytest.approx(exp.logprob, abs=1e-4)
                assert [t for t, _ in got.top] == exp.top_ids
                assert [v for _, v in got.top] == pytest.approx(exp.top_logprobs, abs=1e-4)


def test_openai_completions_logprobs_over_pd(cluster, want):
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="none",
                       max_retries=0, timeout=60)
    for stream in (False, True):
        r = oa.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                  logprobs=K, stream=stream, extra_body={"ignore_eos": True})
        chunks = list(r) if stream else [r]
        lps = [v for c in chunks if c.choices and c.choices[0].logprobs
               for v in c.choices[0].logprobs.token_logprobs]
        assert lps == pytest.approx([x.logprob for x in want[1].logprobs], abs=1e-4)

"""Prometheus metrics at /metrics move with traffic: latencies, tokens, KV transfer, worker
loads by role, and outcomes (success / cancelled / rejected / failed counted apart)."""

from __future__ import annotations

import json
import threading
import urllib.request

import openai
import pytest
from fake_worker import Cluster, Knobs, assert_no_leaks, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)


def scrape(c: Cluster) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{c.coord.http_address}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{c.coord.http_address}/v1", api_key="none",
                         max_retries=0, timeout=10)


def test_metrics_move_with_traffic(make_cluster):
    c = make_cluster(http_port=0)
    p = c.add("prefill")
    d = c.add("decode")
    before = scrape(c)
    assert value(before, "pdserve:generation_tokens_total") == 0
    oa = client(c)
    oa.completions.create(model="fake-model", prompt=[1, 2, 3], max_tokens=6)
    oa.completions.create(model="fake-model", prompt="abc", max_tokens=20, stop=["gh"])
    with pytest.raises(openai.BadRequestError):  # refused by the orchestrator
        oa.completions.create(model="fake-model", prompt=[1], temperature=-1)
    with pytest.raises(openai.BadRequestError):  # refused by the gateway
        oa.completions.create(model="fake-model", prompt=[1], extra_body={"nope": 1})
    m = scrape(c)
    assert value(m, "pdserve:generation_tokens_total") == 6 + 5
    assert value(m, "pdserve:prompt_tokens_total") == 6
    assert value(m, "pdserve:time_to_first_token_seconds_count") == 2
    assert value(m, "pdserve:e2e_request_latency_seconds_count") == 2
    assert value(m, "pdserve:inter_token_latency_seconds_count") > 0
    assert value(m, "pdserve:kv_transfer_bytes_count") == 2
    assert value(m, "pdserve:kv_transfer_bytes_sum") == 6 * 64  # the fake's kv_bytes
    assert value(m, "pdserve:kv_transfer_seconds_sum") == pytest.approx(0.001)
    assert value(m, "pdserve:request_success_total", finished_reason="length") == 1
    assert value(m, "pdserve:request_success_total", finished_reason="stop") == 1
    assert value(m, "pdserve:request_rejected_total", code="INVALID_ARGUMENT") == 1
    assert value(m, "pdserve:http_responses_total", route="/v1/completions", status="400") == 2
    assert value(m, "pdserve:http_responses_total", route="/v1/completions", status="200") == 2
    for w in (p, d):
        labels = {"worker": w.worker_id, "role": w.role}
        assert (("pdserve:kv_cache_usage_perc", tuple(sorted(labels.items()))) in m)
        assert (("pdserve:num_requests_running", tuple(sorted(labels.items()))) in m)
    assert value(m, "pdserve:workers", role="decode") == 1
    orch = c.coord.orch
    assert (orch.requests_finished, orch.requests_rejected, orch.requests_failed) == (2, 1, 0)


def test_kv_cache_usage_and_cancel(make_cluster):
    c = make_cluster(http_port=0)
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.02))
    stream = client(c).completions.create(model="fake-model", prompt=[1], max_tokens=300,
                                          stream=True)
    next(iter(stream))
    wait_until(lambda: value(scrape(c), "pdserve:kv_cache_usage_perc", worker=d.worker_id,
                             role="decode") > 0, what="heartbeat with blocks in use")
    assert value(scrape(c), "pdserve:coordinator_requests_active") == 1
    stream.close()
    wait_until(lambda: value(scrape(c), "pdserve:request_cancelled_total") == 1, what="cancel")
    m = scrape(c)
    assert value(m, "pdserve:coordinator_requests_active") == 0
    assert sum(v for (n, _), v in m.items() if n == "pdserve:request_failed_total") == 0
    assert_no_leaks(c)


def test_transfer_failure_and_retry(make_cluster):
    c = make_cluster(http_port=0)
    for _ in range(2):  # the retry excludes the prefill worker that reported the failure
        c.add("prefill", knobs=Knobs(prefill_delay_s=0.5))
    ds = [c.add("decode"), c.add("decode")]
    out: dict = {}

    def go() -> None:
        body = json.dumps({"prompt": [1], "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://{c.coord.http_address}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            out["body"] = json.loads(r.read())

    t = threading.Thread(target=go)
    t.start()
    wait_until(lambda: any(rpc == "SetKvTarget" for w in c.workers if w.role == "prefill"
                           for rpc, _ in w.calls), what="prefill started, its KV target known")
    victim = next(w for w in ds if w.calls)
    c.lt.run(victim.kill())  # its KV endpoint goes away while the prompt runs
    t.join(10)
    assert out["body"]["choices"][0]["text"] == '"#$'  # retried on the other decode worker
    m = scrape(c)
    assert value(m, "pdserve:kv_transfer_failures_total", cause="transfer_aborted") == 1
    assert value(m, "pdserve:request_retries_total") == 1
    # charged to the side that failed: the decode worker whose KV endpoint went away
    decode_failures = sum(v for (name, labels), v in m.items()
                          if name == "pdserve:worker_failures_total" and ("role", "decode") in labels)
    assert decode_failures == 1
    assert value(m, "pdserve:worker_failures_total", role="prefill", code="ABORTED") == 0
    assert value(m, "pdserve:request_success_total", finished_reason="length") == 1


def test_registries_are_per_server(make_cluster):
    a, b = make_cluster(http_port=0), make_cluster(http_port=0)
    a.add("both")
    client(a).completions.create(model="fake-model", prompt=[1], max_tokens=2)
    assert value(scrape(a), "pdserve:generation_tokens_total") == 2
    assert value(scrape(b), "pdserve:generation_tokens_total") == 0

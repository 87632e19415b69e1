"""Prefix-cache metrics: a real `both` worker (tiny model, in process) reports the prompt
tokens it looked up and found in its prefix cache; the coordinator serves them at /metrics as
pdserve:prefix_cache_queries_total / pdserve:prefix_cache_hits_total{worker,role}."""

from __future__ import annotations

import http.client

import pytest
from fake_worker import Cluster, wait_until
from prometheus_client.parser import text_string_to_metric_families

from pdserve.coordinator.client import Client
from pdserve.decode import both  # noqa: F401  (registers the both role)
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.worker.config import WorkerConfig
from pdserve.worker.server import WorkerServer

pytestmark = pytest.mark.timeout(120)


def scrape(c: Cluster) -> dict[str, float]:
    host, port = c.coord.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("pdserve:prefix_cache") and s.labels.get("role") == "both":
                out[s.name] = s.value
    return out


def test_shared_prefix_moves_the_hit_counter(make_cluster):
    c = make_cluster(http_port=0)
    ws = WorkerServer(WorkerConfig(role="both", coordinator=c.address, heartbeat_s=0.05,
                                   engine=EngineConfig(model="tiny",
                                                       cache=CacheConfig(num_blocks=64))))
    c.lt.run(ws.start(), timeout=90)
    try:
        bm = ws.engine.scheduler.block_manager  # read-only here; the warm-up looked up tokens
        wait_until(lambda: scrape(c).get("pdserve:prefix_cache_queries_total")
                   == bm.num_queried_tokens > 0, 10, "the first heartbeat")
        before = scrape(c)
        shared = [(7 * i + 3) % 200 for i in range(64)]  # 4 blocks of 16
        with Client(c.address, timeout_s=60) as cl:
            for tail in ([1, 2, 3], [9, 8, 7, 6]):
                r = cl.generate(shared + tail, max_tokens=2, temperature=0, ignore_eos=True)
                assert len(r.token_ids) == 2
        wait_until(lambda: scrape(c)["pdserve:prefix_cache_queries_total"]
                   >= before["pdserve:prefix_cache_queries_total"] + 2 * 64, 10, "a heartbeat")
        after = scrape(c)
        queried = after["pdserve:prefix_cache_queries_total"] - before[
            "pdserve:prefix_cache_queries_total"]
        hits = after["pdserve:prefix_cache_hits_total"] - before["pdserve:prefix_cache_hits_total"]
        assert queried == 64 + 3 + 64 + 4  # every prompt token is looked up once
        assert hits == 64  # the second prompt finds the four shared blocks
    finally:
        c.lt.run(ws.stop(0), timeout=30)

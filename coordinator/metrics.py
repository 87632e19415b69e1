"""Prometheus metrics of the coordinator, served at `/metrics` by the HTTP gateway.

The coordinator sees every request (gRPC and HTTP clients alike) and every worker's load
(heartbeats), so the metrics live here, in one `CollectorRegistry` per coordinator (never
the global one: tests run several coordinators in one process). Names follow vLLM's where
the meaning is the same, under `pdserve:`:

    pdserve:time_to_first_token_seconds      receipt at the coordinator -> first token sent
    pdserve:inter_token_latency_seconds      gap between token messages / tokens in the message
    pdserve:e2e_request_latency_seconds      receipt -> last token (successful requests)
    pdserve:request_queue_time_seconds       waiting at the coordinator for decode KV blocks
    pdserve:prompt_tokens_total, pdserve:generation_tokens_total
    pdserve:num_requests_running|waiting{worker,role}   from the last heartbeat
    pdserve:kv_cache_usage_perc{worker,role}            1 - free/total blocks (0..1)
P/D and outcomes (pdserve's own):
    pdserve:kv_transfer_seconds, pdserve:kv_transfer_bytes   per disaggregated request
    pdserve:kv_transfer_failures_total{cause}, pdserve:request_retries_total
    pdserve:worker_failures_total{role,code}
    pdserve:request_success_total{finished_reason}   (vLLM's name)
    pdserve:request_cancelled_total                  client cancel / disconnect / Abort
    pdserve:request_rejected_total{code}             the request's fault or admission (4xx, 429)
    pdserve:request_failed_total{code}               server-side failures (5xx, deadline)
    pdserve:prefix_cache_queries_total{worker,role}   prompt tokens looked up in the prefix
    pdserve:prefix_cache_hits_total{worker,role}      cache, and those found (vLLM's meaning;
                                                      counters from the last heartbeat)

`NoMetrics` has the same methods doing nothing; the orchestrator uses it when
prometheus_client is not installed (the `http` extra).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode

# Statuses that are the request's fault or an admission decision, not a server failure.
REJECT_CODES = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION,
                          Code.ALREADY_EXISTS, Code.NOT_FOUND, Code.UNAUTHENTICATED,
                          Code.PERMISSION_DENIED, Code.RESOURCE_EXHAUSTED})

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
BYTES_BUCKETS = tuple(float(1 << i) for i in range(10, 38, 2))  # 1 KiB .. 128 GiB
TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000, 200000)


def outcome_of(code: grpc.StatusCode) -> str:
    """'cancelled', 'rejected' or 'failed' for a request that ended with this status."""
    if code == Code.CANCELLED:
        return "cancelled"
    return "rejected" if code in REJECT_CODES else "failed"


class NoMetrics:
    """The metrics interface; every method does nothing."""

    registry: Any = None

    def first_token(self, elapsed_s: float, prompt_tokens: int) -> None: ...
    def tokens(self, n: int, gap_s: float | None) -> None: ...
    def request_done(self, outcome: str, code: str, reason: str, st: Any) -> None: ...
    def worker_failure(self, role: str, code: str) -> None: ...
    def transfer_failure(self, cause: str) -> None: ...
    def retry(self) -> None: ...
    def request_path(self, path: str) -> None: ...
    def http_response(self, route: str, status: int) -> None: ...
    def watch(self, loads: Callable[[], Iterable[tuple[str, str, Any]]],
              coordinator: Callable[[], tuple[int, int]]) -> None: ...


class Metrics(NoMetrics):
    """prometheus_client metrics in a registry of their own (`self.registry`)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)

        def hist(name: str, doc: str, buckets, labels=()) -> Histogram:
            return Histogram(f"pdserve:{name}", doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(f"pdserve:{name}", doc, labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        # per token: plain counters here, read at scrape time (a prometheus_client observe
        # takes a lock and checks labels; at one token per message it was ~5% of the CPU)
        self.stream = _StreamCounts()
        r.register(self.stream)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end latency of finished requests.",
                        E2E_BUCKETS)
        self.queue = hist("request_queue_time_seconds",
                          "Time waiting at the coordinator for decode KV blocks.", E2E_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds",
                            "Prefill time reported by the prefill (or colocated) worker.",
                            E2E_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens per request.",
                               TOKENS_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens per request.",
                            TOKENS_BUCKETS)
        self.kv_s = hist("kv_transfer_seconds", "KV transfer time per disaggregated request.",
                         TRANSFER_BUCKETS)
        self.kv_bytes = hist("kv_transfer_bytes", "KV bytes moved per disaggregated request.",
                             BYTES_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.success = counter("request_success", "Requests that finished.", ("finished_reason",))
        self.cancelled = counter("request_cancelled",
                                 "Requests cancelled by the client (disconnect, Abort).")
        self.rejected = counter("request_rejected",
                                "Requests refused: invalid, unauthenticated or over capacity.",
                                ("code",))
        self.failed = counter("request_failed", "Requests that failed on the server side.",
                              ("code",))
        self.worker_failures = counter("worker_failures", "Worker RPC failures, by role.",
                                       ("role", "code"))
        self.kv_failures = counter("kv_transfer_failures", "KV transfers that failed.", ("cause",))
        self.retries = counter("request_retries", "Requests retried on another worker pair.")
        self.paths = counter("request_path", "Requests by serving path: local_prefill (the "
                             "decode worker prefilled it), disaggregated, colocated.", ("path",))
        self.http = counter("http_responses", "HTTP gateway responses.", ("route", "status"))

    def first_token(self, elapsed_s: float, prompt_tokens: int) -> None:
        self.ttft.observe(elapsed_s)
        self.prompt_tokens.inc(prompt_tokens)

    def tokens(self, n: int, gap_s: float | None) -> None:
        c = self.stream
        c.tokens += n
        if gap_s is not None:  # not the first message: spread its gap over its tokens
            c.itl_counts[bisect_left(ITL_BUCKETS, gap_s / n)] += n
            c.itl_sum += gap_s

    def request_done(self, outcome: str, code: str, reason: str, st: Any) -> None:
        """`st` is the coordinator's RequestState, or None when validation refused it."""
        if outcome == "success":
            self.success.labels(reason or "unknown").inc()
        elif outcome == "cancelled":
            self.cancelled.inc()
        elif outcome == "rejected":
            self.rejected.labels(code).inc()
        else:
            self.failed.labels(code).inc()
        if st is None:
            return
        if st.queue_ms:
            self.queue.observe(st.queue_ms / 1e3)
        if st.sent:
            self.gen_len.observe(st.sent)
            self.prompt_len.observe(len(st.prompt))
            if st.prefill_ms:
                self.prefill.observe(st.prefill_ms / 1e3)
            if outcome == "success":
                self.e2e.observe(st.t_last - st.t0)
            if st.prefill_worker and st.prefill_worker != st.decode_worker:
                self.kv_s.observe(st.transfer_ms / 1e3)
                self.kv_bytes.observe(st.kv_bytes)

    def worker_failure(self, role: str, code: str) -> None:
        self.worker_failures.labels(role, code).inc()

    def transfer_failure(self, cause: str) -> None:
        self.kv_failures.labels(cause).inc()

    def retry(self) -> None:
        self.retries.inc()

    def request_path(self, path: str) -> None:
        self.paths.labels(path).inc()

    def http_response(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()

    def watch(self, loads: Callable[[], Iterable[tuple[str, str, Any]]],
              coordinator: Callable[[], tuple[int, int]]) -> None:
        """Gauges read at scrape time: `loads()` yields (worker id, role, pb.WorkerLoad);
        `coordinator()` gives (requests active, requests queued for decode blocks)."""
        self.registry.register(_LoadCollector(loads, coordinator))


class _StreamCounts:
    """pdserve:generation_tokens_total and pdserve:inter_token_latency_seconds, counted as
    plain numbers on the event loop (per token) and turned into metrics at scrape time."""

    def __init__(self) -> None:
        self.tokens = 0
        self.itl_counts = [0] * (len(ITL_BUCKETS) + 1)  # by bucket (le), the last is +Inf
        self.itl_sum = 0.0

    def describe(self) -> list:
        return []  # values come at collect time only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        yield CounterMetricFamily("pdserve:generation_tokens",
                                  "Tokens generated (sent to clients).", value=self.tokens)
        cum, buckets = 0, []
        for le, n in zip((*map(str, ITL_BUCKETS), "+Inf"), self.itl_counts):
            cum += n
            buckets.append((le, cum))
        yield HistogramMetricFamily("pdserve:inter_token_latency_seconds",
                                    "Inter-token latency.", buckets=buckets,
                                    sum_value=self.itl_sum)


class _LoadCollector:
    def __init__(self, loads, coordinator) -> None:
        self.loads, self.coordinator = loads, coordinator

    def describe(self) -> list:
        return []  # values come at collect time only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ("worker", "role")
        running = GaugeMetricFamily("pdserve:num_requests_running",
                                    "Requests running on a worker (last heartbeat).", labels=labels)
        waiting = GaugeMetricFamily("pdserve:num_requests_waiting",
                                    "Requests waiting on a worker (last heartbeat).", labels=labels)
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc",
                                  "KV-cache usage of a worker, 0..1 (last heartbeat).",
                                  labels=labels)
        queued = GaugeMetricFamily("pdserve:prefill_queued_tokens",
                                   "Prompt tokens queued on a worker (last heartbeat).",
                                   labels=labels)
        queries = CounterMetricFamily("pdserve:prefix_cache_queries",
                                      "Prompt tokens looked up in a worker's prefix cache.",
                                      labels=labels)
        hits = CounterMetricFamily("pdserve:prefix_cache_hits",
                                   "Prompt tokens found in a worker's prefix cache.",
                                   labels=labels)
        roles: dict[str, int] = {}
        for wid, role, load in self.loads():
            queries.add_metric((wid, role), load.prefix_cache_queries)
            hits.add_metric((wid, role), load.prefix_cache_hits)
            running.add_metric((wid, role), load.running)
            waiting.add_metric((wid, role), load.waiting)
            total = load.total_blocks
            usage.add_metric((wid, role), 1.0 - load.free_blocks / total if total else 0.0)
            queued.add_metric((wid, role), load.queued_prefill_tokens)
            roles[role] = roles.get(role, 0) + 1
        workers = GaugeMetricFamily("pdserve:workers", "Live workers, by role.", labels=("role",))
        for role in ("prefill", "decode", "both"):
            workers.add_metric((role,), roles.get(role, 0))
        active, queued_coord = self.coordinator()
        yield from (running, waiting, usage, queued, queries, hits, workers)
        yield GaugeMetricFamily("pdserve:coordinator_requests_active",
                                "Requests in flight at the coordinator.", value=active)
        yield GaugeMetricFamily("pdserve:coordinator_requests_queued",
                                "Requests waiting at the coordinator for decode KV blocks.",
                                value=queued_coord)


def make_metrics() -> NoMetrics:
    """Metrics() when prometheus_client is installed, else NoMetrics()."""
    try:
        return Metrics()
    except ImportError:
        log.info("prometheus_client is not installed: no metrics (pip install pdserve[http])")
        return NoMetrics()

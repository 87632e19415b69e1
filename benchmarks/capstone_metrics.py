"""Per-request timelines and the statistics of `pdserve bench capstone`: TTFT, TPOT, ITL,
E2E latency, throughput, goodput and SLO attainment over a measurement window, under
`vllm bench serve`'s field names. Pure Python, no I/O.

ITL from streamed chunks: a chunk that carries k tokens and arrives g seconds after the
previous chunk contributes k gaps of g / k (its time is shared evenly by its tokens); the
extra tokens of the first chunk contribute gaps of 0. So a request's ITLs sum to
(last token time - first token time) and there are (output tokens - 1) of them: their mean
is the request's TPOT. (vLLM records one gap per chunk, which equals this when every chunk
carries one token.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.benchmarks.serve_workload import percentile

SLO_KEYS = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys, values in ms
CUT = "not finished within the run's time limit (cut by the time budget)"


@dataclass(slots=True)
class RequestResult:
    """Client-side timeline of one request (seconds on one monotonic clock) plus what the
    server reported on the final chunk (`server`: queue_ms, prefill_ms, transfer_ms,
    kv_bytes, prefill_worker, decode_worker, and reserve_wait_ms in runs since branch plan7,
    accept_ms since 27204e0: capstone_client.SERVER_KEYS; empty for other engines)."""

    t_send: float
    prompt_tokens: int
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens)
    error: str = ""
    server: dict = field(default_factory=dict)
    target_tokens: int = 0  # output length asked for

    @property
    def output_tokens(self) -> int:
        return sum(k for _, k in self.chunks)

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0

    @property
    def cut(self) -> bool:
        """Cut by the run's time limit after its first token (see capstone_budget.py): it is
        judged against the SLOs on the part observed, and not counted as completed."""
        return self.error == CUT and self.output_tokens > 0

    @property
    def ttft_s(self) -> float:
        return self.chunks[0][0] - self.t_send if self.chunks else math.nan

    @property
    def e2el_s(self) -> float:
        return self.chunks[-1][0] - self.t_send if self.chunks else math.nan

    @property
    def t_end(self) -> float:
        return self.chunks[-1][0] if self.chunks else math.nan

    @property
    def tpot_s(self) -> float:
        """(last token - first token) / (tokens - 1); NaN with fewer than 2 tokens."""
        n = self.output_tokens
        return (self.chunks[-1][0] - self.chunks[0][0]) / (n - 1) if n >= 2 else math.nan

    def itls_s(self) -> list[float]:
        """Per-token gaps (see the module docstring)."""
        if not self.chunks:
            return []
        out = [0.0] * (self.chunks[0][1] - 1)
        for (t0, _), (t1, k) in zip(self.chunks, self.chunks[1:]):
            out += [(t1 - t0) / k] * k
        return out

    def to_json(self) -> dict:
        return {"t_send": self.t_send, "prompt_tokens": self.prompt_tokens,
                "chunks": self.chunks, "error": self.error, "server": self.server,
                "target_tokens": self.target_tokens}

    @classmethod
    def from_json(cls, d: dict) -> RequestResult:
        return cls(d["t_send"], d["prompt_tokens"], [tuple(c) for c in d["chunks"]],
                   d.get("error", ""), d.get("server", {}), d.get("target_tokens", 0))


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms; vLLM's --goodput)."""
    out: dict[str, float] = {}
    for item in items:
        k, sep, v = item.partition(":")
        k = k.strip().lower()
        if not sep or k not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {', '.join(SLO_KEYS)}; got {item!r}")
        ms = float(v)
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        out[k] = ms
    return out


def meets(r: RequestResult, slos: dict[str, float]) -> bool:
    """Finished (or cut by the time limit after its first token: judged on what was seen)
    and within every given SLO (a 1-token output has no TPOT: not checked)."""
    if not (r.ok or r.cut):
        return False
    vals = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2el_s}
    return all(math.isnan(vals[k]) or vals[k] * 1e3 <= ms for k, ms in slos.items())


@dataclass(frozen=True, slots=True)
class Window:
    """Measured requests by arrival order: the first `warmup` and last `cooldown` fractions
    of the sent requests are excluded (ramp-up and drain)."""

    warmup: float = 0.1
    cooldown: float = 0.1

    def select(self, results: Sequence[RequestResult]) -> list[RequestResult]:
        order = sorted(results, key=lambda r: r.t_send)
        n = len(order)
        lo = math.floor(n * self.warmup)
        hi = n - math.floor(n * self.cooldown)
        return order[lo:hi] if hi > lo else order

    def describe(self) -> str:
        return (f"requests sent after the first {self.warmup:.0%} and before the last "
                f"{self.cooldown:.0%} of arrivals (ramp-up and drain excluded); duration = "
                "first send to last finish of those requests")


def steady_rates(lo_s: float, hi_s: float,
                 ends: Iterable[tuple[float, bool]]) -> tuple[float, float]:
    """(completions/s, SLO-meeting completions/s) of the requests that finished within
    [lo_s, hi_s] (the send span of the measured requests), from (finish time, met SLOs).
    While the server keeps up this equals the offered rate however short the run; once it
    saturates, its service rate. (vLLM's request_throughput divides by first send to last
    finish, so a short run's drain pulls it under the offered rate.)"""
    span = hi_s - lo_s
    if not span > 0:
        return math.nan, math.nan
    done = [good for t, good in ends if lo_s <= t <= hi_s]
    return len(done) / span, sum(done) / span


def _stats(prefix: str, values_ms: Sequence[float], out: dict) -> None:
    xs = [v for v in values_ms if not math.isnan(v)]
    mean = sum(xs) / len(xs) if xs else math.nan
    out[f"mean_{prefix}_ms"] = mean
    out[f"median_{prefix}_ms"] = percentile(xs, 50)
    out[f"std_{prefix}_ms"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else math.nan
    for q in (90, 99):
        out[f"p{q}_{prefix}_ms"] = percentile(xs, q)


def summarize(results: Sequence[RequestResult], slos: dict[str, float],
              window: Window = Window()) -> dict:
    """One run's summary in `vllm bench serve` field names, over the window."""
    sel = window.select(results)
    ok = [r for r in sel if r.ok]
    t0 = min((r.t_send for r in sel), default=0.0)
    t1 = max((r.t_end for r in ok), default=t0)
    dur = t1 - t0
    per_s = lambda x: x / dur if dur > 0 else math.nan  # noqa: E731
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    good = sum(meets(r, slos) for r in sel)
    s: dict = {"duration": dur, "num_prompts": len(results), "measured": len(sel),
               "completed": len(ok), "failed": len(sel) - len(ok),
               "total_input_tokens": in_tok, "total_output_tokens": out_tok,
               "request_throughput": per_s(len(ok)), "request_goodput": per_s(good),
               "output_throughput": per_s(out_tok), "total_token_throughput": per_s(in_tok + out_tok),
               "slo_attainment": good / len(sel) if sel else math.nan}
    lo = min((r.t_send for r in sel), default=0.0)
    hi = max((r.t_send for r in sel), default=0.0)
    s["steady_throughput"], s["steady_goodput"] = steady_rates(
        lo, hi, ((r.t_end, meets(r, slos)) for r in results if r.ok))
    local = [r for r in ok if r.server.get("prefill_worker")]
    s["local_prefill_fraction"] = (sum(r.server["prefill_worker"] == r.server.get("decode_worker")
                                       for r in local) / len(local)) if local else math.nan
    _stats("ttft", [r.ttft_s * 1e3 for r in ok], s)
    _stats("tpot", [r.tpot_s * 1e3 for r in ok], s)
    _stats("itl", [g * 1e3 for r in ok for g in r.itls_s()], s)
    _stats("e2el", [r.e2el_s * 1e3 for r in ok], s)
    for key in ("queue_ms", "prefill_ms", "transfer_ms"):
        vals = [r.server[key] for r in ok if key in r.server]
        s[f"mean_{key}"] = sum(vals) / len(vals) if vals else math.nan
    kvb = [r.server["kv_bytes"] for r in ok if r.server.get("kv_bytes")]
    s["mean_kv_bytes"] = sum(kvb) / len(kvb) if kvb else math.nan
    return s


def attainment(results: Sequence[RequestResult], slos: dict[str, float],
               window: Window = Window()) -> float:
    sel = window.select(results)
    return sum(meets(r, slos) for r in sel) / len(sel) if sel else math.nan


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical CDF (NaNs dropped)."""
    xs = sorted(v for v in values if not math.isnan(v))
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]

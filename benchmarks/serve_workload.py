"""The workload and the statistics of `pdserve bench serve`, apart from its runner: Poisson
arrivals with prompt/output lengths drawn uniformly, per-request records, percentiles and
goodput against the TTFT/TPOT SLOs. Pure Python, no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


# -- the workload ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Job:
    at_s: float  # send time after the start of the rate's run
    prompt: list[int]
    output_len: int


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Poisson process: n send offsets with exponential gaps of mean 1/rate; first at 0."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def make_jobs(n: int, rate: float, input_len: tuple[int, int], output_len: tuple[int, int],
              vocab: int, seed: int) -> list[Job]:
    """The same seed gives the same prompts, lengths and arrivals (for --compare)."""
    rng = random.Random(seed)
    times = arrival_times(n, rate, rng)
    hi = max(2, vocab)
    return [Job(t, [rng.randrange(1, hi) for _ in range(rng.randint(*input_len))],
                rng.randint(*output_len)) for t in times]


# -- the summary -----------------------------------------------------------------------------
@dataclass(slots=True)
class Record:
    """Client-side timestamps of one request (time.perf_counter seconds)."""

    t_send: float
    prompt_tokens: int
    t_first: float = math.nan
    t_end: float = math.nan
    output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0 and not math.isnan(self.t_end)

    @property
    def ttft_s(self) -> float:
        return self.t_first - self.t_send

    @property
    def tpot_s(self) -> float:
        """Mean gap between output tokens after the first; NaN with fewer than 2 tokens."""
        if self.output_tokens < 2:
            return math.nan
        return (self.t_end - self.t_first) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.t_end - self.t_send


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaNs are ignored;
    NaN for no values."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def meets_slo(r: Record, slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """Finished, TTFT within its SLO, and TPOT within its SLO (a 1-token output has no TPOT)."""
    if not r.ok or r.ttft_s * 1e3 > slo_ttft_ms:
        return False
    tpot = r.tpot_s
    return math.isnan(tpot) or tpot * 1e3 <= slo_tpot_ms


def summarize(records: Sequence[Record], slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """Throughput, latency percentiles (ms) and goodput of one rate's run."""
    ok = [r for r in records if r.ok]
    t0 = min((r.t_send for r in records), default=0.0)
    t1 = max((r.t_end for r in ok), default=t0)
    dur = t1 - t0
    out_tokens = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    ms = lambda xs: [x * 1e3 for x in xs]  # noqa: E731
    ttft, tpot, e2e = ms(r.ttft_s for r in ok), ms(r.tpot_s for r in ok), ms(r.e2e_s for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": dur,
        "throughput_rps": len(ok) / dur if dur > 0 else math.nan,
        "output_tok_s": out_tokens / dur if dur > 0 else math.nan,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p90_ms": percentile(tpot, 90),
        "e2e_p50_ms": percentile(e2e, 50), "e2e_p90_ms": percentile(e2e, 90),
        "goodput": good / len(records) if records else math.nan,
        "goodput_rps": good / dur if dur > 0 else math.nan,
    }

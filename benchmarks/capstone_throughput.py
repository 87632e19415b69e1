"""Output token throughput per setup, from the clients' token arrivals: the highest rate
delivered over any 1-second window of any run, and whether it grew with the GPUs that
decode. Where it does not, the limit is shared by every setup and sits outside the GPUs
(every token travels as its own message through one coordinator process to one load
generator), which the report says with the numbers it rests on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.benchmarks.capstone_report import SetupResult

OUTSIDE_MS = 50.0  # a median wait outside the coordinator's handler longer than this is one
SCALES = 0.75  # "grew with the decode GPUs": the peak ratio is at least this x the GPU ratio


@dataclass(frozen=True, slots=True)
class Peak:
    setup: str
    decode_gpus: int  # GPUs that run decode steps (the decode pool, or every colocated GPU)
    tokens_per_s: float  # highest output tokens delivered in one 1-s window
    where: str  # "workload at R req/s"
    outside_ms: float = math.nan  # median client TTFT less the coordinator's own (ttft_ms)
    cpu_cores: dict[str, float] = field(default_factory=dict)  # by process (since 277402d)
    accept_ms: float = math.nan  # median client send -> coordinator handler start (session 15)


def decode_gpus(s: SetupResult) -> int:
    return sum(len(g) for role, g in s.pools.items() if role in ("decode", "both"))


def peak_tokens(s: SetupResult) -> Peak | None:
    """The highest 1-s window of delivered output tokens over the setup's runs (runs with
    per-request data only)."""
    best: Peak | None = None
    for wname, w in s.by_workload.items():
        for r in w.runs:
            if not r.results:
                continue
            per_s: Counter[int] = Counter()
            for q in r.results:
                for t, n in q.chunks:
                    per_s[math.floor(t)] += n
            if per_s and (best is None or max(per_s.values()) > best.tokens_per_s):
                best = Peak(s.setup, decode_gpus(s), float(max(per_s.values())),
                            f"{wname} at {r.rate:.3g} req/s", outside_ms(r.results),
                            dict(r.summary.get("cpu_cores") or {}), accept_ms(r.results))
    return best


def outside_ms(results) -> float:
    """Median over a run's requests of the client's TTFT less the coordinator's own
    (`ttft_ms`: its receipt of the request to its send of token 0; recorded since 6889ada):
    the time token 0 spent outside the coordinator's handler (NaN: not recorded)."""
    return _median([(q.chunks[0][0] - q.t_send) * 1e3 - q.server["ttft_ms"] for q in results
                    if q.chunks and q.server.get("ttft_ms")])


def accept_ms(results) -> float:
    """Median over a run's requests of `accept_ms` (capstone_client.with_accept_ms: the
    client's send to the coordinator's handler start), NaN where not recorded."""
    return _median([q.server["accept_ms"] for q in results if "accept_ms" in q.server])


def _median(values: list[float]) -> float:
    """The upper middle value (NaN for none)."""
    return sorted(values)[len(values) // 2] if values else math.nan


def where_waited(p: Peak) -> str:
    """Where token 0 waited outside the coordinator's handler, as far as the run says."""
    if not p.outside_ms > OUTSIDE_MS:
        return "no wait outside it"
    if p.accept_ms == p.accept_ms:
        if p.accept_ms > p.outside_ms / 2:
            return (f"the wait was in front of the coordinator's handler (a median "
                    f"{p.accept_ms:.3g} ms from the client's send to the handler's start, "
                    "`accept_ms`: the gRPC server's accept path on the coordinator's event "
                    "loop)")
        return (f"the wait was after the coordinator's send of token 0 (only {p.accept_ms:.3g} "
                "ms before its handler started: `accept_ms`), on the way to the load generator")
    return ("the wait was outside the coordinator's handler (in the load generator, or "
            "before the coordinator's server started the call)")


def throughput_lines(setups: Sequence[SetupResult]) -> list[str]:
    peaks = [p for p in map(peak_tokens, setups) if p is not None and p.decode_gpus > 0]
    if not peaks:
        return ["- not known (needs per-request data, which this run did not record)"]
    out = ["- highest output tokens/s delivered to the clients in any 1-s window (all runs): "
           + "; ".join(f"{p.setup} {p.tokens_per_s:,.0f} ({p.decode_gpus} decode GPU"
                       f"{'s' if p.decode_gpus > 1 else ''}, "
                       f"{p.tokens_per_s / p.decode_gpus:,.0f} per GPU; {p.where})"
                       for p in peaks)]
    lo, hi = min(peaks, key=lambda p: p.decode_gpus), max(peaks, key=lambda p: p.decode_gpus)
    if hi.decode_gpus >= 2 * lo.decode_gpus:
        ratio, gpus = hi.tokens_per_s / lo.tokens_per_s, hi.decode_gpus / lo.decode_gpus
        out.append(
            f"- with {gpus:.3g}x the decode GPUs ({hi.setup} against {lo.setup}) the peak is "
            f"{ratio:.2g}x: " + (
                "it grew with the GPUs." if ratio >= SCALES * gpus else
                "it grew less than the GPUs, so a limit every setup shares, outside the GPUs, "
                "sets it: the one coordinator process, through which each token travels as "
                "its own message (`pdserve bench coordinator` measures its cost per token), "
                "and the load generator that receives them (its processes: results.json "
                "meta 'load processes')."))
    for p in peaks:
        if p.outside_ms == p.outside_ms:
            out.append(f"- {p.setup}, {p.where}: the client's TTFT exceeded the "
                       "coordinator's own (`ttft_ms`: its start of the call to its send of "
                       f"token 0) by a median {p.outside_ms:.3g} ms: " + where_waited(p)
                       + cpu_note(p.cpu_cores))
    return out


def cpu_note(cores: dict[str, float]) -> str:
    """The run's CPU use by process, as the report says it ('' when not recorded): a
    Python process's one event loop runs on one core at a time, and what it uses beyond
    one is gRPC's own threads."""
    if not cores:
        return ""
    names = {"coordinator": "the coordinator", "harness": "the load generator",
             "other": "the rest of the host (workers included)"}
    return ("; CPU cores used over that run: " + ", ".join(
        f"{names.get(g, g)} {c:.2f}" for g, c in cores.items()))

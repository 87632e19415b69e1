"""The decode step profile: a decode worker's step time against its batch, its context and
whether the step could overlap the host's work for the step before it, fitted on each P/D
request's time per token.

    decode_step_ms(B, ctx, sync) = c0 + c_seq B + c_ctx_token ctx + sync (c_sync + c_sync_seq B)

Why the `sync` part (engine/step_pipeline.py, Scheduler.schedule_ahead): the engine
launches step N+1 before reading step N's tokens only for an unchanged decode batch: every
running sequence decodes one token, none ends by length in step N, nothing waits to be
admitted. Any other step (a sequence finished in the step before, a landed request admitted,
a prompt chunk) is planned after the step before it is applied, so the host's work for that
step (stop checks, streaming, freeing: per sequence) is not hidden behind the GPU's. On the
2 x H100 run (capstone-2gpu) the steps rebuilt from token times show it within one run and
batch range: 1P1D sharegpt-synth at 16 req/s, 16-32 sequences, 7.39 ms (278 steps) when the
batch was the one before, 9.49 ms (27) when it was not; 32-64 sequences 7.59 against 10.07.
It is also why a single line through every run over-charged the steady ones: the saturated
run (decode-heavy at 103 req/s, 245 sequences) changes its batch in ~90% of its steps (a
sequence ends in almost every one), the steady ones in 16-50%, so its 22 ms steps pulled the
line's slope to 0.064 ms a sequence, against 0.022 for an unchanged batch.

Points (`decode_points`): per P/D request, from its second token (the decode worker's first;
token 0 is the prefill worker's) to its last: the mean step time, the mean number of
requests decoding on the same worker (`decode_worker`) over that span and their mean
context, and the share of its steps that were synchronous, estimated from the other
requests that joined (second token) or left (last token) the worker's batch during the span:
with n such events over s steps, 1 - exp(-n / s) of the steps (events falling on the same
step count once). Fitted by least squares with non-negative coefficients on every P/D run,
each run weighing the same whatever its number of requests (`fit_decode`'s `runs`).

Why each run weighs the same (session 13): weighted by request, the one overloaded run with
the most requests (3P1D prefill-heavy at 139 req/s on 4 x H100: 1,750 requests, 36
sequences of ~1,170 tokens, 17.4 ms a step, nearly every step changed) set the synchronous
part per sequence to 0.161 ms, and with it the step of a decode-heavy batch of 150 at 30 ms
(measured: 16 ms). Fitted on one calibration run and checked on the P/D runs of the other
runs of the same code and host (benchmarks/results, capstone-*-0e81fab and *-f5dfaa6): mean
|error| of a run's mean step 5.8% and largest 33%, against 16% and 95% by request.

Requests decoding while the relay was saturated (capstone_relay.saturated_windows) are
left out: the client saw their tokens at the relay's pace, not the worker's. They still
count in the batch of the others. Until session 13 whole runs were left out, and with them
the largest batches the run reached before its relay backed up: the fit then extrapolated
from batches of 55 to 150.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_records import read_records
from pdserve.benchmarks.capstone_relay import saturated_windows
from pdserve.benchmarks.capstone_steps import nonneg_lstsq

DECODE_FIT = "token1-sync-run"  # meta["decode_fit"]: the synchronous part, runs weighed alike
SYNC_FITS = ("token1-sync", DECODE_FIT)  # fits with the synchronous part (older: by request)


def token1_s(r: RequestResult) -> float:
    """When the request's second token arrived (the decode worker's first), NaN if none."""
    seen = 0
    for t, k in r.chunks:
        seen += k
        if seen >= 2:
            return t if seen - k >= 1 else math.nan  # token 0 and 1 in one chunk: unknown
    return math.nan


def decode_points(results: Sequence[RequestResult], skip: Sequence[tuple[float, float]] = ()
                  ) -> list[tuple[float, float, float, float]]:
    """(mean batch, mean total context, share of synchronous steps, ms per decode step) per
    request, from its second token to its last, with the batch counted over requests
    decoding on the same worker (`decode_worker`) during that span (module docstring);
    none for a request whose span overlaps one of the `skip` intervals (start, end: s)."""
    spans = [(token1_s(r), r.t_end, r.prompt_tokens, r.output_tokens,
              r.server.get("decode_worker", "")) for r in results if r.ok and r.output_tokens > 3]
    spans = [s for s in spans if not math.isnan(s[0])]
    out = []
    for a0, a1, _pin, nout, w in spans:
        if a1 <= a0 or overlaps(a0, a1, skip):
            continue
        batch = ctx = 0.0
        events = 0
        for b0, b1, bin_, bout, bw in spans:
            if bw != w:
                continue
            overlap = min(a1, b1) - max(a0, b0)
            if overlap > 0:
                frac = overlap / (a1 - a0)
                batch += frac
                ctx += frac * (bin_ + bout / 2)
            events += (a0 < b0 < a1) + (a0 < b1 < a1)  # joined, left during the span
        steps = nout - 2
        out.append((batch, ctx, 1.0 - math.exp(-events / steps), (a1 - a0) / steps * 1e3))
    return out


def overlaps(a0: float, a1: float, intervals: Sequence[tuple[float, float]]) -> bool:
    """Whether [a0, a1] overlaps one of `intervals` ((start, end), s)."""
    return any(a0 < hi and a1 > lo for lo, hi in intervals)


def fit_decode(points: Sequence[tuple[float, float, float, float]],
               runs: Sequence[int] | None = None) -> dict[str, float]:
    """The profile's coefficients (c0, c_seq, c_ctx_token, c_sync, c_sync_seq) fitted on
    `decode_points`; `runs`: each point's run (an id), the runs weighing the same (None:
    every point weighs the same); "max_batch": the largest mean batch among them (the
    profiled range)."""
    if len(points) < 3:
        raise ValueError("need at least 3 decode points")
    x = np.array([[1.0, b, c, f, f * b] for b, c, f, _ in points])
    y = np.array([p[3] for p in points])
    if runs is not None:
        _, inverse, counts = np.unique(np.asarray(runs), return_inverse=True,
                                         return_counts=True)
        w = 1.0 / np.sqrt(counts[inverse])  # squared: 1 / the run's points, per point
        x, y = x * w[:, None], y * w
    c = nonneg_lstsq(x, y)
    return {"c0": c[0], "c_seq": c[1], "c_ctx_token": c[2], "c_sync": c[3],
            "c_sync_seq": c[4], "max_batch": max(p[0] for p in points)}


def pd_runs(run_dir: str) -> dict[str, list[RequestResult]]:
    """The P/D runs (xPyD setups, not conditional ones: their decode workers prefill too)
    of a run directory's requests.json.gz, every rate, by run key; {} without per-request
    data."""
    from pdserve.benchmarks.planner_setups import parse_setup

    doc = read_records(run_dir)
    if doc is None:
        return {}
    out = {}
    for key, rows in doc.get("runs", {}).items():
        try:
            kind = parse_setup(key.split("|")[0]).kind
        except ValueError:
            continue
        if kind == "P/D":
            out[key] = [RequestResult.from_json(x) for x in rows]
    return out


def fit_decode_unsaturated(cal, run_dir: str, always: bool = True) -> bool:
    """cal.decode fitted on `run_dir`'s P/D runs but their requests that decoded while the
    relay was saturated (their token times are the relay's: capstone_relay.saturated_windows);
    `always` False: only when there are such requests."""
    sat = (saturated_windows(run_dir, cal.max_batch, cal.prefill_token_budget, "P/D")
           if cal.relay else {})
    if not (always or sat):
        return False
    runs = pd_runs(run_dir)
    return fit_runs(cal, list(runs.values()), [sat.get(k, []) for k in runs])


def fit_runs(cal, runs: Sequence[Sequence[RequestResult]],
             skips: Sequence[Sequence[tuple[float, float]]] | None = None) -> bool:
    """cal.decode (a capstone_calibration.Calibration) fitted on the P/D requests of `runs`,
    the runs weighing the same, but those decoding during one of their run's `skips`
    intervals (start, end: s; relay-saturated windows); False (cal unchanged) with fewer
    than 3 points."""
    skips = skips or [()] * len(runs)
    dec, ids = [], []
    for k, (run, skip) in enumerate(zip(runs, skips)):
        pts = [p for p in decode_points(run, skip) if not math.isnan(p[3])]
        dec += pts
        ids += [k] * len(pts)
    if len(dec) < 3:
        return False
    left_out = sum(1 for run, skip in zip(runs, skips) if skip for r in run
                   if r.ok and overlaps(token1_s(r), r.t_end, skip))
    fitted = fit_decode(dec, ids)
    cal.meta["decode_max_batch"] = f"{fitted.pop('max_batch'):.1f}"
    cal.meta["decode_fit"] = DECODE_FIT
    cal.decode = fitted
    cal.source["decode"] = (f"measured ({len(dec)} requests of {len(set(ids))} runs, each run "
                            f"weighing the same; batches up to "
                            f"{cal.meta['decode_max_batch']} per decode worker; a step whose "
                            f"batch changed adds {fitted['c_sync']:.3g} ms + "
                            f"{fitted['c_sync_seq']:.3g} ms a sequence"
                            + (f"; {left_out} requests left out: they decoded while the relay "
                               "was saturated, so their token times are the relay's"
                               if left_out else "") + ")")
    cal.meta["decode_left_out"] = str(left_out)
    return True

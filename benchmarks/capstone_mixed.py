"""The colocated (mixed) step profile: what prompt chunks add to a decode step on a worker
that prefills and decodes in one forward, fitted on the colocated workers' steps rebuilt
from per-request token times.

A colocated step that computes T prompt tokens beside B decoding sequences lasts

    decode_step_ms(B, ctx, sync=True) + mixed_ms(T)
    mixed_ms(T) = c0 + c_token * max(0, T - knee_tokens)       (Calibration.mixed)

the same knee form as the prefill profile, fitted on its own points: the decode step
already pays the launch and host work a prefill worker's step pays in its fixed part, so a
prompt part neither starts nor bends where a prefill worker's step does (2 x H200: prompts
under 400 tokens add about 8 ms, longer ones about 0.021 ms a token, from 15 ms at 600
tokens to 77 ms at 3700; the prefill profile's knee is at 710, past which it adds 0.024 ms
a token to 18.6 ms). The fit (`fit_knee_l1`) is a least-absolute-deviation one, the line's
analogue of a median: step times rebuilt from the client's token arrivals have a long
right tail (delivery jitter, host hiccups), which pulls a least-squares fit up by 2 ms
where most points lie (prompts under 400 tokens: 10.2 ms against a median of 8). No
attention term: the prefill profile found none on the same GPUs (c_token2 0).

Points (`mixed_steps`): a step of a colocated worker is the tokens of one worker reaching
the client within STEP_GAP_S of each other (`capstone_steps.worker_steps`); its time runs
from the previous step's end on the same worker; its prompt tokens are those of the
prompts whose token 0 it made; the points are the steps with >= 1 prompt and >= 1 decoding
sequence, in colocated runs that kept up (`steady`: past saturation the client's token
times lag the steps), without prompts that an earlier run of the same setup sent (they may
hit the prefix cache: `capstone_steps.warm_counts`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_records import read_records
from pdserve.benchmarks.capstone_steps import (
    KNEE_QUANTILES,
    nonneg_lstsq,
    prompt_key,
    warm_counts,
    worker_steps,
)

if TYPE_CHECKING:
    from pdserve.benchmarks.capstone_calibration import Calibration

MIN_MIXED_STEPS = 20  # colocated steps with prompts needed to fit the mixed profile
L1_ITERATIONS = 50  # reweighted least-squares passes of the least-absolute-deviation fit
L1_FLOOR_MS = 0.5  # residuals under this weigh as this (keeps the weights finite)


def fit_knee_l1(tokens: Sequence[float], ms: Sequence[float]) -> dict[str, float]:
    """ms ~ c0 + c_token max(0, T - knee_tokens) minimizing the sum of absolute errors
    (iteratively reweighted least squares, non-negative coefficients), the knee among 0 and
    the quantiles of T (capstone_steps.KNEE_QUANTILES) that errs least."""
    t, y = np.asarray(tokens, dtype=float), np.asarray(ms, dtype=float)
    best: tuple[float, dict[str, float]] = (math.inf, {})
    for knee in sorted({0.0, *np.quantile(t, KNEE_QUANTILES).tolist()}):
        x = np.stack([np.ones_like(t), np.maximum(0.0, t - knee)], 1)
        w = np.ones_like(y)
        for _ in range(L1_ITERATIONS):
            c = np.array(nonneg_lstsq(x * np.sqrt(w)[:, None], y * np.sqrt(w)))
            w = 1.0 / np.maximum(np.abs(x @ c - y), L1_FLOOR_MS)
        err = float(np.abs(x @ c - y).sum())
        if err < best[0]:
            best = (err, {"c0": float(c[0]), "c_token": float(c[1]), "c_token2": 0.0,
                          "knee_tokens": float(knee)})
    return best[1]


def split_steps(steps: Sequence[tuple[float, list]]) -> set[int]:
    """Indices of rebuilt steps (`capstone_steps.worker_steps`) that are not one whole
    engine step: every running sequence gets a token in every step (engine/scheduler.py
    gives the budget to running sequences first), so a step between two consecutive tokens
    of one request that lacks it is part of a step whose tokens reached the client in more
    than one burst (their delivery spread past STEP_GAP_S: on 2 x H200, every step of
    2both sharegpt-synth at 64 req/s but 4 with a prompt, which then seem to last 1-2 ms,
    less than a decode step). Its time, and the next step's, are not a step's."""
    last: dict[int, int] = {}
    out: set[int] = set()
    for m, (_, toks) in enumerate(steps):
        for i, _k in toks:
            if i in last and m > last[i] + 1:
                out.update(range(last[i] + 1, m))
            last[i] = m
    return out


def mixed_steps(results: Sequence[RequestResult], decode_ms: Callable[[int, float, bool], float],
                warm: int = 0) -> list[tuple[int, float, float]]:
    """(prompt tokens, their sum of squares, ms the prompts added) per colocated step that
    made token 0 of >= 1 prompt prefilled on this worker beside >= 1 decoding sequence: the
    step's time (from the previous step's end on the same worker) less `decode_ms(B,
    context, True)` of its decoding sequences (a step with a prompt is planned after the one
    before it is applied: a synchronous one, capstone_decode.py); the step and the one before it whole
    (`split_steps`). Steps with a token 0 of the first `warm` requests
    (in send order: prompts an earlier run sent, maybe prefix-cache hits) are left out."""
    order = sorted(range(len(results)), key=lambda i: results[i].t_send)
    hot = set(order[:warm])

    def local(i: int) -> bool:
        sv = results[i].server
        return sv.get("prefill_worker", "") in ("", sv.get("decode_worker", ""))
    out = []
    for steps in worker_steps(results).values():
        split = split_steps(steps)
        for m in range(1, len(steps)):
            (t0, _), (t1, toks) = steps[m - 1], steps[m]
            if m in split or m - 1 in split:
                continue
            firsts = [i for i, k in toks if k == 0 and local(i)]
            dec = [(i, k) for i, k in toks if k >= 1]
            if not firsts or not dec or hot.intersection(firsts):
                continue
            ctx = sum(results[i].prompt_tokens + k for i, k in dec)
            tokens = sum(results[i].prompt_tokens for i in firsts)
            sq = float(sum(results[i].prompt_tokens ** 2 for i in firsts))
            out.append((tokens, sq, (t1 - t0) * 1e3 - decode_ms(len(dec), ctx, True)))
    return out


def steady(summary: dict, slos: dict[str, float], target: float) -> bool:
    """A run whose workers kept up with its arrivals: it held the attainment target, or
    its TTFT p90 stayed within the TTFT SLO (no queue built; what it missed was TPOT or
    E2E, the interference of prompts with decodes that the mixed profile measures: 2both
    prefill-heavy on 2 GPUs sits at 0.78-0.97 attainment with TTFT p90 85-143 ms, so a
    profile from held runs alone had no step with a prompt over 1024 tokens)."""
    if summary.get("slo_attainment", 0.0) >= target:
        return True
    ttft = slos.get("ttft")
    return ttft is not None and summary.get("p90_ttft_ms", math.inf) <= ttft


def fit_mixed(cal: Calibration, runs: Sequence[tuple[Sequence[RequestResult], int]]) -> bool:
    """Fit `cal.mixed` on the steps of colocated runs (results, warm count), once
    `cal.decode` is fitted; False (cal unchanged) with fewer than MIN_MIXED_STEPS points or
    fewer than 3 distinct prompt sizes, or for workers that streamed several tokens a
    message (`cal.meta["stream interval"]`): a step's tokens then do not reach the client
    together, so no step can be rebuilt from their arrivals."""
    if int(cal.meta.get("stream interval", 1)) > 1:
        cal.source["mixed"] = "not fitted: the workers streamed several tokens a message"
        return False
    pts = [p for run, warm in runs for p in mixed_steps(run, cal.decode_step_ms, warm)]
    if len(pts) < MIN_MIXED_STEPS or len({t for t, _, _ in pts}) < 3:
        return False
    cal.mixed = m = fit_knee_l1([t for t, _, _ in pts], [ms for _, _, ms in pts])
    cal.source["mixed"] = (f"measured (least absolute deviations on {len(pts)} colocated "
                           f"steps with prompts beside decodes): decode step + {m['c0']:.3g} "
                           f"ms + {m['c_token']:.3g} ms a prompt token past "
                           f"{m['knee_tokens']:.0f}")
    return True


def steady_colocated_runs(run_dir: str, res: dict) -> list[tuple[list[RequestResult], int]]:
    """The colocated runs of a run directory (requests.json.gz) that kept up (`steady`),
    each with its warm count; [] without per-request data."""
    from pdserve.benchmarks.planner_setups import parse_setup

    doc = read_records(run_dir)
    if doc is None:
        return []
    per_run = doc.get("runs", {})
    rows_of = {(r["setup"], r["workload"], float(r["request_rate"])): r
               for r in res["runs"] if r["request_rate"] != "inf"}
    runs = []  # (prompt key, results, held the target, colocated), in the order they ran
    for key, rows in per_run.items():
        setup, workload, rate, _ = key.split("|")
        try:
            both = parse_setup(setup).both > 0
        except ValueError:
            both = False
        row = rows_of.get((setup, workload, float(rate)), {})
        held = steady(row, res.get("slos", {}), res.get("target", 0.9))
        runs.append((prompt_key(setup, workload, row), [RequestResult.from_json(x) for x in rows],
                     held, both))
    warm = warm_counts([(k, rs) for k, rs, _, _ in runs])
    return [(rs, w) for (_, rs, held, both), w in zip(runs, warm) if held and both]

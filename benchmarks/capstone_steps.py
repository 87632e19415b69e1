"""The prefill workers' steps, rebuilt from per-request timings, and the prefill profile
fitted on them (batched and chunked steps included, stalls left out)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pdserve.benchmarks.capstone_metrics import RequestResult


def nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares y ~ x @ c; coefficients that come out negative are dropped (set to 0)
    and the rest refitted, so every profile is non-decreasing in its inputs."""
    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        c, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (c >= 0).all():
            coef[keep] = c
            break
        keep = [k for k, v in zip(keep, c) if v >= 0] if (c >= 0).any() else []
    return [float(v) for v in coef]

STEP_TOL_MS = 0.5  # prompts of one prefill step report the same prefill_ms within this
START_TOL_S = 0.010  # ... and token 0 less prefill_ms (the step's start) within this


def prefill_steps(results: Sequence[RequestResult], budget: int = 8192
                  ) -> list[tuple[int, float, float]]:
    """The prefill workers' steps of one run, (prompt tokens, attention term sum_sq, ms),
    rebuilt from per-request timings (no worker exposes step times: its Stats RPC gives
    only its load). A prefill worker reports each prompt's prefill_ms from the start of the
    step with its first chunk to the end of the step with its last (worker/core.py
    `timings`); the prompts of one step share both, so on one worker they report the same
    prefill_ms and their token 0 less prefill_ms (the step's start, on the client's clock)
    agrees within the delivery jitter. A prompt chunked over two steps (the scheduler fills
    the token budget, engine/scheduler.py) shares the start of the earlier step but reports
    a longer time: the earlier step was full (`budget` tokens) and its rest ran first in
    the step that ended at its token 0. Steps that only continued a chunked prompt are
    left out (their length is known only with the next step's start)."""
    reqs = []
    for r in results:
        sv = r.server
        pm = sv.get("prefill_ms", 0.0)
        if r.ok and pm > 0 and sv.get("prefill_worker") \
                and sv.get("prefill_worker") != sv.get("decode_worker"):
            reqs.append((sv["prefill_worker"], r.chunks[0][0] - pm / 1e3, pm, r.prompt_tokens))
    out = []
    for w in sorted({q[0] for q in reqs}):
        mine = sorted((q for q in reqs if q[0] == w), key=lambda q: (q[1], q[2]))
        groups: list[list[tuple]] = []  # requests whose first chunk ran in one step
        for q in mine:
            if groups and q[1] - groups[-1][0][1] <= START_TOL_S:
                groups[-1].append(q)
            else:
                groups.append([q])
        carry, carry_sq = 0, 0.0  # a chunked prompt's tokens still to run, their attention
        carry_end = -math.inf  # when that prompt's last chunk ended (its token 0)
        for g in groups:
            dur = min(q[2] for q in g)
            whole = [q for q in g if q[2] <= dur + STEP_TOL_MS]
            chunked = [q for q in g if q[2] > dur + STEP_TOL_MS]
            start, end = g[0][1], g[0][1] + dur / 1e3
            tokens, sq = sum(q[3] for q in whole), float(sum(q[3] ** 2 for q in whole))
            if carry and abs(carry_end - end) <= START_TOL_S:  # its rest ran first here
                tokens, sq = tokens + carry, sq + carry_sq
            carry, carry_sq = 0, 0.0  # (else its rest ran in a step not observed)
            if chunked:
                first = max(0, budget - tokens)
                total = sum(q[3] for q in chunked)
                rest = max(0, total - first)
                tokens, sq = tokens + first, sq + first * first
                carry, carry_sq = rest, float(rest * (2 * first + rest))
                carry_end = max(start + q[2] / 1e3 for q in chunked)
            out.append((tokens, sq, dur))
    return out


def fit_prefill_steps(steps: Sequence[tuple[int, float, float]], outlier: float = 3.0
                      ) -> tuple[dict[str, float], int]:
    """prefill_ms = c0 + c_token T + c_token2 sum_sq fitted on steps; one pass leaves out
    the steps that took more than `outlier` x the first fit (stalls: a kernel compiled on
    first use, a host hiccup) and refits. Returns the profile and how many were left out."""
    x = np.array([[1.0, t, q] for t, q, _ in steps])
    y = np.array([ms for _, _, ms in steps])
    if len({t for t, _, _ in steps}) < 3:
        x[:, 2] = 0.0
    c = nonneg_lstsq(x, y)
    keep = y <= outlier * np.maximum(x @ np.array(c), 1e-9)
    if keep.sum() >= 3 and not keep.all():
        c = nonneg_lstsq(x[keep], y[keep])
    return {"c0": c[0], "c_token": c[1], "c_token2": c[2]}, int((~keep).sum())

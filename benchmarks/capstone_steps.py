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

# Prompts of one prefill step report the same prefill_ms within this; a prompt chunked
# over two steps reports at least the next step more (>= its fixed part, 7-12 ms). In the
# committed 4 x H100 runs the excess over a group's shortest splits at 2-3 ms: 0.5-2 ms for
# 1.1-1.4k prompts a run (the worker's per-prompt timestamps), >= 8 ms for most of the rest.
# At 0.5 ms those prompts counted as chunked and made 8192-token "steps" of 60-130 ms.
STEP_TOL_MS = 3.0
START_TOL_S = 0.010  # ... and token 0 less prefill_ms (the step's start) within this


def prefill_steps(results: Sequence[RequestResult], budget: int = 8192, warm: int = 0
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
    left out (their length is known only with the next step's start).

    A group whose tokens come to more than `budget` is not one step (two steps that
    started within START_TOL_S, or a chunked prompt taken for a whole one): left out.

    `warm`: the first `warm` requests (in send order) resend prompts that an earlier run of
    the same setup sent (`warm_counts`), so their worker may have found them in its prefix
    cache and computed only a few tokens; steps holding any of them are left out (a cold
    profile: the simulator models the cache itself, planner_cache.py)."""
    order = sorted(range(len(results)), key=lambda i: results[i].t_send)
    hot = {id(results[i]) for i in order[:warm]}
    reqs = []
    for r in results:
        sv = r.server
        pm = sv.get("prefill_ms", 0.0)
        if r.ok and pm > 0 and sv.get("prefill_worker") \
                and sv.get("prefill_worker") != sv.get("decode_worker"):
            reqs.append((sv["prefill_worker"], r.chunks[0][0] - pm / 1e3, pm, r.prompt_tokens,
                         id(r) in hot))
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
            if not any(q[4] for q in g) and tokens <= budget:  # over it: not one step
                out.append((tokens, sq, dur))
    return out


KNEE_QUANTILES = tuple(q / 20 for q in range(19))  # candidate knees: quantiles of T


def _fit_knee(t: np.ndarray, q: np.ndarray, y: np.ndarray) -> tuple[list[float], float, float]:
    """(c0, c_token, c_token2), knee, squared error: the knee among the candidates whose
    least-squares fit of y ~ c0 + c_token max(0, T - knee) + c_token2 sum_sq errs least."""
    best: tuple[list[float], float, float] = ([0.0, 0.0, 0.0], 0.0, math.inf)
    if len(set(t.tolist())) < 3:
        q = np.zeros_like(q)
    for knee in sorted({0.0, *np.quantile(t, KNEE_QUANTILES).tolist()}):
        x = np.stack([np.ones_like(t), np.maximum(0.0, t - knee), q], 1)
        c = nonneg_lstsq(x, y)
        err = float(((x @ np.array(c) - y) ** 2).sum())
        if err < best[2]:
            best = (c, float(knee), err)
    return best


def fit_prefill_steps(steps: Sequence[tuple[int, float, float]], outlier: float = 3.0
                      ) -> tuple[dict[str, float], int]:
    """prefill_ms = c0 + c_token max(0, T - knee_tokens) + c_token2 sum_sq fitted on steps:
    a small step costs about the same whatever its tokens (host- and launch-bound: on
    2 x H200, 13-17 ms from 16 to 500 tokens), a large one grows with its tokens
    (compute-bound: 0.024 ms a token up to the 8192-token budget); one line through both
    underestimated the full steps by a quarter. The knee is the candidate (0 or a
    quantile of the steps' tokens) that fits best. One pass leaves out the steps that
    took more than `outlier` x the fit (stalls: a kernel compiled on first use, a host
    hiccup) and refits, then one leaves out those under 1 / `outlier` of it (a step
    rebuilt from prompts that did not share it) and refits. Returns the profile and how many were left out."""
    t = np.array([s[0] for s in steps], dtype=float)
    q = np.array([s[1] for s in steps], dtype=float)
    y = np.array([s[2] for s in steps], dtype=float)
    keep = np.ones(len(y), dtype=bool)
    for too_far in (lambda p: y > outlier * p, lambda p: y < p / outlier):  # stalls first
        c, knee, _ = _fit_knee(t[keep], q[keep], y[keep])
        out = too_far(np.maximum(c[0] + c[1] * np.maximum(0.0, t - knee) + c[2] * q, 1e-9))
        if (keep & ~out).sum() >= 3:
            keep &= ~out
    c, knee, _ = _fit_knee(t[keep], q[keep], y[keep])
    return ({"c0": c[0], "c_token": c[1], "c_token2": c[2], "knee_tokens": knee},
            int((~keep).sum()))


def prompt_key(setup: str, workload: str, summary: dict) -> str:
    """What shares prompts between runs: the setup (its workers' caches), the workload
    (one seed gives request i the same token ids at every rate) and the run's prompt salt
    (capstone_workloads.make_requests; runs recorded without one have salt 0: every run
    of a setup and workload resent the same prompts)."""
    salt = int(summary.get("prompt_salt") or 0)
    return f"{setup}|{workload}" + (f"|salt {salt}" if salt else "")


def warm_counts(runs: Sequence[tuple[str, Sequence[RequestResult]]]) -> list[int]:
    """Per run, in the order the runs ran, keyed by what shares prompts (`prompt_key`):
    how many of its first requests an earlier run with the same key already sent (the most
    any earlier one sent), i.e. the requests that may hit a worker's prefix cache."""
    sent: dict[str, int] = {}
    out = []
    for key, results in runs:
        out.append(min(sent.get(key, 0), len(results)))
        sent[key] = max(sent.get(key, 0), len(results))
    return out


STEP_GAP_S = 0.002  # tokens of one worker's step reach the client within this of each other


def worker_steps(results: Sequence[RequestResult]) -> dict[str, list[tuple[float, list]]]:
    """Per worker (`decode_worker`), its steps as the client saw them: (end, [(request,
    token index)]), the tokens of one step arriving within STEP_GAP_S of the first."""
    ev: dict[str, list[tuple[float, int, int]]] = {}
    for i, r in enumerate(results):
        k = 0
        for t, n in r.chunks:
            for _ in range(n):
                ev.setdefault(r.server.get("decode_worker", ""), []).append((t, i, k))
                k += 1
    out: dict[str, list[tuple[float, list]]] = {}
    for w, e in ev.items():
        steps: list[tuple[float, list]] = []
        for t, i, k in sorted(e):
            if steps and t - steps[-1][0] <= STEP_GAP_S:
                steps[-1][1].append((i, k))
            else:
                steps.append((t, [(i, k)]))
        out[w] = steps
    return out

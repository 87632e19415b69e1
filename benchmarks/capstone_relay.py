"""The relay profile: what the host path between the workers and the client (the single
Python coordinator process, and the client's end of the same streams) can carry, measured
on a capstone run's own records.

Every token travels as its own gRPC message, worker -> coordinator -> client, and every
request is set up by the coordinator's one asyncio loop (P/D: Reserve, Prefill and the
decode stream; colocated or a conditional local prefill: one Generate stream). That path is
a server of finite capacity: past it the workers idle below their batch cap with empty
queues while the requests sent wait, without token 0, for seconds.

The profile, in ms of the relay's time:

    relay busy per second = t_tok * token messages delivered
                            + t_req_pd * P/D requests set up + t_req_local * local ones

measured in two parts. t_tok: the relay delivers at most 1 / t_tok messages a second when
it sets nothing up, so t_tok is a window's length over the most messages that reached the
client in any `WINDOW_S` window in which no request got token 0 (`token_peak`: a lower
bound on the relay's token capacity, reached where a run's streams drained the token
backlog once the requests stopped). The requests' costs: the saturated windows' time left
after their tokens, over the requests set up in them (non-negative least squares, no
intercept, per kind). The split needs the peak: in the saturated windows of one workload
messages and set-ups move together (a decode-heavy request is ~200 messages), so they
tell only a request's cost with its messages. A saturated window is one of a run in which
(1) a request sent more than `BACKLOG_S` before the window's start still had no token 0 at
its end (a backlog that did not drain) and (2) the engines were not what it waited for:
every worker's heartbeats in the window (and the last one before it) report nothing waiting,
no queued prefill tokens and fewer running sequences than max_batch. A request counts as
set up in the window where its token 0 reached the client; a token message is a chunk the
client received. Only runs that recorded heartbeats (capstone_heartbeats.py) can tell (2),
so older runs get no relay profile (the simulator then has no relay, as before).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np

from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_records import read_records, records_path
from pdserve.benchmarks.capstone_steps import nonneg_lstsq
from pdserve.benchmarks.planner_setups import Setup, parse_setup

WINDOW_S = 1.0  # a window: long against the loop's jitter, short against a run (10-20 s)
BACKLOG_S = 0.5  # a request waiting this long for token 0 is backlog, not a prefill's wait
WAITING_TOL = 4  # sequences a heartbeat may report waiting: arrivals since the last step
MIN_WINDOWS = 5  # fewer saturated windows than this: no profile


def is_local(setup: Setup, prompt_tokens: int) -> bool:
    """The request is one Generate on one worker (colocated, or a conditional prompt under
    the threshold), not a P/D request (Reserve + Prefill + decode stream)."""
    return bool(setup.both) or prompt_tokens < setup.cond_tokens


def engines_free(record: dict | None, lo: float, hi: float, max_batch: int,
                 budget: int = 8192) -> bool:
    """Every worker's heartbeats from the last one before `lo` to `hi` report at most
    `WAITING_TOL` sequences waiting, at most one step's prompt tokens (`budget`) queued and
    fewer than `max_batch` running: a queue the next step drains, not a backlog. False
    without a record."""
    workers = (record or {}).get("workers", {})
    if not workers:
        return False
    for w in workers.values():
        beats = sorted(w.get("beats", []))
        seen = [b for b in beats if lo <= b[0] <= hi]
        before = [b for b in beats if b[0] < lo]
        if before:
            seen.append(before[-1])
        if not seen:
            return False
        for _, _, _free, running, waiting, queued in (b[:6] for b in seen):
            if waiting > WAITING_TOL or queued > budget or running >= max_batch:
                return False
    return True


def relay_windows(results: Sequence[RequestResult], setup: Setup, record: dict | None,
                  max_batch: int, budget: int = 8192, window_s: float = WINDOW_S,
                  backlog_s: float = BACKLOG_S) -> list[tuple[float, int, int, int]]:
    """(window start s, token messages, P/D requests set up, local ones) of every saturated
    window of one run (see the module docstring)."""
    sent = [r for r in results if r.t_send == r.t_send]
    if not sent:
        return []
    end = max((r.chunks[-1][0] for r in sent if r.chunks), default=0.0)
    n = int(end / window_s)  # whole windows only
    msgs, pd, local = [0] * n, [0] * n, [0] * n
    for r in sent:
        for t, _ in r.chunks:
            if 0 <= t < n * window_s:
                msgs[int(t / window_s)] += 1
        if r.chunks and 0 <= r.chunks[0][0] < n * window_s:
            (local if is_local(setup, r.prompt_tokens) else pd)[int(r.chunks[0][0] / window_s)] += 1
    out = []
    for k in range(n):
        lo, hi = k * window_s, (k + 1) * window_s
        backlog = any(r.t_send < lo - backlog_s and (not r.chunks or r.chunks[0][0] > hi)
                      for r in sent)
        if backlog and engines_free(record, lo, hi, max_batch, budget):
            out.append((lo, msgs[k], pd[k], local[k]))
    return out


def token_peak(results: Sequence[RequestResult], window_s: float = WINDOW_S) -> int:
    """The most token messages that reached the client in one whole window of a run in
    which no request got token 0 (0: none such)."""
    end = max((r.chunks[-1][0] for r in results if r.chunks), default=0.0)
    n = int(end / window_s)
    msgs, firsts = [0] * n, [0] * n
    for r in results:
        for j, (t, _) in enumerate(r.chunks):
            if 0 <= t < n * window_s:
                msgs[int(t / window_s)] += 1
                firsts[int(t / window_s)] += j == 0
    return max((m for m, f in zip(msgs, firsts) if f == 0), default=0)


def fit_relay_points(points: Sequence[tuple[int, int, int]], peak_msgs: int,
                     window_s: float = WINDOW_S) -> dict[str, float]:
    """{t_tok, t_req_pd, t_req_local} in ms: t_tok = window / `peak_msgs` (token_peak), the
    requests' costs from saturated windows (messages, P/D set up, local set up) whose busy
    time is their length. A kind of request that no window holds gets the other kind's
    cost (none measured: 0)."""
    x = np.array(points, dtype=float)
    t_tok = window_s * 1e3 / peak_msgs if peak_msgs else 0.0
    kinds = [j for j in (1, 2) if x[:, j].any()]
    c = nonneg_lstsq(x[:, kinds], window_s * 1e3 - t_tok * x[:, 0]) if kinds else []
    req = dict(zip(kinds, c))
    pd, local = req.get(1, req.get(2, 0.0)), req.get(2, req.get(1, 0.0))
    return {"t_tok": t_tok, "t_req_pd": pd, "t_req_local": local}


def _run_windows(run_dir: str, max_batch: int, budget: int = 8192) -> tuple:
    """(run key, its setup, its requests, its saturated windows) of every run in
    `run_dir`'s requests.json.gz: no windows for a run without heartbeats or of an unknown
    setup (None). Read once per file version: the relay fit and the decode fit's
    `saturated_windows` both ask."""
    path = records_path(run_dir)
    if path is None:
        return ()
    return _windows_of(path, os.stat(path).st_mtime_ns, max_batch, budget)


@functools.lru_cache(maxsize=4)
def _windows_of(path: str, _mtime_ns: int, max_batch: int, budget: int) -> tuple:
    doc = read_records(os.path.dirname(path)) or {}
    beats = doc.get("heartbeats") or {}
    out = []
    for key, rows in doc.get("runs", {}).items():
        results = [RequestResult.from_json(x) for x in rows]
        try:
            setup = parse_setup(key.split("|")[0])
        except ValueError:
            setup = None
        w = (relay_windows(results, setup, beats[key], max_batch, budget)
             if setup is not None and key in beats else [])
        out.append((key, setup, results, w))
    return tuple(out)


def relay_points(run_dir: str, max_batch: int, budget: int = 8192
                 ) -> tuple[list[tuple[int, int, int]], list[str], int]:
    """The saturated windows of every run of a run directory that recorded heartbeats, the
    runs they came from, and the token peak over every run (`token_peak`)."""
    pts, runs, peak = [], [], 0
    for key, _, results, w in _run_windows(run_dir, max_batch, budget):
        peak = max(peak, token_peak(results))
        if w:
            pts += [(m, p, lo) for _, m, p, lo in w]
            runs.append(f"{key.split('|')[0]} {key.split('|')[1].split(':')[0]} @ "
                        f"{float(key.split('|')[2]):.3g} ({len(w)})")
    return pts, runs, peak


def saturated_windows(run_dir: str, max_batch: int, budget: int = 8192,
                      kind: str | None = None) -> dict[str, list[tuple[float, float]]]:
    """(start, end) in s of each saturated window, by run key (requests.json.gz "runs"), of
    the runs (of setups of `kind`, None: any) that have one. The token times of requests
    decoding then measure the relay, not the decode step: the decode profile leaves them
    out (capstone_decode.fit_decode_unsaturated)."""
    return {key: [(w[0], w[0] + WINDOW_S) for w in wins]
            for key, setup, _, wins in _run_windows(run_dir, max_batch, budget)
            if wins and (kind is None or setup.kind == kind)}


def fit_relay(cal, run_dir: str) -> bool:
    """cal.relay (and its source) fitted on the saturated windows of `run_dir`'s runs;
    False (cal unchanged) with fewer than MIN_WINDOWS of them."""
    pts, runs, peak = relay_points(run_dir, cal.max_batch, cal.prefill_token_budget)
    if len(pts) < MIN_WINDOWS or not peak:
        return False
    cal.relay = r = fit_relay_points(pts, peak)
    busy = np.array([r["t_tok"] * m + r["t_req_pd"] * p + r["t_req_local"] * lo
                     for m, p, lo in pts])
    spread = float(np.std(busy) / (WINDOW_S * 1e3)) if len(busy) > 1 else math.nan
    cal.source["relay"] = (
        f"measured: {r['t_tok'] * 1e3:.3g} us a token message (at most {peak} messages "
        f"reached the client in a {WINDOW_S:g}-s window without a token 0), "
        f"{r['t_req_pd']:.3g} ms a P/D request, {r['t_req_local']:.3g} ms a local one (the "
        f"rest of {len(pts)} windows in which requests waited over {BACKLOG_S:g} s for "
        f"token 0 while every worker's heartbeats showed no queue and batches under "
        f"{cal.max_batch}; runs (windows): {', '.join(runs)}; busy time fitted / window "
        f"length: sd {spread:.2f})")
    return True

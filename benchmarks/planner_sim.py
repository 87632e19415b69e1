"""Discrete-event simulator of a pdserve deployment, driven by a `Calibration`.

Model (each worker is one GPU; times from the calibrated profiles), as pdserve runs it:
- xPyD: the coordinator reserves KV blocks on the decode worker with the fewest sequences
  (running, waiting and reserved) when the request arrives, then queues the prompt FIFO at
  the prefill worker with the fewest queued tokens; a prefill step takes queued prompts up
  to `prefill_token_budget` tokens and lasts prefill_ms(T, sum of squares). Token 0 reaches
  the client when the step ends (pdserve emits it while the KV moves); the KV push starts
  with the step when the step has >= 1024 tokens (layer-wise: layers go out as computed),
  else after it, and holds the decode worker's receiver, one transfer at a time, for the
  prompt's share of the forward (when layer-wise) plus transfer_ms(prompt *
  kv_bytes_per_token), the time after the forward. Decode workers run
  continuous batching: each step lasts decode_step_ms(B, context) and gives every running
  sequence one token; a landed request joins at the next step boundary; beyond
  `max_batch` it waits. So a request's TPOT includes its transfer and the wait for a step.
- colocated (`Nboth`): a step runs the waiting prompts (up to the budget) and every
  running sequence together; it lasts prefill_ms + decode_step_ms less the smaller fixed
  part (one forward pays it once); prefill stalls decode: the interference that
  disaggregation removes. Requests go to the worker with the fewest
  sequences.
- conditional (`xPyD-condT`, the coordinator's --pd-threshold-tokens T): a prompt under T
  tokens goes straight to the decode worker with the fewest sequences, which prefills it
  in its own step as a colocated worker does (no prefill worker, no transfer); the rest
  take the xPyD path.
- a finite run (`horizon_s`): requests not finished by then are cut, as the capstone's
  time limit cuts them (judged on what was seen, see `sim_summary`).
The simulator ignores the coordinator's own latency, preemption and prefix caching.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.benchmarks.capstone_calibration import Calibration
from pdserve.benchmarks.capstone_metrics import steady_rates


@dataclass(slots=True)
class SimReq:
    arrival: float  # seconds
    prompt: int
    output: int
    first: float = math.nan
    end: float = math.nan
    generated: int = 0
    last: float = math.nan  # when its latest token was made
    landed: float = math.nan  # when its KV reached the decode worker (xPyD)
    local: bool = False  # prefilled on its decode worker (conditional disaggregation)
    dec: _Decoder | None = None  # decode worker reserved at arrival (xPyD)

    def ttft_ms(self) -> float:
        return (self.first - self.arrival) * 1e3

    def tpot_ms(self) -> float:
        return (self.end - self.first) / (self.output - 1) * 1e3 if self.output > 1 else math.nan

    def e2el_ms(self) -> float:
        return (self.end - self.arrival) * 1e3


class _Loop:
    def __init__(self) -> None:
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.now = 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn))

    def run(self, horizon_s: float = math.inf) -> None:
        while self._q and self._q[0][0] <= horizon_s:
            self.now, _, fn = heapq.heappop(self._q)
            fn()


class _Decoder:
    """A decode (or colocated) worker: continuous batching; colocated also prefills."""

    def __init__(self, loop: _Loop, cal: Calibration, colocated: bool) -> None:
        self.loop, self.cal, self.colocated = loop, cal, colocated
        self.running: list[SimReq] = []
        self.waiting: deque[SimReq] = deque()
        self.busy = False
        self.reserved = 0  # xPyD requests routed here whose KV has not landed yet
        self.recv_free_s = 0.0  # when its receiver is free for the next transfer

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting) + self.reserved

    def add(self, r: SimReq) -> None:
        self.waiting.append(r)
        if not self.busy:
            self._step()

    def _step(self) -> None:
        cal, now = self.cal, self.loop.now
        prefilled: list[SimReq] = []
        ms = 0.0
        tokens, sq = 0, 0.0
        while self.waiting and len(self.running) + len(prefilled) < cal.max_batch:
            r = self.waiting[0]
            if not (self.colocated or r.local):  # its KV arrived: it decodes from this step
                self.running.append(self.waiting.popleft())
                continue
            if prefilled and tokens + r.prompt > cal.prefill_token_budget:
                break
            prefilled.append(self.waiting.popleft())
            tokens, sq = tokens + r.prompt, sq + r.prompt ** 2
        if prefilled:
            ms += cal.prefill_ms(tokens, sq)
        if self.running:
            ctx = sum(r.prompt + r.generated for r in self.running)
            ms += cal.decode_step_ms(len(self.running), ctx)
            if prefilled:  # one forward: its fixed cost is paid once
                ms -= min(cal.prefill["c0"], cal.decode["c0"])
        if not self.running and not prefilled:
            self.busy = False
            return
        self.busy = True
        end = now + ms / 1e3
        self.loop.at(end, lambda: self._done(prefilled, end))

    def _done(self, prefilled: list[SimReq], t: float) -> None:
        still = []
        for r in self.running:
            r.generated += 1
            r.last = t
            if r.generated >= r.output:
                r.end = t
            else:
                still.append(r)
        self.running = still
        for r in prefilled:  # colocated or local: the prefill step made token 0
            r.first, r.generated = t, 1
            if r.output <= 1:
                r.end = t
            else:
                self.running.append(r)
        self._step()


LAYERWISE_MIN_TOKENS = 1024  # kvtransfer's TransferConfig.layerwise_min_tokens (default)


class _Prefiller:
    def __init__(self, loop: _Loop, cal: Calibration) -> None:
        self.loop, self.cal = loop, cal
        self.queue: deque[SimReq] = deque()
        self.queued_tokens = 0
        self.busy = False

    def add(self, r: SimReq) -> None:
        self.queue.append(r)
        self.queued_tokens += r.prompt
        if not self.busy:
            self._step()

    def _step(self) -> None:
        if not self.queue:
            self.busy = False
            return
        batch, tokens, sq = [], 0, 0.0
        while self.queue and (not batch or tokens + self.queue[0].prompt <= self.cal.prefill_token_budget):
            r = self.queue.popleft()
            batch.append(r)
            tokens, sq = tokens + r.prompt, sq + r.prompt ** 2
        self.queued_tokens -= tokens
        self.busy = True
        start = self.loop.now
        end = start + self.cal.prefill_ms(tokens, sq) / 1e3
        layerwise = tokens >= LAYERWISE_MIN_TOKENS
        self.loop.at(end, lambda: self._done(batch, start if layerwise else end))

    def _done(self, batch: list[SimReq], push_from: float) -> None:
        """Token 0 of every prompt leaves now; its KV push started at `push_from` (the
        step's start when layer-wise: its layers go out as the forward computes them), and
        holds the decode worker's receiver (one progress thread and staging pool, the scatter
        on the decode GPU: kvtransfer/receiver.py) for its share of the forward (the prefill
        profile's per-token part) plus the transfer after the forward (`transfer_ms`). The
        sender is not a queue: its sends to different receivers overlap."""
        now = self.loop.now
        for r in batch:
            r.first, r.generated = now, 1  # token 0 leaves with the prefill reply
            dec = r.dec
            assert dec is not None
            if r.output <= 1:
                r.end = now
                dec.reserved -= 1
                continue
            start = max(push_from, dec.recv_free_s)
            tail_s = self.cal.transfer_ms(r.prompt * self.cal.kv_bytes_per_token) / 1e3
            fwd_s = (self.cal.prefill_ms(r.prompt, r.prompt ** 2) - self.cal.prefill["c0"]) / 1e3 \
                if push_from < now else 0.0
            land_s = max(start + fwd_s, now) + tail_s
            dec.recv_free_s = land_s

            def land(r: SimReq = r, dec: _Decoder = dec) -> None:
                r.landed = self.loop.now
                dec.reserved -= 1
                dec.add(r)
            self.loop.at(land_s, land)
        self._step()


def simulate(cal: Calibration, prefill: int, decode: int, both: int,
             arrivals: Sequence[float], lengths: Sequence[tuple[int, int]],
             cond_tokens: int = 0, horizon_s: float = math.inf) -> list[SimReq]:
    """Every request's first-token and finish time on the given setup; with `cond_tokens`,
    prompts under it are prefilled on their decode worker. Events after `horizon_s` (the
    run's time limit, seconds from the first arrival's clock 0) do not happen: requests
    still running then keep NaN for what they did not reach, and `cut_s` is set."""
    if both and (prefill or decode):
        raise ValueError("simulate either xPyD or Nboth, not a mix")
    if not both and (prefill < 1 or decode < 1):
        raise ValueError("xPyD needs at least one prefill and one decode worker")
    loop = _Loop()
    reqs = [SimReq(t, max(1, i), max(1, o)) for t, (i, o) in zip(arrivals, lengths)]
    if both:
        workers = [_Decoder(loop, cal, colocated=True) for _ in range(both)]
        for r in reqs:
            loop.at(r.arrival, lambda r=r: min(workers, key=lambda w: w.load).add(r))
    else:
        decs = [_Decoder(loop, cal, colocated=False) for _ in range(decode)]
        pres = [_Prefiller(loop, cal) for _ in range(prefill)]

        def arrive(r: SimReq) -> None:
            dec = min(decs, key=lambda d: d.load)
            if r.local:
                dec.add(r)
                return
            r.dec = dec
            dec.reserved += 1
            min(pres, key=lambda p: p.queued_tokens).add(r)
        for r in reqs:
            r.local = r.prompt < cond_tokens
            loop.at(r.arrival, lambda r=r: arrive(r))
    loop.run(horizon_s)
    return reqs


def sim_summary(reqs: Sequence[SimReq], slos: dict[str, float], warmup: float = 0.1,
                cooldown: float = 0.1, horizon_s: float = math.inf) -> tuple[float, float]:
    """(attainment, goodput req/s) with the capstone's definitions (capstone_metrics):
    attainment over the requests between the first `warmup` and the last `cooldown`
    fraction of arrivals, a request cut at `horizon_s` judged on what was seen (no first
    token: a miss); goodput = finished SLO-meeting requests finishing within those
    requests' arrival span, per second of it (capstone_metrics.steady_rates)."""
    order = sorted(reqs, key=lambda r: r.arrival)
    lo, hi = math.floor(len(order) * warmup), len(order) - math.floor(len(order) * cooldown)
    sel = order[lo:hi] if hi > lo else order
    if not sel:
        return math.nan, math.nan

    def ok(r: SimReq) -> bool:
        if math.isnan(r.first):
            return False
        if math.isnan(r.end):  # cut after its first token: TPOT so far
            tpot = (r.last - r.first) / (r.generated - 1) * 1e3 if r.generated > 1 else math.nan
            vals = {"ttft": r.ttft_ms(), "tpot": tpot, "e2el": (horizon_s - r.arrival) * 1e3}
        else:
            vals = {"ttft": r.ttft_ms(), "tpot": r.tpot_ms(), "e2el": r.e2el_ms()}
        return all(math.isnan(vals[k]) or vals[k] <= v for k, v in slos.items())
    good = sum(ok(r) for r in sel)
    _, goodput = steady_rates(sel[0].arrival, sel[-1].arrival,
                              ((r.end, ok(r)) for r in reqs if not math.isnan(r.end)))
    return good / len(sel), goodput


def sim_means(reqs: Sequence[SimReq], warmup: float = 0.1,
              cooldown: float = 0.1) -> dict[str, float]:
    """Mean TTFT, TPOT and KV transfer (token 0 to the KV landing) in ms of the windowed
    requests that finished, as capstone_metrics.summarize computes them."""
    order = sorted(reqs, key=lambda r: r.arrival)
    lo, hi = math.floor(len(order) * warmup), len(order) - math.floor(len(order) * cooldown)
    done = [r for r in (order[lo:hi] if hi > lo else order) if not math.isnan(r.end)]

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan
    return {"ttft": mean([r.ttft_ms() for r in done]), "tpot": mean([r.tpot_ms() for r in done]),
            "transfer": mean([(r.landed - r.first) * 1e3 for r in done])}


def sim_attainment(reqs: Sequence[SimReq], slos: dict[str, float], warmup: float = 0.1,
                   cooldown: float = 0.1) -> float:
    """Fraction of the windowed requests (by arrival) that meet every SLO (ms)."""
    return sim_summary(reqs, slos, warmup, cooldown)[0]


@dataclass(frozen=True, slots=True)
class Setup:
    """xPyD (disaggregated), Nboth (colocated), or xPyD-condT: conditional disaggregation,
    xPyD where the coordinator (--pd-threshold-tokens T) has prompts under T tokens
    prefilled on their decode worker."""

    prefill: int
    decode: int
    both: int
    cond_tokens: int = 0

    @property
    def name(self) -> str:
        if self.cond_tokens:
            return f"{self.prefill}P{self.decode}D-cond{self.cond_tokens}"
        return setup_name(self.prefill, self.decode, self.both)

    @property
    def kind(self) -> str:
        return "conditional" if self.cond_tokens else "colocated" if self.both else "P/D"

    @property
    def gpus(self) -> int:
        return self.prefill + self.decode + self.both


def parse_setup(name: str) -> Setup:
    """'1P3D' -> Setup(1, 3, 0); '4both' -> Setup(0, 0, 4); '1P1D-cond512' ->
    Setup(1, 1, 0, 512)."""
    import re

    s = name.strip()
    m = re.fullmatch(r"(\d+)P(\d+)D(?:-cond(\d+))?", s, re.IGNORECASE)
    if m:
        p, d, t = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if p < 1 or d < 1 or (m.group(3) is not None and t < 1):
            raise ValueError(f"setup {name!r}: xPyD needs x, y >= 1 (and -condT T >= 1)")
        return Setup(p, d, 0, t)
    m = re.fullmatch(r"(\d+)both", s, re.IGNORECASE)
    if m and int(m.group(1)) >= 1:
        return Setup(0, 0, int(m.group(1)))
    raise ValueError(f"setup {name!r}: expected xPyD (1P3D), Nboth (2both) or xPyD-condT "
                     "(1P1D-cond512: prompts under T tokens prefilled on the decode worker)")


def simulate_setup(cal: Calibration, setup: Setup, arrivals: Sequence[float],
                   lengths: Sequence[tuple[int, int]],
                   horizon_s: float = math.inf) -> list[SimReq]:
    """`simulate` for any Setup."""
    return simulate(cal, setup.prefill, setup.decode, setup.both, arrivals, lengths,
                    setup.cond_tokens, horizon_s)


def setup_name(prefill: int, decode: int, both: int) -> str:
    return f"{both}both" if both else f"{prefill}P{decode}D"

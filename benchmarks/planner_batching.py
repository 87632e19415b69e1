"""The planner simulator's event loop, what a simulation ran (SimRun), and how one step's token budget is filled with
prompt chunks and landed requests join the batch as engine/scheduler.py does it
(planner_sim.py runs the workers)."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.benchmarks.planner_sim import _Decoder, _Prefiller


class Loop:
    """Events in time order (seconds); run() stops before the first one past `horizon_s`."""

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


@dataclass(slots=True, eq=False)  # identity: two requests may carry equal fields
class SimReq:
    arrival: float  # seconds
    prompt: int
    output: int
    first: float = math.nan  # when token 0 reached the client (made then, without a relay)
    end: float = math.nan  # ... and its last token
    generated: int = 0
    last: float = math.nan  # when its latest token reached the client
    made: float = math.nan  # when a worker made token 0
    landed: float = math.nan  # when its KV reached the decode worker (xPyD)
    local: bool = False  # prefilled on its decode worker (conditional disaggregation)
    dec: _Decoder | None = None  # decode worker reserved at arrival (xPyD)
    pre: _Prefiller | None = None  # prefill worker it was routed to (xPyD)
    computed: int = 0  # prompt tokens prefilled so far (a chunked prompt spans steps)
    scheduled: float = math.nan  # when the step with its first chunk started (xPyD)
    key: Hashable | None = None  # the prompt's identity for prefix caching (None: unique)
    worker: str = ""  # the decode (or colocated) worker the coordinator routed it to

    def ttft_ms(self) -> float:
        return (self.first - self.arrival) * 1e3

    def sends(self, every: int, local: bool) -> bool:
        """Whether the token a decode step makes now goes out in a message, with the worker
        streaming `every` tokens a message after a stream's first (`--stream-interval`):
        the stream's first token (token 0 on a worker that prefilled it, `local`; else
        token 1, token 0 having come with the prefill reply), each `every`-th after it,
        and the last."""
        first = 0 if local else 1
        return (self.generated - first) % every == 0 or self.generated + 1 >= self.output

    def tpot_ms(self) -> float:
        return (self.end - self.first) / (self.output - 1) * 1e3 if self.output > 1 else math.nan

    def e2el_ms(self) -> float:
        return (self.end - self.arrival) * 1e3


@dataclass(slots=True)
class Chunk:
    """Prompt tokens of one request in one step, as engine/scheduler.py schedules them."""

    req: SimReq
    tokens: int

    @property
    def completes(self) -> bool:  # the chunk that reaches the prompt's end samples token 0
        return self.req.computed + self.tokens >= self.req.prompt

    @property
    def sq(self) -> float:
        """Its share of the attention term: sum over its tokens of the context they attend
        to, x 2: n (2 s + n) for n tokens after s computed ones (a whole prompt: T^2)."""
        s, n = self.req.computed, self.tokens
        return n * (2 * s + n)


def fill_budget(budget: int, partial: Sequence[SimReq], waiting: deque[SimReq],
                may_take: Callable[[SimReq], bool] = lambda r: True,
                on_take: Callable[[SimReq], None] | None = None) -> list[Chunk]:
    """The prompt chunks of one step (engine/scheduler.py `schedule`): the budget goes first
    to prompts already started (a chunked one continues), then to waiting prompts in FCFS
    order; a prompt longer than what is left is chunked to fit (long_prefill_threshold 0).
    Taken prompts leave `waiting`; `may_take(r)` False stops the admission (a running cap);
    `on_take(r)` runs as a prompt is taken, before its chunk is sized (the prefix-cache
    lookup: the engine matches a prompt's blocks when it admits it, `_admit`)."""
    out = []
    for r in partial:
        if budget <= 0:
            break
        n = min(r.prompt - r.computed, budget)
        out.append(Chunk(r, n))
        budget -= n
    while waiting and budget > 0 and may_take(waiting[0]):
        r = waiting.popleft()
        if on_take is not None:
            on_take(r)
        n = min(r.prompt - r.computed, budget)
        out.append(Chunk(r, n))
        budget -= n
    return out


def join_landed(landed: deque[SimReq], held: deque[SimReq], running: list[SimReq],
                cap: int, fifo: bool) -> None:
    """Requests whose KV landed since the last step (`landed`, in landing order) join
    `running` while it holds fewer than `cap`; the rest wait in `held` (engine/scheduler.py
    `admit_remote`). `fifo` (since branch fifo): they wait behind those already waiting and
    join in landing order. Else (before it; every committed capstone run) each one that
    finds the batch full goes to the FRONT (newest first) and may join before older ones."""
    if fifo:
        held.extend(landed)
        landed.clear()
    while landed:
        r = landed.popleft()
        if len(running) < cap:
            running.append(r)
        else:
            held.appendleft(r)
    while held and len(running) < cap:
        running.append(held.popleft())


def launches_ahead(running: Sequence[SimReq], has_chunks: bool, queued: bool, full: bool
                   ) -> bool:
    """Whether the engine launches the step after a decode step of `running` before that
    step's tokens are read (engine/step_pipeline.py, Scheduler.schedule_ahead): the step
    runs no prompt chunk, no sequence ends in it by length, and nothing waits to be
    admitted (`queued`) unless max_num_seqs run (`full`). A prompt that reaches the worker
    while such a step runs is added by the engine loop only once no step is in flight
    (engine/engine_loop.py): after the step launched ahead, a decode step later than
    without overlap. The records show it: on 2 x H100 (capstone-2gpu-6889ada, 2both) a
    prompt waited 2.5 ms (median) from the coordinator to its step on an idle worker, 12.5
    (p10-p90 10-16) on a decoding one (decode step ~7 ms: half a step and one more).
    Landed KV is admitted the same way (an engine call); the simulator keeps it joining at
    the next step: its records (token 1 less token 0 less the transfer, 12-19 ms at 16
    req/s) sit between the two and the decode profile was fitted without the extra step."""
    return (bool(running) and not has_chunks and (full or not queued)
            and all(r.generated + 1 < r.output for r in running))


@dataclass(slots=True)
class SimRun:
    """What one simulation ran, beside its requests: the largest mean decode batch of a
    decode (or colocated) worker (its batch averaged over the time it decoded: comparable
    with the calibration's profiled range, which is one of mean batches), and every prefill
    worker's steps (tokens, ms)."""

    mean_decode_batch: float = 0.0
    prefill_steps: list[tuple[int, float]] = field(default_factory=list)


def schedule_heartbeats(loop: Loop, beats: Sequence[Callable[[], None]],
                        given: Sequence[Sequence[float]] | None, last: float,
                        period_s: float) -> None:
    """Each worker's heartbeat (`beats[j]`) while requests still arrive (until `last`): at
    its `given[j]` times (a run's recorded ones), then every `period_s` after the last of
    them; without any, every `period_s` with the workers' phases evenly spread."""
    for j, beat in enumerate(beats):
        times = sorted(t for t in (given[j] if given else ()) if 0 <= t <= last)
        for t in times:
            loop.at(t, beat)
        t = times[-1] + period_s if times else period_s * j / len(beats)
        while t <= last:
            loop.at(t, beat)
            t += period_s

"""The wall-clock budget of a capstone sweep (`pdserve bench capstone --budget-s S`).

The budget is divided as the sweep goes: each setup not yet started gets an equal share of
what is left (its workers' start-up comes out of its share), each of its workloads an equal
share of what is left of the setup's, and each run of a workload's search an equal share of
what is left of the workload's. A run is sized to fit its share: it sends requests for
`share - drain` seconds (drain: how long the last requests of a run took to finish after the
last send, estimated from the SLOs and the workload's lengths, then measured), and is cut at
its share's end plus a grace. A search stops when its share cannot fit another run of
`min_run_s`; a setup that cannot start in time is skipped. Every cut is recorded in `cuts`,
which the report prints. Without a budget (`total_s` 0) nothing is cut.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

MIN_RUN_S = 4.0  # a run shorter than this measures little beyond its ramp-up


@dataclass(slots=True)
class Budget:
    total_s: float = 0.0  # 0: no budget
    start_s: float = field(default_factory=time.monotonic)
    min_run_s: float = MIN_RUN_S
    cuts: list[str] = field(default_factory=list)

    @property
    def limited(self) -> bool:
        return self.total_s > 0

    def left_s(self) -> float:
        if not self.limited:
            return math.inf
        return self.total_s - (time.monotonic() - self.start_s)

    def deadline(self, parts_left: int, reserve_s: float = 0.0) -> float:
        """The end (monotonic s) of the next of `parts_left` equal shares of what is left,
        keeping `reserve_s` for the end (the report)."""
        if not self.limited:
            return math.inf
        return time.monotonic() + max(0.0, self.left_s() - reserve_s) / max(1, parts_left)

    def cut(self, what: str) -> None:
        self.cuts.append(what)


@dataclass(slots=True)
class RunSizer:
    """Sizes the runs of one search (one setup x workload) to end by `deadline_s`."""

    deadline_s: float  # monotonic; inf: no budget
    runs_left: int
    drain_s: float  # estimated time from the last send to the last finish
    max_duration_s: float = 0.0  # --run-duration (0: none)
    min_run_s: float = MIN_RUN_S

    def can_run(self, runs: int = 1) -> bool:
        """Whether `runs` more runs of at least min_run_s (and their drain) fit."""
        return self.runs_left >= runs and (math.isinf(self.deadline_s) or
                                           self.deadline_s - time.monotonic()
                                           >= runs * (self.min_run_s + self.drain_s))

    def duration_s(self) -> float:
        """Seconds of sending for the next run (0: a fixed request count, no duration)."""
        if math.isinf(self.deadline_s):
            return self.max_duration_s
        share = (self.deadline_s - time.monotonic()) / max(1, self.runs_left)
        d = max(self.min_run_s, share - self.drain_s)
        return min(d, self.max_duration_s) if self.max_duration_s else d

    def stop_at(self, duration_s: float) -> float:
        """When the next run is cut (monotonic s): its requests that have not finished by
        then end as failures (they would miss any TTFT/E2E SLO anyway)."""
        if math.isinf(self.deadline_s):
            return math.inf
        return time.monotonic() + duration_s + max(2 * self.drain_s, 5.0)

    def ran(self, wall_s: float, duration_s: float) -> None:
        self.runs_left -= 1
        self.drain_s = max(self.drain_s * 0.5, wall_s - duration_s)


def run_size(rate: float, num_requests: int, duration_s: float) -> int:
    """Requests in a run: `num_requests`, or with a duration, enough arrivals at `rate` to
    fill it (at least `num_requests`, which is then the minimum)."""
    if duration_s > 0 and not math.isinf(rate):
        return max(num_requests, math.ceil(rate * duration_s))
    return num_requests

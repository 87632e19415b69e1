"""Worker health at the coordinator: suspects, circuit breakers, and streams that stall.

- A worker is *suspect* while its last heartbeat is older than `suspect_heartbeats`
  periods, or for a while after one of its streams stalled: it gets no new work while a
  healthy worker of its role exists (it is dropped only at the registry's worker timeout).
- Each failure charged to a worker (flows classify who failed) is recorded; failures less
  than a second apart count once (a crash fails all its requests at once). After
  `breaker_failures` within `breaker_window_s` its circuit opens for `breaker_open_s`: no
  new work while another worker of its role has a closed circuit. The record is kept by worker id, so a worker that is dropped and
  registers again under its id does not come back with a clean slate.
- `StallWatch` cancels a watched token stream that makes no progress for
  `stall_timeout_s`, and marks its worker suspect; the flow then migrates the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.coordinator.config import FailureConfig

log = logging.getLogger("pdserve.coordinator")
_SAME_EVENT_S = 1.0  # failures closer than this are one event (one crash, many requests)


@dataclass(slots=True)
class _Record:
    failures: deque[float] = field(default_factory=deque)  # event times (monotonic)
    open_until: float = 0.0
    suspect_until: float = 0.0
    charged: int = 0  # failures ever charged (events or not)


class HealthBook:
    def __init__(self, cfg: FailureConfig, heartbeat_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        self.suspect_after_s = cfg.suspect_heartbeats * heartbeat_s
        self._records: dict[str, _Record] = {}

    def _rec(self, worker_id: str) -> _Record:
        rec = self._records.get(worker_id)
        if rec is None:
            rec = self._records[worker_id] = _Record()
        return rec

    def charge(self, worker_id: str, reason: str) -> None:
        """A failure that is this worker's fault."""
        now = self.clock()
        rec = self._rec(worker_id)
        rec.charged += 1
        if rec.failures and now - rec.failures[-1] < _SAME_EVENT_S:
            return
        rec.failures.append(now)
        while rec.failures and now - rec.failures[0] > self.cfg.breaker_window_s:
            rec.failures.popleft()
        if len(rec.failures) >= self.cfg.breaker_failures and rec.open_until <= now:
            rec.open_until = now + self.cfg.breaker_open_s
            rec.failures.clear()
            log.warning("worker %s: circuit open for %g s after %d failures (last: %s)",
                        worker_id, self.cfg.breaker_open_s, self.cfg.breaker_failures, reason)

    def suspect(self, worker_id: str, for_s: float, reason: str) -> None:
        log.warning("worker %s is suspect for %g s: %s", worker_id, for_s, reason)
        rec = self._rec(worker_id)
        rec.suspect_until = max(rec.suspect_until, self.clock() + for_s)

    def broken(self, worker_id: str) -> bool:
        rec = self._records.get(worker_id)
        return rec is not None and rec.open_until > self.clock()

    def is_suspect(self, worker_id: str, last_seen: float) -> bool:
        now = self.clock()
        if now - last_seen > self.suspect_after_s:
            return True
        rec = self._records.get(worker_id)
        return rec is not None and rec.suspect_until > now

    def charged(self, worker_id: str) -> int:
        rec = self._records.get(worker_id)
        return rec.charged if rec is not None else 0


class Watched:
    """One watched stream: `touch()` on every message; `stalled` once the watch gave up."""

    __slots__ = ("call", "worker_id", "last", "stalled")

    def __init__(self, call: Any, worker_id: str) -> None:
        self.call, self.worker_id = call, worker_id
        self.last = time.monotonic()
        self.stalled = False

    def touch(self) -> None:
        self.last = time.monotonic()


class StallWatch:
    """Cancels watched calls silent for `stall_s` and marks their worker suspect."""

    def __init__(self, health: HealthBook, stall_s: float) -> None:
        self.health, self.stall_s = health, stall_s
        self._watched: set[Watched] = set()
        self._task: asyncio.Task | None = None

    def watch(self, call: Any, worker_id: str) -> Watched:
        w = Watched(call, worker_id)
        self._watched.add(w)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return w

    def unwatch(self, w: Watched) -> None:
        self._watched.discard(w)

    async def _loop(self) -> None:
        period = min(1.0, self.stall_s / 4)
        while self._watched:
            await asyncio.sleep(period)
            self.check()

    def check(self) -> None:
        now = time.monotonic()
        for w in [w for w in self._watched if now - w.last > self.stall_s]:
            self._watched.discard(w)
            w.stalled = True
            self.health.suspect(w.worker_id, self.stall_s,
                                f"a stream made no progress for {self.stall_s:g} s")
            w.call.cancel()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

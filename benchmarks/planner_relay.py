"""The relay in the planner's simulator: the host path (one coordinator process, its one
asyncio loop, and the client's end of the streams) that sets every request up and carries
every token message from the workers to the client, a server of finite capacity
(`Calibration.relay`, fitted by capstone_relay.py).

Model (a fluid single server, times in seconds):
- every token message costs t_tok of its time; a step's tokens reach the client when the
  token work queued before them and theirs is done (`deliver`): FIFO among tokens;
- every request costs t_req (P/D or local, by its path) before the coordinator routes it
  (`admit`): requests are set up one at a time in arrival order, with the time the token
  work leaves: token messages go first. That is what the records show (capstone_relay.py):
  past the relay's capacity requests got token 0 in send order, seconds late and later
  with every second, while the streams already running kept their TPOT;
- with no relay profile (a calibration fitted before it existed) the simulator has no
  relay: requests are routed on arrival and tokens reach the client when made.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pdserve.benchmarks.planner_batching import Loop


class Relay:
    def __init__(self, loop: Loop, profile: dict[str, float]) -> None:
        self.loop = loop
        self.t_tok = profile["t_tok"] / 1e3
        self.t_req = {False: profile["t_req_pd"] / 1e3, True: profile["t_req_local"] / 1e3}
        self.tok_free = 0.0  # when the token work queued so far is done
        self.queue: deque[list] = deque()  # [work left s, then]: requests being set up, FIFO
        self.head_from = 0.0  # when the head's work (re)started
        self._version = 0  # invalidates a scheduled completion the head no longer meets
        self.busy_s = 0.0  # work done or queued: tokens and set-ups

    def deliver(self, n: int) -> float:
        """`n` token messages made now: when the last of them reaches the client."""
        now = self.loop.now
        self._pause(now)
        self.tok_free = max(now, self.tok_free) + n * self.t_tok
        self.busy_s += n * self.t_tok
        self._schedule()
        return self.tok_free

    def admit(self, local: bool, then: Callable[[], None]) -> None:
        """A request arrives: `then` runs once the relay has set it up (`local`: one
        Generate on one worker, else P/D)."""
        cost = self.t_req[local]
        self.busy_s += cost
        self.queue.append([cost, then])
        if len(self.queue) == 1:
            self.head_from = max(self.loop.now, self.tok_free)
            self._schedule()

    def _pause(self, now: float) -> None:
        """Token work arrives: the head's set-up stops at `now` (it resumes after it)."""
        if self.queue and self.head_from < now:
            self.queue[0][0] -= now - self.head_from
            self.head_from = now

    def _schedule(self) -> None:
        if not self.queue:
            return
        self.head_from = max(self.head_from, self.tok_free)
        self._version += 1
        v = self._version
        self.loop.at(self.head_from + max(0.0, self.queue[0][0]), lambda: self._done(v))

    def _done(self, v: int) -> None:
        if v != self._version:
            return
        _, then = self.queue.popleft()
        self.head_from = self.loop.now
        self._schedule()
        then()


def on_arrival(relay: Relay | None, local: bool, route: Callable[[], None]
               ) -> Callable[[], None]:
    """A request's arrival event: `route` now, or once `relay` has set it up."""
    if relay is None:
        return route
    return lambda: relay.admit(local, route)

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

Two regimes, where the calibration has both profiles: below its knee the relay works at
the host's costs (`Calibration.relay_host`, measured by the capstone's relay probe on the
host that runs it, capstone_relay_probe.py); once a request has waited `BACKLOG_S` to be
set up (a backlog) it works at the costs fitted on the run's saturated windows
(`Calibration.relay`), and again at the host's when the backlog is gone. The records show
that collapse: a host that carried 15k messages and 65-77 set-ups a second with no
backlog delivered ~10k and ~50 once requests queued, whatever the backlog
(docs/capstone.md). With one profile only, its costs hold in both regimes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pdserve.benchmarks.capstone_relay import BACKLOG_S  # a request waiting this long: backlog
from pdserve.benchmarks.planner_batching import Loop


def _costs(profile: dict[str, float]) -> tuple[float, dict[bool, float]]:
    """(s a token message, {local: s a request set up}) of a profile in ms."""
    return profile["t_tok"] / 1e3, {False: profile["t_req_pd"] / 1e3,
                                    True: profile["t_req_local"] / 1e3}


class Relay:
    def __init__(self, loop: Loop, profile: dict[str, float] | None,
                 host: dict[str, float] | None = None) -> None:
        if not profile and not host:
            raise ValueError("a relay needs a profile")
        self.loop = loop
        self.fast = _costs(host or profile)  # below the knee
        self.slow = _costs(profile or host)  # with a backlog
        self.t_tok, self.t_req = self.fast
        self.tok_free = 0.0  # when the token work queued so far is done
        # [work left s (None: not started), then, arrived, local]: set-ups, FIFO
        self.queue: deque[list] = deque()
        self.head_from = 0.0  # when the head's work (re)started
        self._version = 0  # invalidates a scheduled completion the head no longer meets
        self.busy_s = 0.0  # work done or queued: tokens and set-ups

    def deliver(self, n: int) -> float:
        """`n` token messages made now: when the last of them reaches the client."""
        now = self.loop.now
        self._pause(now)
        self._regime(now)
        self.tok_free = max(now, self.tok_free) + n * self.t_tok
        self.busy_s += n * self.t_tok
        self._schedule()
        return self.tok_free

    def admit(self, local: bool, then: Callable[[], None]) -> None:
        """A request arrives: `then` runs once the relay has set it up (`local`: one
        Generate on one worker, else P/D)."""
        self.queue.append([None, then, self.loop.now, local])
        if len(self.queue) == 1:
            self.head_from = max(self.loop.now, self.tok_free)
            self._schedule()

    def _regime(self, now: float) -> None:
        """The costs of work queued now: the slow ones while the oldest request waiting to
        be set up has waited over BACKLOG_S."""
        backlog = bool(self.queue) and now - self.queue[0][2] > BACKLOG_S
        self.t_tok, self.t_req = self.slow if backlog else self.fast

    def _pause(self, now: float) -> None:
        """Token work arrives: the head's set-up stops at `now` (it resumes after it)."""
        if self.queue and self.queue[0][0] is not None and self.head_from < now:
            self.queue[0][0] -= now - self.head_from
            self.head_from = now

    def _schedule(self) -> None:
        if not self.queue:
            return
        head = self.queue[0]
        if head[0] is None:  # its set-up starts: at the costs of the regime now
            self._regime(self.loop.now)
            head[0] = self.t_req[head[3]]
            self.busy_s += head[0]
        self.head_from = max(self.head_from, self.tok_free)
        self._version += 1
        v = self._version
        self.loop.at(self.head_from + max(0.0, self.queue[0][0]), lambda: self._done(v))

    def _done(self, v: int) -> None:
        if v != self._version:
            return
        then = self.queue.popleft()[1]
        self.head_from = self.loop.now
        self._schedule()
        then()


def on_arrival(relay: Relay | None, local: bool, route: Callable[[], None]
               ) -> Callable[[], None]:
    """A request's arrival event: `route` now, or once `relay` has set it up."""
    if relay is None:
        return route
    return lambda: relay.admit(local, route)

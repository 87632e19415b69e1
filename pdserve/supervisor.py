"""Supervision of a LocalCluster's children (used by `pdserve up`): a child that exits is
started again after a backoff, while the others keep serving; a restarted worker registers
with the coordinator again, and a restarted coordinator is found again by the workers'
heartbeats (they register anew). A child restarted more than `max_restarts` times within
`window_s` is in a crash loop: `poll()` then says so and the caller shuts down.

    sup = Supervisor(cluster, say=print)
    while (reason := sup.poll()) is None:
        time.sleep(0.2)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.child_process import Proc
from pdserve.cluster import LocalCluster


@dataclass(slots=True)
class _Child:
    restarts: deque[float] = field(default_factory=deque)  # times of recent restarts
    due: float | None = None  # when to restart (the child has exited)
    total: int = 0


class Supervisor:
    def __init__(self, cluster: LocalCluster, *, max_restarts: int = 5, window_s: float = 60.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 say: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.max_restarts, self.window_s = max_restarts, window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.say = say
        self._children: dict[str, _Child] = {}

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, by child name."""
        return {name: c.total for name, c in self._children.items() if c.total}

    def _procs(self) -> list[Proc]:
        return self.cluster.procs

    def poll(self, now: float | None = None) -> str | None:
        """Restart what is due; None while serving, else why the cluster must stop."""
        now = time.monotonic() if now is None else now
        for proc in self._procs():
            child = self._children.setdefault(proc.name, _Child())
            if proc.poll() is None or child.due is not None and now < child.due:
                continue
            if child.due is None:  # it has just exited
                while child.restarts and now - child.restarts[0] > self.window_s:
                    child.restarts.popleft()
                if self.max_restarts == 0:
                    return f"restarts are off; {proc.describe_exit(10)}"
                if len(child.restarts) >= self.max_restarts:
                    return (f"crash loop: {proc.name} exited {len(child.restarts) + 1} times "
                            f"within {self.window_s:g} s; last exit: {proc.describe_exit(10)}")
                delay = min(self.backoff_s * 2 ** len(child.restarts), self.max_backoff_s)
                child.due = now + delay
                self.say(f"{proc.describe_exit(10)}\nrestarting {proc.name} in {delay:g} s "
                         f"(restart {len(child.restarts) + 1} of at most {self.max_restarts} "
                         f"within {self.window_s:g} s)")
                continue
            child.due = None
            child.restarts.append(now)
            child.total += 1
            new = self.cluster.restart(proc.name)
            self.say(f"restarted {proc.name} (pid {new.pid})")
        return None

"""The coordinator tests' fake cluster: a coordinator plus fake workers on one event loop.

The fake workers themselves (fake "model", direct KV "transfer", Knobs) live in
pdserve.benchmarks.fake_workers; they are re-exported here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

from pdserve.benchmarks.fake_workers import (  # noqa: F401 - re-exported for the tests
    EOS,
    VOCAB,
    FakeTokenizer,
    FakeWorker,
    Knobs,
    fake_outputs,
)
from pdserve.coordinator.config import CoordinatorConfig
from pdserve.coordinator.server import CoordinatorServer


class ChatTokenizer(FakeTokenizer):
    """FakeTokenizer with a chat template: `<role>content` per message, then `<assistant>`."""

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class LoopThread:
    """An asyncio loop on a daemon thread; `run(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cluster:
    """A coordinator plus fake workers on one LoopThread (sync API for tests)."""

    def __init__(self, lt: LoopThread, http_port: int | None = None, tokenizer: Any = None,
                 **config: Any) -> None:
        self.lt = lt
        config.setdefault("port", 0)
        config.setdefault("heartbeat_s", 0.05)
        self.config = CoordinatorConfig(**config)
        self.coord = CoordinatorServer(self.config, http_port=http_port,
                                       tokenizer=tokenizer or FakeTokenizer())
        lt.run(self.coord.start())
        self.address = self.coord.address
        self.workers: list[FakeWorker] = []

    def add(self, role: str, **kw: Any) -> FakeWorker:
        kw.setdefault("auth_token", self.config.auth_token)
        w = self.lt.run(FakeWorker(role, self.address, **kw).start())
        self.workers.append(w)
        return w

    def loads(self) -> list[tuple[int, int]]:
        return [(w.free, w.total) for w in self.workers if not w.dead]

    def stop(self) -> None:
        async def _stop() -> None:
            for w in self.workers:
                if not w.dead:
                    await w.kill()
            await self.coord.stop(0)

        self.lt.run(_stop())


def wait_until(cond, timeout_s: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_no_leaks(cluster: Cluster) -> None:
    """Every live fake worker has all its blocks free (after in-flight Aborts land)."""
    wait_until(lambda: all(f == t for f, t in cluster.loads()), what="all blocks freed")

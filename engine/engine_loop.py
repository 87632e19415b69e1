"""Runs engine steps on one dedicated thread; other threads hand it work as callables.

The scheduler and the KV pool are touched only from this thread, so they need no locks.
`call(fn)` runs `fn()` between two steps and returns a concurrent Future with its result.

Steps run through a StepPipeline (engine/step_pipeline.py). Calls run only while no step
is in flight: a queued call stops the pipeline from launching ahead, so it runs within a
step (overlap falls back to synchronous steps around every add, abort or admission).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pdserve.engine.llm_engine import LLMEngine, StepResult
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step_pipeline import LayerHook

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: LLMEngine,
                 on_result: Callable[[SchedulerOutput, StepResult], None],
                 before_run: Callable[[SchedulerOutput], LayerHook | None] | None = None,
                 idle_wait_s: float = 0.005) -> None:
        """on_result sees every step's output; before_run may return a per-layer hook."""
        self.engine = engine
        self.on_result = on_result
        self.before_run = before_run
        self.idle_wait_s = idle_wait_s
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self.pipeline = engine.pipeline(on_result, before_run)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._calls.put((lambda: None, Future()))  # wake the loop
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def call(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine loop is stopped"))
        else:
            self._calls.put((fn, fut))
        return fut

    def _run_call(self, fn: Callable[[], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # delivered to the caller
            fut.set_exception(exc)

    def _drain(self, block: bool) -> None:
        try:
            fn, fut = self._calls.get(timeout=self.idle_wait_s) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        self._run_call(fn, fut)
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            self._run_call(fn, fut)

    def _main(self) -> None:
        pipe = self.pipeline
        try:
            while not self._stop.is_set() or pipe.in_flight is not None:
                if pipe.in_flight is None:
                    self._drain(block=False)
                ahead = self._calls.empty() and not self._stop.is_set()
                if not pipe.advance(may_run_ahead=ahead):
                    self._drain(block=True)
        except BaseException as exc:
            log.exception("engine loop died")
            self.error = exc
            raise
        finally:
            self._stop.set()
            while True:  # fail whatever is still queued
                try:
                    _, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError("engine loop is stopped"))

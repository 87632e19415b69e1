"""Opt-in timeline of the transfer path, for profiling (PDSERVE_KV_TRACE=PREFIX).

Each process appends (perf_counter, role, event, request, detail, thread CPU time) tuples in memory and
writes them to PREFIX.<pid>.jsonl at exit. perf_counter is CLOCK_MONOTONIC on Linux, so
the files of the sender and receiver processes of one host share a time axis. Off (the
default), `mark` is a no-op of one attribute test.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

PREFIX = os.environ.get("PDSERVE_KV_TRACE") or None
_events: list[tuple[float, str, str, Any, Any, float]] = []
_gpu: list[tuple[str, str, Any, Any, Any]] = []  # (role, what, req, start event, end event)


def mark(role: str, event: str, req: Any = None, detail: Any = None) -> None:
    if PREFIX is not None:
        _events.append((time.perf_counter(), role, event, req, detail, time.thread_time()))


def gpu_begin(stream: Any = None) -> Any:
    """A timing CUDA event recorded now on `stream` (default: the current one); None when
    off."""
    if PREFIX is None:
        return None
    import torch
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def gpu_end(role: str, what: str, req: Any, start: Any, stream: Any = None) -> None:
    if start is not None:
        import torch
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        _gpu.append((role, what, req, start, ev))


def dump() -> None:
    if PREFIX is None or not (_events or _gpu):
        return
    for role, what, req, a, b in _gpu:
        try:
            b.synchronize()
            _events.append((0.0, role, "gpu_" + what, req, a.elapsed_time(b), 0.0))
        except Exception as e:  # noqa: BLE001 - profiling aid: never fail the caller
            _events.append((0.0, role, "gpu_" + what, req, f"error {e}", 0.0))
    _gpu.clear()
    with open(f"{PREFIX}.{os.getpid()}.jsonl", "w") as f:
        for t, role, event, req, detail, cpu in _events:
            f.write(json.dumps({"t": t, "role": role, "ev": event, "req": req, "d": detail,
                                "cpu": cpu}, default=str) + "\n")


atexit.register(dump)

"""In-process fakes for the worker tests: an engine loop stepped on demand, a gRPC context,
and a KV wire that copies blocks between two engines' pools in the test's own thread."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch


def aio(fn):
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


async def drain(agen) -> tuple[list[int], str]:
    """A worker token stream's tokens, and its last finish reason."""
    toks, reason = [], ""
    async for chunk in agen:
        toks += chunk.token_ids
        reason = chunk.finish_reason or reason
    return toks, reason


class Aborted(Exception):
    """What FakeContext.abort raises (grpc.aio raises AbortError the same way)."""

    def __init__(self, code: Any, details: str, trailing_metadata=()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)


class FakeContext:
    async def abort(self, code, details: str, trailing_metadata=()):
        raise Aborted(code, details, trailing_metadata)


class ManualEngineLoop:
    """EngineLoop's interface, run by the test: `pump()` runs queued calls and one step."""

    def __init__(self, engine, on_result, before_run=None) -> None:
        self.engine, self.on_result, self.before_run = engine, on_result, before_run
        self.calls: list[tuple[Callable[[], Any], Future]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def call(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self.calls.append((fn, fut))
        return fut

    def pump(self) -> None:
        calls, self.calls = self.calls, []
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except Exception as exc:  # delivered to the caller
                fut.set_exception(exc)
        if self.engine.has_unfinished():
            out = self.engine.schedule()
            if out.chunks:
                hook = self.before_run(out) if self.before_run else None
                self.on_result(out, self.engine.run(out, layer_hook=hook))


async def pump_forever(*loops: ManualEngineLoop) -> None:
    """Background task: step every loop, yielding to the event loop in between."""
    while True:
        for lp in loops:
            lp.pump()
        await asyncio.sleep(0.001)


class FakeWire:
    """Both ends of a KV link. The sender side copies each request's blocks from the
    prefill pool into the decode pool when `finish` comes (or fails it on request)."""

    def __init__(self, src_caches: list[torch.Tensor] | None = None,
                 dst_caches: list[torch.Tensor] | None = None) -> None:
        self.src, self.dst = src_caches, dst_caches
        self.address = b"fake-kv"
        self.expected: dict[str, tuple[list[int], Callable]] = {}
        self.sending: dict[str, tuple[list[int], list[int], Callable]] = {}
        self.aborted: list[str] = []
        self.layers_ready: dict[str, set[int]] = {}
        self.calls: list[tuple] = []  # the sender calls in order: ("start"|"layer"|"finish", ...)
        self.fail_next: str | None = None  # error of the next finished transfer
        # receiver side: blocks of failed requests a copy may still write (KVReceiver's
        # held_blocks), given back through on_release (the test wires it to the role's)
        self.held: dict[str, list[int]] = {}
        self.on_release: Callable[[str, list[int]], None] | None = None

    # -- sender link surface (prefill role) ---------------------------------------------
    def connect(self, address: bytes) -> None:
        if address != self.address:
            raise ConnectionError(f"no KV endpoint at {address!r}")

    def connected(self, address: bytes) -> bool:
        return False  # every request goes through connect(), which checks the address

    def start(self, req_id, address, src, dst, deadline_s, on_done) -> None:
        self.calls.append(("start", req_id))
        self.sending[req_id] = (list(src), list(dst), on_done)

    def layer_ready(self, req_id: str, layer: int) -> None:
        self.calls.append(("layer", req_id, layer))
        self.layers_ready.setdefault(req_id, set()).add(layer)

    def finish(self, req_id: str, aux: dict) -> None:
        """Every layer is ready (as KVSender.finish says), then the transfer ends."""
        self.calls.append(("finish", req_id))
        if self.src is not None:
            self.layers_ready.setdefault(req_id, set()).update(range(len(self.src)))
        src, dst, on_done = self.sending.pop(req_id)
        err, self.fail_next = self.fail_next, None
        nbytes = 0
        if err is None and self.src is not None:
            for s_layer, d_layer in zip(self.src, self.dst, strict=True):
                d_layer[dst] = s_layer[src]
                nbytes += s_layer[src].numel() * s_layer.element_size()
        on_done(req_id, err, nbytes)
        if req_id in self.expected:
            _, recv_done = self.expected.pop(req_id)
            recv_done(req_id, None if err else aux, err)

    # -- receiver link surface (decode role) --------------------------------------------
    def expect(self, req_id, block_ids, deadline_s, on_done) -> None:
        self.expected[req_id] = (list(block_ids), on_done)

    def fail(self, req_id: str, error: str, hold: bool = False) -> None:
        """Receiver side: the transfer of req_id failed (hold: while a copy into its blocks
        may still run; they are held until release())."""
        blocks, on_done = self.expected.pop(req_id)
        if hold:
            self.held[req_id] = blocks
        on_done(req_id, None, error)

    def held_blocks(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.held.items()}

    def release(self, req_id: str) -> None:
        """Receiver side: the held blocks of req_id are safe again (on_release)."""
        blocks = self.held.pop(req_id)
        if self.on_release is not None:
            self.on_release(req_id, blocks)

    def abort(self, req_id: str) -> None:
        """As a link does: an expected request's failed result follows (here, at once)."""
        self.aborted.append(req_id)
        self.sending.pop(req_id, None)
        if req_id in self.expected:
            self.fail(req_id, "aborted by the receiver")

    def close(self) -> None:
        pass

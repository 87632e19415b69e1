"""One request's KV push on the prefill worker, whose destination may come after the prompt ran.

The KV sender needs the destination (the decode worker's KV address and reserved block ids)
at `start()`. The coordinator sends Prefill and Reserve concurrently and hands the
destination over with Worker.SetKvTarget once the decode worker answered, so the step that
completes the prompt may begin, write some or all of its layers, and sample token 0 before
it is known. `KvPush` keeps what the sender would have been told, in order: the source
blocks (`begin`, when that step starts), each layer written (`layer_done`, from the layer
hook, with a CUDA event recorded on the engine's stream then) and token 0 (`finish`); when
the target arrives (`set_target`) it starts the transfer and replays them, each event still
marking exactly the point it was recorded at. A push whose target came with the Prefill
starts in `begin` and forwards every call at once, as before.

Threads: `begin`, `layer_done` and `finish` run on the engine thread; `set_target` and
`close` on the asyncio loop. One lock per request orders them, so the sender sees `start()`
before any `layer_ready()`, and nothing once the request was aborted (`close`). The replay
runs after the lock is released, so the engine thread's layer hook never waits for it: the
sender takes layer readiness in any order, and a `finish()` marks every layer ready.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.link import SenderLink

OnSent = Callable[[str, "str | None", int], None]  # (req_id, error or None, bytes sent)


@dataclass(frozen=True, slots=True)
class KvTarget:
    """Where one request's KV goes: the decode worker's reservation."""

    address: bytes  # the decode worker's KV endpoint (ReserveReply.kv_address)
    dst_block_ids: list[int]  # one per prompt block, in order
    decode_worker_id: str = ""


class EngineStream:
    """Points on the engine's CUDA stream, marked on the engine thread and handed to the KV
    sender later, from another thread. On CPU there is nothing to mark: a layer's KV is in
    the pool once the layer hook runs."""

    def __init__(self, device: str) -> None:
        self._device = torch.device(device) if device.startswith("cuda") else None
        self._side: torch.cuda.Stream | None = None

    def mark(self) -> torch.cuda.Event | None:
        """The engine thread's stream as of now (None on CPU)."""
        if self._device is None:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._device))
        return ev

    def after(self, mark: torch.cuda.Event | None, call: Callable[[], None]) -> None:
        """Run `call` (a sender call that records its own event on the current stream) on a
        side stream that waits for `mark` only, so that event fires with `mark`, not after
        whatever the engine queued since."""
        if mark is None:
            call()
            return
        if self._side is None:
            self._side = torch.cuda.Stream(self._device)
        with torch.cuda.stream(self._side):
            self._side.wait_event(mark)
            call()


class KvPush:
    """What the KV sender needs for one request, and what happened before it could start."""

    def __init__(self, link: SenderLink, stream: EngineStream, req_id: str, deadline_s: float,
                 on_sent: OnSent, target: KvTarget | None = None) -> None:
        self._lock = threading.Lock()
        self._link, self._stream = link, stream
        self.req_id, self.deadline_s, self._on_sent = req_id, deadline_s, on_sent
        self.target = target
        self._src: list[int] | None = None  # the prompt's blocks, once its last step began
        self._layers: list[tuple[int, Any]] = []  # (layer, mark) written before the start
        self._token0: tuple[dict, Any] | None = None  # finish's aux and mark, before the start
        self.started = False
        self.closed = False

    # -- asyncio loop ---------------------------------------------------------------------
    def set_target(self, target: KvTarget) -> str | None:
        """Take the destination and start if the prompt's last step has begun. Returns why
        not (the push already has one, or it was closed), or None once taken."""
        with self._lock:
            if self.closed:
                return "has ended"
            if self.target is not None:
                return "already has a KV target"
            self.target = target
            replay = self._start()
        for call in replay:
            call()
        return None

    def close(self) -> None:
        """The request is aborted: the sender hears nothing more from this push."""
        with self._lock:
            self.closed = True

    # -- engine thread --------------------------------------------------------------------
    def begin(self, src_block_ids: list[int]) -> None:
        """The step that completes the prompt starts; these blocks hold its KV."""
        with self._lock:
            if self.closed:
                return
            self._src = src_block_ids
            replay = self._start()
        for call in replay:
            call()

    def layer_done(self, layer: int) -> None:
        """The model wrote layer `layer`'s KV (the layer hook)."""
        with self._lock:
            if self.closed:
                return
            if self.started:
                self._link.layer_ready(self.req_id, layer)
            else:
                self._layers.append((layer, self._stream.mark()))

    def finish(self, aux: dict) -> None:
        """Token 0 is sampled: every layer is written; `aux` goes to the receiver."""
        with self._lock:
            if self.closed:
                return
            if self.started:
                self._link.finish(self.req_id, aux)
            else:
                self._token0 = (aux, self._stream.mark())

    # -- under the lock -------------------------------------------------------------------
    def _start(self) -> list[Callable[[], None]]:
        """Start the transfer once both the blocks and the target are known; returns the
        replay of what came before, to run after the lock is released."""
        if self.started or self.target is None or self._src is None:
            return []
        self.started = True
        rid, link, stream, t = self.req_id, self._link, self._stream, self.target
        link.start(rid, t.address, self._src, t.dst_block_ids, self.deadline_s, self._on_sent)
        replay = [lambda layer=layer, mark=mark: stream.after(
            mark, lambda: link.layer_ready(rid, layer)) for layer, mark in self._layers]
        if self._token0 is not None:
            aux, mark = self._token0
            replay.append(lambda: stream.after(mark, lambda: link.finish(rid, aux)))
        self._layers, self._token0 = [], None
        return replay

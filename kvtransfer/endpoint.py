"""What KVSender and KVReceiver share: the progress thread, peers, results, staging.

Threading: public methods only validate their arguments and queue a command; one
progress thread owns every socket, backend call, CUDA copy and request state. It sleeps in
select() (woken by a socket pair on each command), for poll_interval_s while ops are in
flight and up to idle_interval_s otherwise. Results go to a queue read by poll()/wait(), and
to the optional callback, which runs on the progress thread and must be quick.

Peers are untrusted: every control message is validated (schema.py) before use, and any
exception raised while handling one peer's input drops that peer only. Should the progress
thread die anyway (a bug), every request fails and `on_fatal(why)` tells the owner, which
must stop offering this endpoint (a worker turns NOT_SERVING).
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from . import auth, trace
from .backend import Backend, create_backend
from .common import ReqId, TransferError, TransferOptions, TransferResult
from .control import ControlConn
from .pack import KVLayout, StagingPool
from .peer import Peer, fine_timers
from .schema import ProtocolError, validate

log = logging.getLogger("pdserve.kvtransfer")

ResultCallback = Callable[[TransferResult], None]
FatalCallback = Callable[[str], None]


class Endpoint:
    """Base of KVSender/KVReceiver. Subclasses implement the _on_*/_progress hooks."""

    _role = "endpoint"

    def __init__(self, kv_caches: Sequence[torch.Tensor], backend: str | Backend = "ucx",
                 options: TransferOptions | None = None,
                 on_result: ResultCallback | None = None,
                 on_fatal: FatalCallback | None = None) -> None:
        self.options = options or TransferOptions()
        self._secret = auth.secret_bytes(self.options.secret)
        self.layout = KVLayout(kv_caches, self.options.copy_ctas, self.options.solo_copy_ctas)
        self.geometry = self.layout.geometry
        self.device = self.layout.device
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.staging = StagingPool(self.layout, self.options.staging_bytes,
                                   self.options.num_staging_buffers)
        self.backend = (backend if isinstance(backend, Backend)
                        else create_backend(backend, device=self.device))
        # gather (sender) or scatter (receiver) stream, separate from compute and backend
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._on_result = on_result
        self._on_fatal = on_fatal
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_pending = False
        self._cond = threading.Condition()
        self._results: deque[TransferResult] = deque()
        self._ids: set[ReqId] = set()  # requests not yet reported (guarded by _cond)
        self._peers: dict[int, Peer] = {}
        self._next_peer = 1
        self._stop = False
        self._fatal: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-{self._role}", daemon=True)

    # ---- public --------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        """Requests started/expected and not yet reported."""
        with self._cond:
            return len(self._ids)

    @property
    def fatal(self) -> str | None:
        """Why the progress thread died, or None while it runs (or after a clean close())."""
        return self._fatal

    @property
    def staging_free(self) -> int:
        return self.staging.free

    @property
    def staging_total(self) -> int:
        return self.staging.total

    def poll(self) -> list[TransferResult]:
        """Finished or failed requests since the last call (never blocks)."""
        with self._cond:
            out = list(self._results)
            self._results.clear()
        return out

    def wait(self, timeout_s: float, req_ids: Collection[ReqId] | None = None) -> list[TransferResult]:
        """Block until a result arrives (or every one of req_ids has one), or timeout_s."""
        end = time.monotonic() + timeout_s
        want = set(req_ids) if req_ids is not None else None
        with self._cond:
            while True:
                have = {r.req_id for r in self._results}
                if (want is None and self._results) or (want is not None and want <= have):
                    break
                left = end - time.monotonic()
                if left <= 0 or self._fatal is not None:
                    break
                self._cond.wait(left)
            if want is None:
                out = list(self._results)
                self._results.clear()
            else:
                out = [r for r in self._results if r.req_id in want]
                self._results = deque(r for r in self._results if r.req_id not in want)
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Fail what is in flight ("endpoint closed"), drop every peer, stop the thread."""
        if self._stop:
            return
        self._stop = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        trace.dump()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- for subclasses, any thread ---------------------------------------------------------
    def _check_open(self) -> None:
        if self._fatal is not None:
            raise TransferError(f"kv {self._role} stopped: {self._fatal}")
        if self._stop:
            raise TransferError(f"kv {self._role} is closed")

    def _claim(self, req_id: ReqId) -> None:
        self._check_open()
        with self._cond:
            if req_id in self._ids:
                raise ValueError(f"request {req_id!r} is already in flight")
            self._ids.add(req_id)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._check_open()
        self._cmds.put((fn, args, None))
        self._wake()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._check_open()
        fut: Future = Future()
        self._cmds.put((fn, args, fut))
        self._wake()
        return fut.result(self.options.connect_timeout_s)

    def _wake(self) -> None:
        if self._wake_pending:  # a wake-up byte is already on its way: save the syscall
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # ---- progress thread ------------------------------------------------------------------
    def _report(self, result: TransferResult) -> None:
        with self._cond:
            self._results.append(result)
            self._ids.discard(result.req_id)
            self._cond.notify_all()
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("kv %s result callback raised", self._role)

    def _add_peer(self, conn: ControlConn) -> Peer:
        peer = Peer(self._next_peer, conn)
        self._next_peer += 1
        self._peers[peer.id] = peer
        self._sel.register(conn.sock, selectors.EVENT_READ, peer)
        return peer

    def _peer_lost(self, peer: Peer, why: str) -> None:
        if not peer.alive:
            return
        peer.alive = False
        log.info("kv %s: peer %d lost: %s", self._role, peer.id, why)
        try:
            self._sel.unregister(peer.conn.sock)
        except (KeyError, ValueError):
            pass
        peer.conn.close()
        if peer.handle is not None:
            self.backend.abort(peer.handle)
        self._peers.pop(peer.id, None)
        self._on_peer_lost(peer, why)

    def _run(self) -> None:
        fine_timers()
        if self._cuda:  # this thread's copies (gather/scatter) all go on the copy stream
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self._copy_stream)
        try:
            while not self._stop:
                self._iterate()
        except BaseException as e:  # a bug must fail requests, not hang them
            log.exception("kv %s progress thread died", self._role)
            self._fatal = f"{type(e).__name__}: {e}"
        finally:
            self._shutdown(self._fatal or "endpoint closed")
        if self._fatal is not None and self._on_fatal is not None:
            try:
                self._on_fatal(self._fatal)
            except Exception:
                log.exception("kv %s fatal callback raised", self._role)

    def _iterate(self) -> None:
        for key, mask in self._sel.select(self._timeout()):
            obj = key.data
            if obj is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._wake_pending = False  # after draining: a later _wake() writes again
            elif isinstance(obj, Peer):
                if not obj.alive:
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        for msg in obj.conn.read():
                            # validated against what is acceptable now: a hello changes it
                            self._on_message(obj, validate(msg, obj.conn.accept))
                            if not obj.alive:
                                break
                except ProtocolError as e:
                    log.warning("kv %s: dropping peer %d: %s", self._role, obj.id, e)
                    self._peer_lost(obj, str(e))
                except (ConnectionError, TransferError) as e:
                    self._peer_lost(obj, str(e))
                except Exception as e:  # whatever a peer's input set off: drop that peer only
                    log.warning("kv %s: dropping peer %d: %s: %s", self._role, obj.id,
                                type(e).__name__, e)
                    self._peer_lost(obj, f"control protocol error: {type(e).__name__}: {e}")
            else:
                obj()  # listener accept
        self._run_commands()
        self._progress()
        self._expire_handshakes()
        self._flush_all()

    def _expire_handshakes(self) -> None:
        """Drop peers that did not finish their handshake within connect_timeout_s."""
        limit = time.monotonic() - self.options.connect_timeout_s
        for peer in [p for p in self._peers.values() if not p.ready and p.opened_at < limit]:
            self._peer_lost(peer, "handshake timed out")

    def _run_commands(self) -> None:
        """Run queued API calls. Also called before acting on a peer's message that may
        depend on one (a call that returned before the peer sent is in the queue by now)."""
        while True:
            try:
                fn, args, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                res = fn(*args)
                if fut is not None:
                    fut.set_result(res)
            except Exception as e:
                if fut is None:
                    raise
                fut.set_exception(e)

    def _flush_all(self) -> None:
        for peer in list(self._peers.values()):
            try:
                peer.conn.flush()
            except ConnectionError as e:
                self._peer_lost(peer, str(e))
                continue
            if peer.close_when_flushed and not peer.conn.wants_write:
                self._peer_lost(peer, "handshake refused")
                continue
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.conn.wants_write else 0)
            if mask != peer.mask:
                peer.mask = mask
                self._sel.modify(peer.conn.sock, mask, peer)

    def _timeout(self) -> float:
        if not self._cmds.empty():
            return 0.0
        if self._busy():
            return self.options.poll_interval_s
        nxt = self._next_deadline()
        idle = self.options.idle_interval_s
        return idle if nxt is None else max(0.0, min(idle, nxt - time.monotonic()))

    def _shutdown(self, why: str) -> None:
        try:
            self._fail_all(why)
        except Exception:
            log.exception("kv %s: failing requests at shutdown", self._role)
        with self._cond:  # claimed, but their start()/expect() was still queued: no result yet
            orphans = list(self._ids)
        for rid in orphans:
            self._report(TransferResult(rid, False, error=why))
        for peer in list(self._peers.values()):
            peer.alive = False
            peer.conn.close()
            if peer.handle is not None:
                self.backend.abort(peer.handle)
        self._peers.clear()
        if self._cuda:
            torch.cuda.synchronize(self.device)  # no copy still touching the pool
        try:
            self.backend.close()
        finally:
            self._close_sockets()
            with self._cond:
                self._cond.notify_all()

    def _close_sockets(self) -> None:
        for s in (self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # ---- hooks -------------------------------------------------------------------------------
    def _on_message(self, peer: Peer, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_peer_lost(self, peer: Peer, why: str) -> None:
        raise NotImplementedError

    def _progress(self) -> None:
        raise NotImplementedError

    def _busy(self) -> bool:
        raise NotImplementedError

    def _next_deadline(self) -> float | None:
        raise NotImplementedError

    def _fail_all(self, why: str) -> None:
        raise NotImplementedError

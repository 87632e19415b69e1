"""Several coordinator addresses for one client: which one to call, and when to move on.

Coordinators that read one etcd registry (coordinator/etcd_registry.py) are
interchangeable, so a client given "a:50051,b:50051" calls the current one and, when that
one cannot take a call (UNAVAILABLE: refused, reset, or it has no worker), moves to the
next and calls again. What may be called again: a unary call, and a stream that has not
yielded anything yet (no token reached the caller, so nothing is duplicated). A stream
that breaks after its first chunk ends with UNAVAILABLE saying how many chunks arrived;
the caller decides (the tokens it has are valid, the request is not finished).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

T = TypeVar("T")
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """"a:1,b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"] (order kept, duplicates dropped)."""
    items = address.split(",") if isinstance(address, str) else list(address)
    out = list(dict.fromkeys(a.strip() for a in items if a.strip()))
    if not out:
        raise ValueError("no coordinator address given")
    return out


def should_fail_over(error: grpc.RpcError) -> bool:
    return error.code() in RETRY_CODES


class Failover(Generic[T]):
    """The addresses, one lazily made client object (channel + stub) per address, and the
    index of the current one. `attempts()` is how many calls one operation may make."""

    def __init__(self, addresses: str | Sequence[str], make: Callable[[str], T],
                 close: Callable[[T], object]) -> None:
        self.addresses = parse_addresses(address=addresses)
        self._make, self._close = make, close
        self._objs: dict[str, T] = {}
        self._index = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self.addresses[self._index]

    def get(self) -> tuple[str, T]:
        with self._lock:
            address = self.current
            if address not in self._objs:
                self._objs[address] = self._make(address)
            return address, self._objs[address]

    def failed(self, address: str) -> None:
        """`address` could not take a call: the next one becomes current (once per failure)."""
        with self._lock:
            if self.current == address:
                self._index = (self._index + 1) % len(self.addresses)

    def attempts(self) -> int:
        return 2 * len(self.addresses) if len(self.addresses) > 1 else 1

    def close_all(self) -> list[object]:
        with self._lock:
            objs, self._objs = list(self._objs.values()), {}
        return [self._close(o) for o in objs]

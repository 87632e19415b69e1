"""Routing policies: which decode, prefill or colocated worker serves a request.

A policy orders candidates, best first; the orchestrator tries them in that order (a decode
worker may refuse a reservation; a retry skips a failed worker). Policies register by name:

    @register_policy("mine")
    class Mine(RoutingPolicy): ...
    make_policy("mine")
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

from pdserve.coordinator.registry import WorkerHandle

_POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str):
    def wrap(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        _POLICIES[name] = cls
        cls.name = name
        return cls
    return wrap


def make_policy(name: str) -> RoutingPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(_POLICIES)}") from None


def policy_names() -> list[str]:
    return sorted(_POLICIES)


class RoutingPolicy(ABC):
    """Orders candidate workers for one request. Candidates are alive workers of one role.

    Methods return a new list (best first) and never an empty one for non-empty input.
    """

    name = "base"

    @abstractmethod
    def order_decode(self, workers: Sequence[WorkerHandle], prompt: Sequence[int]) -> list[WorkerHandle]:
        """Decode workers, best first, for a prompt whose KV they would hold."""

    @abstractmethod
    def order_prefill(self, workers: Sequence[WorkerHandle], prompt: Sequence[int]) -> list[WorkerHandle]:
        """Prefill workers, best first."""

    def order_both(self, workers: Sequence[WorkerHandle], prompt: Sequence[int]) -> list[WorkerHandle]:
        """Colocated (`both`) workers, best first. Default: as for decode."""
        return self.order_decode(workers, prompt)


def _decode_key(w: WorkerHandle) -> tuple[int, int, int]:
    return (-w.est_free_blocks(), w.est_running(), w.routed)


def _prefill_key(w: WorkerHandle) -> tuple[int, int, int]:
    return (w.est_queued_prefill_tokens(), w.inflight, w.routed)


@register_policy("least_loaded")
class LeastLoaded(RoutingPolicy):
    """Decode: most free KV blocks, then fewest running. Prefill: fewest queued prompt tokens."""

    def order_decode(self, workers, prompt):
        return sorted(workers, key=_decode_key)

    def order_prefill(self, workers, prompt):
        return sorted(workers, key=_prefill_key)


@register_policy("round_robin")
class RoundRobin(RoutingPolicy):
    """Each role's workers in turn (sorted by id so the order is stable)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def _rotate(self, kind: str, workers: Sequence[WorkerHandle]) -> list[WorkerHandle]:
        ws = sorted(workers, key=lambda w: w.worker_id)
        if not ws:
            return []
        i = self._next.get(kind, 0) % len(ws)
        self._next[kind] = i + 1
        return ws[i:] + ws[:i]

    def order_decode(self, workers, prompt):
        return self._rotate("decode", workers)

    def order_prefill(self, workers, prompt):
        return self._rotate("prefill", workers)

    def order_both(self, workers, prompt):
        return self._rotate("both", workers)


@register_policy("prefix_aware")
class PrefixAware(LeastLoaded):
    """Prefill affinity: prompts sharing their first `prefix_tokens` tokens (e.g. a system
    prompt) go to the same prefill worker (rendezvous hashing, stable when workers join or
    leave), so its prefix cache hits. Falls back to least loaded when the prompt is shorter
    than `prefix_tokens` or the chosen worker has `max_imbalance_tokens` more queued than the
    least loaded one."""

    prefix_tokens = 64
    max_imbalance_tokens = 16384

    def order_prefill(self, workers, prompt):
        by_load = sorted(workers, key=_prefill_key)
        if len(prompt) < self.prefix_tokens or len(by_load) < 2:
            return by_load
        key = ",".join(map(str, prompt[: self.prefix_tokens])).encode()

        def score(w: WorkerHandle) -> bytes:
            return hashlib.blake2b(key + w.worker_id.encode(), digest_size=8).digest()

        best = max(by_load, key=score)
        least = by_load[0].est_queued_prefill_tokens()
        if best.est_queued_prefill_tokens() - least > self.max_imbalance_tokens:
            return by_load
        return [best] + [w for w in by_load if w is not best]

"""The Role protocol: what one pool does with a worker's engine, and the registry of roles.

The worker (worker/server.py, worker/core.py) knows no role by name. It builds the engine
with `Role.engine_config(cfg)` (each pool sizes its batching to its phase), then hands every
Worker RPC to the role, and calls the role's engine-thread hooks around each step.

Where each method runs:
- gRPC handlers (`reserve`, `decode_stream`, `prefill`, `set_kv_target`, `generate`): the
  server's asyncio loop. A role serves the RPCs it overrides; the others end
  FAILED_PRECONDITION.
- `before_run`, `on_token`: the engine thread, between schedule() and the next step.
  They must not block; they may touch the scheduler and the KV pool.
- `abort`, `close`: any thread; they only hand work on (transfer endpoints are thread-safe).

A new role is a new package with a Role subclass decorated with `@register_role("name")`;
the server needs no edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import grpc

from pdserve.engine.config import EngineConfig
from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.worker.state import ReqState

if TYPE_CHECKING:
    from pdserve.worker.core import WorkerCore

LayerHook = Callable[[int], None]


class Role:
    """Base of every role; each hook has a do-nothing default, each RPC refuses."""

    name: ClassVar[str] = "abstract"
    transfer_backend: ClassVar[bool] = False  # advertises a KV transfer backend
    queues_prefill: ClassVar[bool] = False  # its admitted prompts wait for prefill here

    def __init__(self, core: WorkerCore) -> None:
        self.core = core

    @classmethod
    def engine_config(cls, cfg: EngineConfig) -> EngineConfig:
        """The engine settings of this pool's phase (batching, graphs), from the user's."""
        return cfg

    # -- engine thread --------------------------------------------------------------------
    def before_run(self, out: SchedulerOutput) -> LayerHook | None:
        """Called before each step runs; may return a hook called after each layer."""
        return None

    def on_token(self, st: ReqState, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """A token was sampled for st (with its logprobs when the request asked). Return True
        when the role consumed it; otherwise the worker streams it to the request's client."""
        return False

    def engine_abort(self, req_id: str) -> bool:
        """What an abort does to the engine (False: it did not know req_id). A role whose
        transfers may still write a request's blocks keeps them out of the pool."""
        return self.core.engine.abort(req_id)

    # -- any thread -----------------------------------------------------------------------
    def abort(self, req_id: str) -> None:
        """Stop whatever the role runs for req_id beside the engine (transfers)."""

    def close(self) -> None:
        """Release the role's resources (transfer endpoints)."""

    # -- Worker RPCs (asyncio loop) -------------------------------------------------------
    async def _refuse(self, context, rpc: str):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{rpc} is not served by a {self.name} worker")

    async def reserve(self, request, context):
        await self._refuse(context, "Reserve")

    async def prefill(self, request, context):
        await self._refuse(context, "Prefill")
        yield  # pragma: no cover - an async generator like the real one

    async def set_kv_target(self, request, context):
        await self._refuse(context, "SetKvTarget")

    async def decode_stream(self, request, context):
        await self._refuse(context, "DecodeStream")
        yield  # pragma: no cover - makes this an async generator like the real ones

    async def generate(self, request, context):
        await self._refuse(context, "Generate")
        yield  # pragma: no cover


_ROLES: dict[str, type[Role]] = {}


def register_role(name: str):
    def deco(cls: type[Role]) -> type[Role]:
        cls.name = name
        _ROLES[name] = cls
        return cls
    return deco


def get_role(name: str) -> type[Role]:
    if name not in _ROLES:
        raise ValueError(f"unknown worker role {name!r}; known: {sorted(_ROLES)}")
    return _ROLES[name]

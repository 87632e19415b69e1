"""pdserve: LLM serving with prefill and decode disaggregated across GPU pools."""

from __future__ import annotations

import os

# pdserve forks only to exec (its worker and coordinator processes: subprocess with a
# preexec_fn). With gRPC's fork support on, a child forked while the parent's gRPC is busy
# restarts gRPC's poller, which fails on a descriptor close_fds has closed and aborts the
# child before it execs ("epoll_wait error: Bad file descriptor", SIGABRT: 10-14 of 300
# forks with gRPC 1.85 and an active channel; none without). Read when grpc is imported,
# so it is set here, before any pdserve module imports grpc; a value already set wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "Client", "AsyncClient", "EngineConfig", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import pdserve` stays cheap and the CLI starts fast.
    if name == "LLM":
        from pdserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams
        return SamplingParams
    if name in ("Client", "AsyncClient"):
        from pdserve.coordinator import client
        return getattr(client, name)
    if name == "EngineConfig":
        from pdserve.engine.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")

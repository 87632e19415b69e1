"""pdserve: LLM serving with prefill and decode disaggregated across GPU pools."""

from __future__ import annotations

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

"""Conditional disaggregation: per request, is a prompt worth a prefill worker and a KV
transfer, or does the chosen decode worker prefill it itself?

llm-d's prefix-based-pd-decider and Dynamo decide the same way: a short prompt's prefill is
cheap, while disaggregating it costs a Reserve, a Prefill RPC and a transfer; prefilled on
the decode worker it also needs no prefill-pool capacity. vLLM and SGLang always
disaggregate in P/D mode.

What is counted: the prompt's length in tokens (for a migrated request, prompt + the
tokens already streamed, the prompt of that attempt). The tokens already in a decode
worker's prefix cache would be the better count (llm-d subtracts them), but the
coordinator's registry carries no per-worker cache contents, so it is not cheaply known.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_PREFILL = "local_prefill"  # the decode worker prefills the prompt (no P, no transfer)
DISAGGREGATED = "disaggregated"  # prefill worker + KV transfer + decode worker
COLOCATED = "colocated"  # a `both` worker (no P/D pool registered)
PATHS = (LOCAL_PREFILL, DISAGGREGATED, COLOCATED)


@dataclass(frozen=True, slots=True)
class PdDecider:
    """threshold_tokens: prompts shorter than this are prefilled on the decode worker;
    0 = always disaggregate (vLLM's and SGLang's behaviour)."""

    threshold_tokens: int = 0

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0:
            raise ValueError(f"pd_threshold_tokens must be >= 0, got {self.threshold_tokens}")

    def path(self, prompt_tokens: int) -> str:
        """The path of a prompt of this many tokens when a P/D pool is registered."""
        return LOCAL_PREFILL if prompt_tokens < self.threshold_tokens else DISAGGREGATED

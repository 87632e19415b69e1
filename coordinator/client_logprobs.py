"""Logprobs in the Python clients (coordinator/client.py): the keyword arguments a caller
gives, and the per-token values a Chunk or Result carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.proto import pdserve_pb2 as pb


@dataclass(slots=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens' (best first), from
    the raw model distribution (before temperature, top-k, top-p)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob)


def logprobs_override(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling keyword overrides with `logprobs=True, top_logprobs=k` (OpenAI chat's pair)
    turned into sampling's `logprobs=k`; ValueError for top_logprobs without logprobs."""
    kw = dict(overrides)
    want, top = kw.pop("logprobs", None), kw.pop("top_logprobs", None)
    if top is not None and not want:
        raise ValueError("top_logprobs needs logprobs=True")
    if want is not None and not isinstance(want, bool):
        raise ValueError(f"logprobs must be True or False, got {want!r} (top_logprobs=k "
                         "asks for the k most likely tokens)")
    if want:
        kw["logprobs"] = 0 if top is None else top
    return kw


def response_logprobs(r: pb.GenerateResponse) -> list[TokenLogprob] | None:
    """One per token of the response; None when the request did not ask."""
    if not r.logprobs:
        return None
    return [TokenLogprob(t, lp.logprob, list(zip(lp.top_ids, lp.top_logprobs)))
            for t, lp in zip(r.token_ids, r.logprobs)]

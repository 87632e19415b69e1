"""Conversions between protobuf messages and Python objects, shared by coordinator, clients
and workers (`sampling_from_proto` is what a worker uses to build engine SamplingParams)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")
SAMPLING_KEYS = frozenset((*_OPTIONAL, "stop_token_ids", "ignore_eos"))

ROLE_BY_NAME = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}
ROLE_NAME = {v: k for k, v in ROLE_BY_NAME.items()}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Engine SamplingParams from the message; unset fields take engine defaults.

    Raises ValueError with the engine's message for invalid values.
    """
    kw: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    return SamplingParams(stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos, **kw)


def sampling_to_proto(sampling: SamplingParams | Mapping[str, Any] | None = None,
                      **overrides: Any) -> pb.SamplingParams:
    """Message from SamplingParams, a dict of its fields, and/or keyword overrides.

    Only given fields are set (no local validation: the coordinator validates).
    """
    if isinstance(sampling, SamplingParams):
        fields = {k: getattr(sampling, k) for k in SAMPLING_KEYS}
    else:
        fields = dict(sampling or {})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(fields) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    msg = pb.SamplingParams()
    for name in _OPTIONAL:
        if fields.get(name) is not None:
            setattr(msg, name, fields[name])
    msg.stop_token_ids.extend(int(t) for t in fields.get("stop_token_ids") or ())
    msg.ignore_eos = bool(fields.get("ignore_eos", False))
    return msg


def metrics_to_dict(m: pb.RequestMetrics) -> dict[str, Any]:
    return {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}

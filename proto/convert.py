"""Conversions between protobuf messages and plain Python values, shared by the coordinator,
its clients and the workers. The one table of role names lives here.

`sampling_fields(msg)` gives the keyword arguments of the engine's `SamplingParams` (only
the fields the message sets), so the wire format does not depend on the engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.proto import pdserve_pb2 as pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")
SAMPLING_KEYS = frozenset((*_OPTIONAL, "stop_token_ids", "ignore_eos"))

# The roles of a worker, by the one name each has everywhere (CLI, registry, setups).
ROLE_BY_NAME = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}
ROLE_NAME = {v: k for k, v in ROLE_BY_NAME.items()}
ROLES = tuple(ROLE_BY_NAME)

# The longest request id: a request's id travels in the KV control channel's messages,
# whose schema refuses longer ones (kvtransfer/schema.py MAX_ID_CHARS, the same number).
MAX_REQUEST_ID_CHARS = 256


def sampling_fields(msg: pb.SamplingParams) -> dict[str, Any]:
    """Keyword arguments of the engine's SamplingParams; unset fields are left out, so they
    take the engine's defaults (which also validates them)."""
    kw: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    return {**kw, "stop_token_ids": tuple(msg.stop_token_ids), "ignore_eos": msg.ignore_eos}


def sampling_to_proto(sampling: Any = None, **overrides: Any) -> pb.SamplingParams:
    """Message from a SamplingParams (any object with its fields), a dict of its fields,
    and/or keyword overrides. Only given fields are set (no local validation: the
    coordinator validates).
    """
    if sampling is None or isinstance(sampling, Mapping):
        fields = dict(sampling or {})
    else:
        fields = {k: getattr(sampling, k) for k in SAMPLING_KEYS}
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


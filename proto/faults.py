"""Which side of a worker pair failed: trailing metadata a worker adds to an error status,
so the coordinator charges the failure to the worker that failed (docs/architecture.md,
"Failure handling").

    await context.abort(grpc.StatusCode.UNAVAILABLE, "cannot reach ...", trailing_metadata=PEER)
"""

from __future__ import annotations

from collections.abc import Iterable

FAULT_KEY = "pdserve-fault"
# The other worker of the pair failed (a prefill worker cannot reach its decode worker's KV
# endpoint): the worker that answers is healthy.
FAULT_PEER = "peer"
PEER: tuple[tuple[str, str], ...] = ((FAULT_KEY, FAULT_PEER),)


def fault_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The fault named in trailing metadata ("" when none)."""
    for key, value in metadata or ():
        if key == FAULT_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""

"""Plain types shared by the transfer layer: KV geometry, options, results, errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch

ReqId = Union[int, str]  # msgpack-able request id chosen by the serving layer

SCHEMA_VERSION = 2  # of every control header; both sides must agree (2: framed, authenticated)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn, "uint8": torch.uint8,
}


class TransferError(RuntimeError):
    """A transfer (or the connection under it) failed."""


class GeometryMismatchError(TransferError):
    """Sender and receiver KV pools differ in a way that makes block copies meaningless."""


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Shape of the paged KV pool: per layer [num_blocks, 2, block_size, num_kv_heads, head_dim].

    num_blocks is local (each side sizes its own pool) and is not part of the handshake.
    """

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16", "float32", ...

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVGeometry.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVGeometry.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer (its K and V)."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def token_nbytes(self) -> int:
        """K and V of one token over all layers."""
        return self.block_nbytes * self.num_layers // self.block_size

    @classmethod
    def from_kv_caches(cls, kv_caches: Sequence[torch.Tensor]) -> KVGeometry:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        t = kv_caches[0]
        if t.dim() != 5 or t.shape[1] != 2:
            raise ValueError(
                f"a KV layer must be [num_blocks, 2, block_size, num_kv_heads, head_dim], got {tuple(t.shape)}")
        name = next((k for k, v in _DTYPES.items() if v == t.dtype), None)
        if name is None:
            raise ValueError(f"unsupported KV dtype {t.dtype}")
        return cls(len(kv_caches), int(t.shape[2]), int(t.shape[3]), int(t.shape[4]), name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_compatible(self, other: dict[str, Any], mine: str = "receiver",
                         theirs: str = "sender") -> None:
        """Raise GeometryMismatchError naming every differing field with both values."""
        diffs = [f"{k}: {theirs}={other.get(k)!r} {mine}={v!r}"
                 for k, v in self.to_dict().items() if other.get(k) != v]
        if diffs:
            raise GeometryMismatchError("KV geometry mismatch between sender and receiver: "
                                        + "; ".join(diffs))


@dataclass(frozen=True, slots=True)
class TransferOptions:
    """Knobs of one KVSender/KVReceiver. Sizes in bytes, times in seconds."""

    staging_bytes: int = 64 << 20  # one staging buffer = the largest message
    num_staging_buffers: int = 4  # >= 2 for double buffering
    # first/last message of a coalesced run (pipeline fill). As large as a staging buffer:
    # with smaller ones, Python's per-message cost on both sides exceeds the wire time of a
    # message (2xH100: 512 tokens 0.27 -> 0.44 of a raw send, 2k 0.43 -> 0.65, 8k equal;
    # benchmarks/results/transfer/). Layers that become ready one by one still go at once.
    min_message_bytes: int = 64 << 20
    layerwise: bool = True  # send each layer as soon as it is ready (else wait for all)
    deadline_s: float = 30.0  # default per-request deadline
    connect_timeout_s: float = 10.0
    drain_timeout_s: float = 5.0  # in-flight ops of a failed request; then the peer is aborted
    # receiver: a peer copy's `end` may name the sender's CUDA event that follows its last
    # copy; if it has not fired this long after that `end` (a hung sender GPU), the request
    # fails with a clear error, but its blocks stay held until the event fires or the pair
    # ends (KVReceiver.held_blocks / on_release). A copy takes milliseconds; 10 s also lies
    # under the coordinator's stall timeout (15 s), so this error is the one reported.
    landing_timeout_s: float = 10.0
    poll_interval_s: float = 1e-4  # loop sleep while ops are in flight (0: busy-poll)
    idle_interval_s: float = 0.05  # loop sleep when idle (sockets still wake it at once)
    host: str = "127.0.0.1"  # control listen address (receiver); "0.0.0.0" for all
    advertise_host: str | None = None  # host put in the address; None: `host`
    port: int = 0  # control listen port (receiver); 0: any free port
    # cluster secret: peers must prove they hold it before anything reaches the backend
    # (None: no authentication, the behaviour before it existed)
    secret: bytes | str | None = field(default=None, repr=False)
    max_frame_bytes: int = 1 << 20  # largest control message accepted from a peer
    max_pending_handshakes: int = 64  # receiver: connections not yet through the handshake
    # CUDA gather/scatter: thread blocks of the bounded row-copy kernel (row_copy.py), so the
    # copy never takes the SMs the backend's next send/recv kernel needs; 0: torch index ops
    copy_ctas: int = 32
    # a gather with no send in flight, or a scatter with no other receive in flight (a
    # pipeline's fill and drain), runs on every SM: 2 programs per SM (-1), or this many
    # thread blocks; 0: copy_ctas there too
    solo_copy_ctas: int = -1
    # on one host, write a request's blocks straight into the receiver's pool (CUDA IPC on
    # GPU, shared memory on CPU: peer_pool.py) when both pools are flat and the sender knows
    # the destination blocks; else (or False) stage and send through the backend
    peer_copy: bool = True
    # a peer copy of a layer-wise request also copies while the model computes (a quarter of
    # the layers at a time). Off: it copies once, after the forward, on every SM. Measured
    # (2 x H100, bench ttft --interleave): copies during an 8k prefill slowed the forward by
    # 6.7 ms (SM contention), while 1 GiB after it takes about 3 ms; TTFT 1.03 -> 1.01 of
    # colocated at 8k, 1.01 -> 1.00 at 32k. Staged (cross-host) transfers stay layer-wise.
    peer_copy_during_forward: bool = False

    def __post_init__(self) -> None:
        if self.copy_ctas < 0 or self.solo_copy_ctas < -1:
            raise ValueError("copy_ctas must be >= 0 and solo_copy_ctas >= -1")
        if self.max_frame_bytes < 1024 or self.max_pending_handshakes < 1:
            raise ValueError("max_frame_bytes must be >= 1024 and max_pending_handshakes >= 1")
        if self.staging_bytes <= 0 or self.num_staging_buffers < 1:
            raise ValueError("staging_bytes and num_staging_buffers must be positive")
        if self.min_message_bytes <= 0:
            raise ValueError("min_message_bytes must be positive")
        for name in ("deadline_s", "connect_timeout_s", "drain_timeout_s", "landing_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.poll_interval_s < 0 or self.idle_interval_s <= 0:
            raise ValueError("poll_interval_s must be >= 0 and idle_interval_s > 0")


@dataclass(frozen=True, slots=True)
class TransferResult:
    """Outcome of one request on one side. ok=False carries a human-readable error."""

    req_id: ReqId
    ok: bool
    aux: dict | None = None  # sender's aux (receiver side, on success); the serving layer's data
    error: str | None = None
    nbytes: int = 0  # payload bytes moved for this request
    elapsed_s: float = 0.0  # from start/expect to the result, on this side's clock
    done_at: float = 0.0  # time.perf_counter() when the result was produced
    num_messages: int = 0  # payload messages moved for this request
    via: str = ""  # how the blocks moved: "peer_copy" or the backend's name


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How a worker moves KV: backend, per-request deadline, layer-wise push, staging size."""

    backend: str = "ucx"  # "ucx" | "nccl"
    timeout_s: float = 30.0  # per-request transfer deadline
    layerwise: bool = True  # push each layer as soon as it is computed
    # Steps of fewer tokens push after the forward instead: their forward is bound by kernel
    # launches, and per-layer hand-offs to the transfer thread slow it more than the whole
    # transfer takes (measured: docs/architecture.md, "Transfer findings").
    layerwise_min_tokens: int = 1024
    staging_bytes: int = 64 << 20  # per staging buffer
    peer_copy: bool = True  # same host: copy into the receiver's pool (TransferOptions)
    peer_copy_during_forward: bool = False  # TransferOptions.peer_copy_during_forward
    landing_timeout_s: float = 10.0  # TransferOptions.landing_timeout_s (decode side)
    secret: bytes | str | None = field(default=None, repr=False)  # cluster secret (None: none)

    def __post_init__(self) -> None:
        if self.backend not in ("ucx", "nccl"):
            raise ValueError(f"transfer backend must be 'ucx' or 'nccl', got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError("transfer timeout_s must be positive")
        if self.landing_timeout_s <= 0:
            raise ValueError("transfer landing_timeout_s must be positive")

"""One worker's configuration: its role, its engine, its KV transfer and its server."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.kvtransfer.common import TransferConfig


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str  # a registered Role name: "prefill" | "decode" | "both"
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    host: str = "127.0.0.1"  # listen here and advertise it
    port: int = 0  # Worker service port (0: pick a free one)
    worker_id: str = ""  # name in the registry ("": the coordinator assigns one)
    coordinator: str | None = None  # HOST:PORT to register with (None: standalone)
    heartbeat_s: float = 1.0
    auth_token: str | None = field(default=None, repr=False)  # the coordinator's API key
    # the cluster plane's credential: sent to the coordinator (instead of auth_token) and
    # required of every Worker RPC; the KV handshake takes it from transfer.secret
    cluster_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s}")

"""One worker's configuration: its role, its engine, its KV transfer and its server."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.kvtransfer.common import TransferConfig
from pdserve.proto.tls import TLSConfig

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")  # the same list as pdserve/net.py


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str  # a registered Role name: "prefill" | "decode" | "both"
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    host: str = "127.0.0.1"  # listen here (gRPC and the KV control channel)
    advertise_host: str | None = None  # what peers on other hosts dial (None: `host`)
    port: int = 0  # Worker service port (0: pick a free one)
    worker_id: str = ""  # name in the registry ("": the coordinator assigns one)
    coordinator: str | None = None  # HOST:PORT to register with (None: standalone)
    heartbeat_s: float = 1.0
    auth_token: str | None = field(default=None, repr=False)  # the coordinator's API key
    # the cluster plane's credential: sent to the coordinator (instead of auth_token) and
    # required of every Worker RPC; the KV handshake takes it from transfer.secret
    cluster_secret: str | None = field(default=None, repr=False)
    etcd: str | None = None  # etcd endpoints: register there (under a lease), not with `coordinator`
    etcd_prefix: str = "/pdserve"
    lease_ttl_s: int = 3  # a dead worker leaves the etcd registry after this long
    tls: TLSConfig | None = None  # TLS of the Worker server and the coordinator link
    # tokens per streamed message after a stream's first (1: each token as it comes; K: fewer
    # messages on the host path, each token up to K - 1 steps later: docs/capstone.md,
    # "Session 15")
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.host in WILDCARD_HOSTS and not self.advertise_host:
            raise ValueError(f"host {self.host!r} listens everywhere: give advertise_host, the "
                             "address peers on other hosts reach this worker at")
        if self.advertise_host in WILDCARD_HOSTS:
            raise ValueError(f"advertise_host {self.advertise_host!r} is not reachable: name "
                             "one address of this host")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s}")
        if self.etcd and self.heartbeat_s >= self.lease_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below lease_ttl_s "
                             f"({self.lease_ttl_s})")

    @property
    def advertised_host(self) -> str:
        """The host put in the worker's registry entry and in its KV address."""
        return self.advertise_host or self.host

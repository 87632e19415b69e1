"""The coordinator's configuration (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    heartbeat_s: float = 1.0  # asked of every worker at registration
    worker_timeout_s: float = 5.0  # a worker silent this long is dropped
    max_queue: int = 1024  # requests waiting at the coordinator
    routing: str = "least_loaded"  # a policy name of coordinator/router.py
    auth_token: str | None = field(default=None, repr=False)  # clients' API key
    # workers' credential: Register and Heartbeat, and sent on every Worker RPC
    cluster_secret: str | None = field(default=None, repr=False)
    model_cache_dir: str | None = None  # built-in models' tokenizers (see engine/model_cache.py)
    etcd: str | None = None  # etcd endpoints ("http://h:2379,..."): read workers from there
    etcd_prefix: str = "/pdserve"  # the cluster's keys in etcd

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.worker_timeout_s <= 0:
            raise ValueError("heartbeat_s and worker_timeout_s must be positive")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

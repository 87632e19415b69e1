"""The coordinator's configuration (frozen dataclasses, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.proto.tls import TLSConfig


@dataclass(frozen=True, slots=True)
class FailureConfig:
    """Detection, retry/migration and circuit breaking (docs/architecture.md, "Failure
    handling"). Times in seconds."""

    rpc_timeout_s: float = 10.0  # a unary worker RPC (Reserve) when the client set no deadline
    prefill_timeout_s: float = 120.0  # a Prefill when the client set no deadline
    stall_timeout_s: float = 15.0  # a token stream silent this long has stalled: migrate
    suspect_heartbeats: float = 2.5  # heartbeat periods missed before a worker is suspect
    max_attempts: int = 4  # per request: the first + retries/migrations on other pairs
    retry_backoff_s: float = 0.05  # before the 2nd attempt; doubles, at most 1 s
    rejoin_wait_s: float = 3.0  # after a failure, wait this long for a worker of a role
    #                             with none left to (re)register before giving up
    breaker_failures: int = 3  # failures (1 s apart at least) within breaker_window_s ...
    breaker_window_s: float = 30.0
    breaker_open_s: float = 10.0  # ... open the worker's circuit this long (no new work)

    def __post_init__(self) -> None:
        for name in ("rpc_timeout_s", "prefill_timeout_s", "stall_timeout_s",
                     "suspect_heartbeats", "breaker_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_attempts < 1 or self.breaker_failures < 1:
            raise ValueError("max_attempts and breaker_failures must be >= 1")
        if self.retry_backoff_s < 0 or self.breaker_open_s < 0 or self.rejoin_wait_s < 0:
            raise ValueError("retry_backoff_s, breaker_open_s and rejoin_wait_s must be >= 0")


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
    failure: FailureConfig = field(default_factory=FailureConfig)
    # before a prefill/decode worker is registered, warm each transfer path it will use
    # (coordinator/warmup.py), for at most this long; 0 = off
    warm_up_s: float = 0.0
    # TLS of the gRPC server, the HTTP gateway and the channels to workers (None: plaintext)
    tls: TLSConfig | None = None
    # conditional disaggregation (coordinator/pd_decider.py): prompts under this many tokens
    # are prefilled on their decode worker; 0 = always disaggregate
    pd_threshold_tokens: int = 0

    def __post_init__(self) -> None:
        if self.pd_threshold_tokens < 0:
            raise ValueError(f"pd_threshold_tokens must be >= 0, got {self.pd_threshold_tokens}")
        if self.heartbeat_s <= 0 or self.worker_timeout_s <= 0:
            raise ValueError("heartbeat_s and worker_timeout_s must be positive")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

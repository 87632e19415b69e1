"""Every configuration of pdserve, in one place.

Each part owns the frozen dataclass of its settings, next to the code that reads it:
- `EngineConfig` (engine/config.py) composes `ModelConfig`, `CacheConfig` and
  `SchedulerConfig`: what one engine loads, its KV pool and its scheduler;
- `TransferConfig` (kvtransfer/common.py): the KV transfer backend and its deadline;
- `WorkerConfig` (worker/config.py): a worker's role, engine, transfer and server;
- `CoordinatorConfig` (coordinator/config.py): the coordinator's server and routing.

The command line builds these (and only the command line reads the environment); each
component receives its own object, explicitly.
"""

from __future__ import annotations

from pdserve.coordinator.config import CoordinatorConfig
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.kvtransfer.common import TransferConfig
from pdserve.worker.config import WorkerConfig

__all__ = ["CacheConfig", "CoordinatorConfig", "EngineConfig", "ModelConfig",
           "SchedulerConfig", "TransferConfig", "WorkerConfig"]

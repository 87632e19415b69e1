"""One launched step's sampled tokens: kept on the device for the next step's inputs, and
copied to pinned host memory without blocking; the host waits only when it reads them.

This is what lets overlap scheduling (engine/step_pipeline.py) launch step N+1 before it
has read step N's tokens: step N+1's input ids are `LaunchedStep.token_ids` (a device
tensor the runner copies into its input buffer), and the host reads step N's tokens one
step late through `tokens()`. On CPU the "copy" is the tensor itself and nothing waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.scheduler import SchedulerOutput


@dataclass(slots=True, eq=False)
class LaunchedStep:
    """A step whose GPU work is queued. token_ids[i] is the token sampled for seq_ids[i]."""

    out: SchedulerOutput
    seq_ids: list[str]  # the chunks that sample, in chunk order
    token_ids: torch.Tensor  # [N] int64, on the step's device
    # seq id -> logprobs of its sampled token, for the rows that asked (already on the host:
    # a step with such a row was sampled synchronously)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    _host: torch.Tensor = field(init=False)  # [N] int64, pinned on CUDA
    _ready: torch.cuda.Event | None = field(init=False, default=None)  # the copy finished

    def __post_init__(self) -> None:
        assert self.token_ids.shape == (len(self.seq_ids),), "one sampled token per seq id"
        if self.token_ids.is_cuda:  # run on the step's device (the runner's device guard)
            self._host = torch.empty(self.token_ids.shape, dtype=torch.int64, pin_memory=True)
            self._host.copy_(self.token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = self.token_ids

    def tokens(self) -> dict[str, int]:
        """seq id -> sampled token; waits for this step's device-to-host copy only."""
        if self._ready is not None:
            self._ready.synchronize()
        return dict(zip(self.seq_ids, self._host.tolist(), strict=True))

"""Engine steps one after another, or overlapped: step N+1 is launched before step N's
tokens are read (overlap scheduling, as vLLM's async scheduling and SGLang's overlap
scheduler do).

One `advance()`: launch a step if none is in flight; then, with overlap on, plan and launch
the next one (`Scheduler.schedule_ahead`: its host inputs need only token counts, its input
ids are the in-flight step's sampled tokens, still on the device); then wait for the
in-flight step's tokens, apply them to the scheduler and hand the result on. The host's
work for step N (stop conditions, streaming, freeing) thus runs while the GPU runs step N+1.

Only steady decode steps of an unchanged batch overlap; any other step (prompts, arrivals,
finishes by length, preemption) is scheduled after the step before it is applied, i.e.
synchronously. At most one step is ever in flight ahead of the host: `in_flight`. Whatever
changes the batch from outside (add, abort, admit) must run while `in_flight` is None (the
engine loop runs its calls only then), so no block is freed or reserved under a step that
may still write it, except a sequence's own blocks after it ended (`schedule_ahead`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.async_output import LaunchedStep
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import Sequence

LayerHook = Callable[[int], None]


@dataclass(slots=True)
class StepResult:
    new_tokens: dict[str, int] = field(default_factory=dict)  # seq id -> token sampled this step
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # of those that asked
    finished: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0


def apply_step(scheduler: Scheduler, step: LaunchedStep) -> StepResult:
    """Wait for a launched step's tokens and apply them. new_tokens holds only the tokens
    the scheduler took: not those of sequences that ended before (an overlapped step's extra
    token) or were aborted since."""
    sampled = step.tokens()
    kept = {sid: tok for sid, tok in sampled.items() if sid in scheduler.running}
    finished = scheduler.update(step.out, sampled)
    logprobs = {sid: lp for sid, lp in step.logprobs.items() if sid in kept}
    return StepResult(new_tokens=kept, logprobs=logprobs, finished=finished,
                      num_batched_tokens=step.out.num_batched_tokens)


class StepPipeline:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, overlap: bool,
                 on_result: Callable[[SchedulerOutput, StepResult], None],
                 before_run: Callable[[SchedulerOutput], LayerHook | None] | None = None) -> None:
        """on_result sees every step's output once applied; before_run sees every step
        before it is launched and may return a per-layer hook."""
        self.scheduler, self.runner, self.overlap = scheduler, runner, overlap
        self.on_result, self.before_run = on_result, before_run
        self.in_flight: LaunchedStep | None = None
        self.num_steps = 0
        self.num_overlapped = 0  # steps launched before the previous one was applied
        self.num_discarded = 0  # tokens of sequences that had ended (or left) meanwhile

    def advance(self, may_run_ahead: bool = True) -> bool:
        """Apply one step (launching it first if none is in flight); with overlap and
        may_run_ahead, launch the step after it before waiting. False: nothing to run."""
        step = self.in_flight
        if step is None:
            if not self.scheduler.has_unfinished():
                return False
            out = self.scheduler.schedule()
            if not out.chunks:
                return False
            step = self._launch(out, None)
        self.in_flight = None
        if self.overlap and may_run_ahead:
            ahead = self.scheduler.schedule_ahead(step.out)
            if ahead is not None:
                self.in_flight = self._launch(ahead, step)
                self.num_overlapped += 1
        res = apply_step(self.scheduler, step)
        self.num_discarded += len(step.seq_ids) - len(res.new_tokens)
        self.on_result(step.out, res)
        return True

    def finish(self) -> None:
        """Apply the step in flight, if any, and launch nothing more."""
        while self.in_flight is not None:
            self.advance(may_run_ahead=False)

    def _launch(self, out: SchedulerOutput, prev: LaunchedStep | None) -> LaunchedStep:
        hook = self.before_run(out) if self.before_run else None
        self.num_steps += 1
        return self.runner.launch(out, layer_hook=hook, prev=prev)

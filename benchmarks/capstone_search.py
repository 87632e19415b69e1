"""The highest arrival rate that holds a target SLO attainment, by a bounded search.

    find_max_rate(measure, start_rate=2.0, target=0.9, max_runs=7)

`measure(rate) -> attainment` runs (or simulates) one load at `rate`. The search first
brackets: from `start_rate` it doubles while the target holds, or halves while it fails;
then it bisects (geometrically) between the highest passing and the lowest failing rate
until they are within `rel_tol` or `max_runs` measurements were made. The answer is the
highest rate measured to pass (0 if none did): a measured point, never an interpolation.

With a `guess` (a predicted max rate, e.g. the planner's from an earlier calibration), the
first step after `start_rate` goes just past it (`GUESS_MARGIN` x the guess, when the
start held) or just under it (when the start failed) instead of doubling or halving: a
guess that is right, or too high (the simulator's usual error near saturation), brackets
the max rate in two runs, where doubling from a low common start rate often ran out of
runs first; doubling, halving and geometric bisection go on from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class SearchResult:
    max_rate: float  # highest rate measured with attainment >= target (0.0: none)
    target: float
    runs: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment) in order
    bracketed: bool = False  # a failing rate above max_rate was measured
    cut: bool = False  # stopped early by the time budget (can_run said no)
    guess: float = 0.0  # the predicted max rate that steered it (0: none)
    check_tol: float = 0.0  # > 0: a plan check at guess / (1 -+ this), not a search (capstone_check)
    # a plan check's runs: the seconds of arrivals the prediction simulated (0: runs sized by
    # a request count, as simulated), and per rate the seconds its run was sized for
    # (requests / rate); a held run under SHORT_FRAC of run_s decides nothing (`verdict`)
    run_s: float = 0.0
    spans: dict[float, float] = field(default_factory=dict)

    def describe(self) -> str:
        if self.check_tol:
            return self._describe_check()
        if not self.runs:
            return "no run (cut by the time budget)"
        if self.max_rate == 0:
            return (f"no measured rate held {self.target:.0%} attainment (lowest tried "
                    f"{min(r for r, _ in self.runs):.3g} req/s)"
                    + ("; cut by the time budget" if self.cut else ""))
        bound = "" if self.bracketed else " (upper bound not reached: the search ran out of runs)"
        fail = min((r for r, a in self.runs if not a >= self.target and r > self.max_rate),
                   default=math.nan)
        tail = f", fails at {fail:.3g}" if not math.isnan(fail) else ""
        cut = "; cut by the time budget" if self.cut else ""
        guided = f"; steered by a predicted {self.guess:.3g} req/s" if self.guess else ""
        return (f"{self.max_rate:.3g} req/s holds >= {self.target:.0%}{tail}; "
                f"{len(self.runs)} runs{bound}{cut}{guided}")

    def verdict(self) -> str:
        """A plan check's (capstone_check): WITHIN; HIGH (the lower rate failed: the max
        rate m < guess/(1+tol)); LOW (the higher held: m >= guess/(1-tol)); NOISE (the lower
        failed, the higher held); NOT_RUN (a run missing); SHORT when WITHIN or LOW rests
        on a run that held after arrivals shorter than SHORT_FRAC x run_s (the lower run
        of WITHIN, the higher of LOW): a short run can hold at a rate the GPUs cannot
        sustain; a failed run decides whatever its length."""
        if len(self.runs) < 2 or any(math.isnan(a) for _, a in self.runs):
            return NOT_RUN
        (r_lo, lo), (r_hi, hi) = sorted(self.runs)[:2]
        held_lo, held_hi = lo >= self.target, hi >= self.target
        if held_lo != held_hi:
            v = WITHIN if held_lo else NOISE
        else:
            v = LOW if held_lo else HIGH
        deciding = {WITHIN: r_lo, LOW: r_hi}.get(v)
        if deciding is not None and self.spans.get(deciding, math.inf) < SHORT_FRAC * self.run_s:
            return SHORT
        return v

    def _describe_check(self) -> str:
        runs = ", ".join(f"{a:.0%} at {r:.3g}" for r, a in sorted(self.runs)) or "no run"
        tol = f"{self.check_tol:.0%}"
        what = {WITHIN: f"within {tol} of the measured max rate",
                HIGH: f"too high by more than {tol} (the lower rate failed)",
                LOW: f"too low by more than {tol} (the higher rate held)",
                NOISE: "not monotone: the lower rate failed, the higher held",
                NOT_RUN: "not decided (a run is missing)",
                SHORT: f"not decided (the run that held had under {SHORT_FRAC * self.run_s:.3g} s "
                       "of arrivals)"}[self.verdict()]
        return f"plan check: predicted {self.guess:.3g} req/s; attainment {runs}: {what}"


WITHIN, HIGH, LOW, NOISE, NOT_RUN = ("within", "predicted too high", "predicted too low",
                                     "not monotone", "not measured")
SHORT = "not decided (the run that held was short)"
SHORT_FRAC = 2 / 3  # a plan check's held run with fewer seconds of arrivals decides nothing
GUESS_MARGIN = 1.25  # a guided step lands this far past (or short of) the guess
GUESS_MAX_STEP = 16.0  # ... and at most this factor from the rate before it


def guided_step(rate: float, held: bool, guess: float) -> float:
    """The rate after `rate` toward `guess`: past it when `rate` held (at least 1.25 x
    `rate`), under it when it failed (at most `rate` / 1.25), never more than
    GUESS_MAX_STEP x away."""
    if held:
        return min(max(guess * GUESS_MARGIN, rate * GUESS_MARGIN), rate * GUESS_MAX_STEP)
    return max(min(guess / GUESS_MARGIN, rate / GUESS_MARGIN), rate / GUESS_MAX_STEP)


def find_max_rate(measure: Callable[[float], float], start_rate: float, target: float = 0.9,
                  max_runs: int = 7, rel_tol: float = 0.1, min_rate: float = 1e-3,
                  max_rate: float = 1e6,
                  can_run: Callable[[], bool] | None = None,
                  guess: float = 0.0) -> SearchResult:
    """`can_run()` (optional) is asked before every run but the first; False ends the
    search there (a time budget), with `cut` set. `guess` > 0: see the module docstring."""
    if not start_rate > 0 or max_runs < 1 or not 0 < target <= 1:
        raise ValueError("need start_rate > 0, max_runs >= 1 and 0 < target <= 1")
    res = SearchResult(0.0, target, guess=guess if guess > 0 else 0.0)
    lo, hi = 0.0, math.inf  # highest pass, lowest fail

    class _Cut(Exception):
        pass

    def probe(rate: float) -> bool:
        if res.runs and can_run is not None and not can_run():
            res.cut = True
            raise _Cut
        a = measure(rate)
        res.runs.append((rate, a))
        return a >= target  # NaN fails

    try:
        rate = start_rate
        while len(res.runs) < max_runs and math.isinf(hi):  # bracket
            held = probe(rate)
            steer = res.guess > 0 and len(res.runs) == 1
            if held:
                lo = rate
                nxt = guided_step(rate, True, res.guess) if steer else rate * 2
                if nxt > max_rate:
                    break
                rate = nxt
            else:
                hi = rate
                nxt = guided_step(rate, False, res.guess) if steer else rate / 2
                if lo > 0 or nxt < min_rate:
                    break
                rate = nxt
        if lo == 0 and not math.isinf(hi):  # everything so far failed: keep halving
            while len(res.runs) < max_runs and rate / 2 >= min_rate and lo == 0:
                rate = hi / 2 if len(res.runs) > 1 or res.guess <= 0 else \
                    guided_step(hi, False, res.guess)
                if probe(rate):
                    lo = rate
                else:
                    hi = rate
        while len(res.runs) < max_runs and lo > 0 and not math.isinf(hi) and hi / lo > 1 + rel_tol:
            mid = math.sqrt(lo * hi)
            if probe(mid):
                lo = mid
            else:
                hi = mid
    except _Cut:
        pass
    res.max_rate = lo
    res.bracketed = not math.isinf(hi)
    return res

"""The highest arrival rate that holds a target SLO attainment, by a bounded search.

    find_max_rate(measure, start_rate=2.0, target=0.9, max_runs=7)

`measure(rate) -> attainment` runs (or simulates) one load at `rate`. The search first
brackets: from `start_rate` it doubles while the target holds, or halves while it fails;
then it bisects (geometrically) between the highest passing and the lowest failing rate
until they are within `rel_tol` or `max_runs` measurements were made. The answer is the
highest rate measured to pass (0 if none did): a measured point, never an interpolation.
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

    def describe(self) -> str:
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
        return (f"{self.max_rate:.3g} req/s holds >= {self.target:.0%}{tail}; "
                f"{len(self.runs)} runs{bound}{cut}")


def find_max_rate(measure: Callable[[float], float], start_rate: float, target: float = 0.9,
                  max_runs: int = 7, rel_tol: float = 0.1, min_rate: float = 1e-3,
                  max_rate: float = 1e6,
                  can_run: Callable[[], bool] | None = None) -> SearchResult:
    """`can_run()` (optional) is asked before every run but the first; False ends the
    search there (a time budget), with `cut` set."""
    if not start_rate > 0 or max_runs < 1 or not 0 < target <= 1:
        raise ValueError("need start_rate > 0, max_runs >= 1 and 0 < target <= 1")
    res = SearchResult(0.0, target)
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
            if probe(rate):
                lo = rate
                if rate * 2 > max_rate:
                    break
                rate *= 2
            else:
                hi = rate
                if lo > 0 or rate / 2 < min_rate:
                    break
                rate /= 2
        if lo == 0 and not math.isinf(hi):  # everything so far failed: keep halving
            while len(res.runs) < max_runs and rate / 2 >= min_rate and lo == 0:
                rate = hi / 2
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

"""What a simulated run delivers: goodput, attainment and latency means over its steady
window, judged as the capstone judges a measured run (capstone_metrics.steady_rates)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.benchmarks.capstone_metrics import steady_rates

if TYPE_CHECKING:
    from pdserve.benchmarks.planner_sim import SimReq


def sim_summary(reqs: Sequence[SimReq], slos: dict[str, float], warmup: float = 0.1,
                cooldown: float = 0.1, horizon_s: float = math.inf) -> tuple[float, float]:
    """(attainment, goodput req/s) with the capstone's definitions (capstone_metrics):
    attainment over the requests between the first `warmup` and the last `cooldown`
    fraction of arrivals, a request cut at `horizon_s` judged on what was seen (no first
    token: a miss); goodput = finished SLO-meeting requests finishing within those
    requests' arrival span, per second of it (capstone_metrics.steady_rates)."""
    order = sorted(reqs, key=lambda r: r.arrival)
    lo, hi = math.floor(len(order) * warmup), len(order) - math.floor(len(order) * cooldown)
    sel = order[lo:hi] if hi > lo else order
    if not sel:
        return math.nan, math.nan

    def ok(r: SimReq) -> bool:
        if math.isnan(r.first):
            return False
        if math.isnan(r.end):  # cut after its first token: TPOT so far
            tpot = (r.last - r.first) / (r.generated - 1) * 1e3 if r.generated > 1 else math.nan
            vals = {"ttft": r.ttft_ms(), "tpot": tpot, "e2el": (horizon_s - r.arrival) * 1e3}
        else:
            vals = {"ttft": r.ttft_ms(), "tpot": r.tpot_ms(), "e2el": r.e2el_ms()}
        return all(math.isnan(vals[k]) or vals[k] <= v for k, v in slos.items())
    good = sum(ok(r) for r in sel)
    _, goodput = steady_rates(sel[0].arrival, sel[-1].arrival,
                              ((r.end, ok(r)) for r in reqs if not math.isnan(r.end)))
    return good / len(sel), goodput


def sim_means(reqs: Sequence[SimReq], warmup: float = 0.1,
              cooldown: float = 0.1) -> dict[str, float]:
    """Mean TTFT, TPOT, KV transfer (token 0 made to the KV landing) and prefill time in ms of the
    windowed requests that finished, as capstone_metrics.summarize computes them: a
    prefill time is the prefill worker's, from the start of the step with the prompt's
    first chunk to the end of the step with its last (worker/core.py `timings`); a request
    prefilled on its decode worker counts 0, as its worker reports none."""
    order = sorted(reqs, key=lambda r: r.arrival)
    lo, hi = math.floor(len(order) * warmup), len(order) - math.floor(len(order) * cooldown)
    done = [r for r in (order[lo:hi] if hi > lo else order) if not math.isnan(r.end)]

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan
    return {"ttft": mean([r.ttft_ms() for r in done]), "tpot": mean([r.tpot_ms() for r in done]),
            "transfer": mean([(r.landed - r.made) * 1e3 for r in done]),
            "prefill": mean([0.0 if r.local else (r.made - r.scheduled) * 1e3 for r in done
                             if r.local or r.dec is not None])}


def sim_attainment(reqs: Sequence[SimReq], slos: dict[str, float], warmup: float = 0.1,
                   cooldown: float = 0.1) -> float:
    """Fraction of the windowed requests (by arrival) that meet every SLO (ms)."""
    return sim_summary(reqs, slos, warmup, cooldown)[0]

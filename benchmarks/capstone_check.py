"""The planner checked out of sample: `pdserve bench capstone --plan-check-from RUN`.

The planner, calibrated on an earlier run (RUN: a capstone run directory or its
calibration.json), predicts each setup and workload's max rate p (the highest arrival rate
holding the attainment target). Instead of searching, the capstone then measures two rates:

    p / (1 + tol)   and   p / (1 - tol)        (tol = CHECK_TOL = 15%)

If attainment is monotone in the rate, the measured max rate m satisfies p/(1+tol) <= m
when the first holds the target, and m < p/(1-tol) when the second does not. Both together
say |p - m| <= tol * m: the prediction is within 15% of the measured max rate, measured on
GPUs the calibration never saw, not fitted on the same runs. Either run on the wrong side
says in which direction it is off by more (`verdict`).

A run that held the target tells something only if it sent long enough for a queue to
grow: the prediction simulates runs of `check_run_s` seconds of arrivals (PREDICTED_RUN_S
at most), and a run the time budget cut to a few seconds can hold at a rate its GPUs
cannot sustain. A verdict that rests on a held run sized for less than 2/3 of that is
`SHORT` (SearchResult.verdict); a failed run decides whatever its length. The capstone
sizes a check's runs to `check_run_s` and no less than those 2/3 (capstone_sweep).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence

from pdserve.benchmarks import plotting
from pdserve.benchmarks.capstone_search import HIGH, LOW, NOISE, SHORT_FRAC, WITHIN, SearchResult

CHECK_TOL = 0.15  # the planner's goodput is to be within 15% of the measured one
EDGE = 0.03  # a miss decided by an attainment this close to the target is a knife edge
PREDICTED_RUN_S = 15.0  # seconds of arrivals each simulated run has at most (capstone_guess)


def check_run_s(run_duration_s: float) -> float:
    """Seconds of arrivals a check's predictions simulate, and its runs are sized for, with
    --run-duration `run_duration_s`; 0 without one (runs of --num-requests requests)."""
    return min(run_duration_s, PREDICTED_RUN_S) if run_duration_s else 0.0


def spans(runs: Sequence) -> dict[float, float]:
    """{rate: seconds of arrivals its run was sized for (requests / rate)} of capstone runs
    (capstone_report.Run); the last arrival is random and comes about one gap earlier."""
    return {r.rate: r.summary.get("num_prompts", 0) / r.rate for r in runs
            if r.rate > 0 and not math.isinf(r.rate)}


def add_run_lengths(search: SearchResult, runs: Sequence, run_duration_s: float) -> None:
    """Give a check's SearchResult what its verdict weighs held runs by: the length its
    predictions simulated (`check_run_s`) and each run's `spans`."""
    search.run_s, search.spans = check_run_s(run_duration_s), spans(runs)


def add_argument(group) -> None:
    group.add_argument("--plan-check-from", metavar="RUN",
                       help="check the planner out of sample instead of searching: from "
                            "RUN's calibration (a capstone run directory or calibration.json "
                            "of an earlier run on the same model and GPUs) it predicts each "
                            "setup and workload's max rate p, and the run measures attainment "
                            "at p/1.15 and p/0.85 only; the report's 'Planner check' says for "
                            "how many the measured max rate is within 15%% of p")


def check_args(args) -> str | None:
    path = getattr(args, "plan_check_from", None)
    if not path:
        return None
    if not os.path.exists(path):
        return f"--plan-check-from {path}: no such file or directory"
    if args.concurrency or args.base_url:
        return ("--plan-check-from checks pdserve setups at arrival rates: not with "
                "--concurrency or --base-url")
    return None


def check_rates(predicted: float, tol: float = CHECK_TOL) -> tuple[float, float]:
    """The two rates that bracket `predicted` to within `tol` of the measured max rate."""
    if not predicted > 0 or not 0 < tol < 1:
        raise ValueError(f"need a predicted rate > 0 and 0 < tol < 1, got {predicted}, {tol}")
    return predicted / (1 + tol), predicted / (1 - tol)


def run_check(measure: Callable[[float], float], predicted: float, target: float,
              tol: float = CHECK_TOL, can_run: Callable[[], bool] | None = None) -> SearchResult:
    """Measure attainment at both `check_rates` (lower first); a SearchResult whose
    max_rate is the higher rate that held (0: none), `guess` the prediction, `check_tol`
    the tolerance. `can_run()` False before the second run: cut there."""
    res = SearchResult(0.0, target, guess=predicted, check_tol=tol)
    for i, rate in enumerate(check_rates(predicted, tol)):
        if i and can_run is not None and not can_run():
            res.cut = True
            break
        a = measure(rate)
        res.runs.append((rate, a))
        if a >= target:
            res.max_rate = max(res.max_rate, rate)
    res.bracketed = any(not a >= target and r > res.max_rate for r, a in res.runs)
    return res


def source(path: str) -> str:
    """`path` as the report names it: with the device, commit and date of the run it was
    calibrated on, where its calibration.json records them."""
    cal = os.path.join(path, "calibration.json") if os.path.isdir(path) else path
    try:
        with open(cal) as f:
            meta = json.load(f).get("meta", {})
    except (OSError, ValueError):
        meta = {}
    said = [f"{k} {meta[k]}" for k in ("device", "commit", "date") if meta.get(k)]
    name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
    return f"the calibration of {name}" + (f" ({', '.join(said)})" if said else "")


def report_lines(rows: Sequence[tuple[str, str, SearchResult]], source: str,
                 busy: Callable[[str, str, float], float] | None = None) -> list[str]:
    """The report's section: one row per (setup, workload, check) and the count within;
    with `busy` (setup, workload, rate -> the share of the host path's time that rate
    takes at the run's relay probe), a column host_path_busy at the predicted rate."""
    if not rows:
        return []
    table = []
    for setup, wname, s in rows:
        runs = sorted(s.runs) + [(math.nan, math.nan)] * (2 - len(s.runs))
        table.append({"setup": setup, "workload": wname, "predicted_max_rate": s.guess,
                      "rate_low": runs[0][0], "attainment_low": runs[0][1],
                      "span_low_s": s.spans.get(runs[0][0], math.nan),
                      "rate_high": runs[1][0], "attainment_high": runs[1][1],
                      "span_high_s": s.spans.get(runs[1][0], math.nan),
                      **({"host_path_busy": busy(setup, wname, s.guess)} if busy else {}),
                      "verdict": s.verdict()})
    n_in = sum(r["verdict"] == WITHIN for r in table)
    tol, target = rows[0][2].check_tol, rows[0][2].target
    run_s = max(s.run_s for _, _, s in rows)
    missed = [(r, deciding(s)) for r, (_, _, s) in zip(table, rows) if r["verdict"] != WITHIN]
    edges = sum(1 for _, runs in missed if runs and all(abs(a - target) < EDGE for _, a in runs))
    return ["### Planner check (out of sample)", "",
            f"Predicted from {source}, before this run measured anything. For each "
            f"prediction p the run measured attainment at p/{1 + tol:g} and p/{1 - tol:g}: "
            f"when the first holds the target and the second does not, the measured max "
            f"rate m lies in [p/{1 + tol:g}, p/{1 - tol:g}), so |p - m| <= {tol:.0%} of m "
            "(attainment taken as monotone in the rate)."
            + (f" span_*_s: the seconds of arrivals each run was sized for (requests / "
               f"rate); a verdict resting on a run that held with under {SHORT_FRAC * run_s:.3g}"
               f" s is not decided (the predictions simulated {run_s:.3g} s: a shorter run "
               "can hold at a rate the GPUs cannot sustain)." if run_s else "")
            + (" host_path_busy: the share of the host path's time (one coordinator and its "
               "load generator, a message per token) the predicted rate takes at this run's "
               "relay probe; near 1 the host path, not the GPUs, sets the prediction, and the "
               "probe repeated only to about 15% between calls on one host "
               "(docs/capstone.md, Session 14)." if busy else ""), "",
            plotting.markdown_table(table, floatfmt=".3g"), "",
            f"**{n_in} of {len(table)} predictions within {tol:.0%}** of the measured max "
            "rate." + ("" if n_in == len(table) else " Outside: " + "; ".join(
                f"{r['setup']} {r['workload']} ({r['verdict']}"
                + "".join(f"{', ' if i else ': '}{a:.3g} at {rate:.3g} req/s"
                          for i, (rate, a) in enumerate(runs)) + ")"
                for r, runs in missed) + "."
                + (f" {edges} of these {len(missed)} rest on an attainment within {EDGE:g} of "
                   f"the {target:.0%} target: a knife edge that one run per rate cannot "
                   "decide." if edges else "")), ""]


def deciding(s: SearchResult) -> list[tuple[float, float]]:
    """The runs that put a check outside: the higher one that held (too low), the lower one
    that failed (too high), both (not monotone); none when a run is missing."""
    v = s.verdict()
    if v not in (HIGH, LOW, NOISE):
        return []
    lo, hi = sorted(s.runs)[:2]
    return {HIGH: [lo], LOW: [hi], NOISE: [lo, hi]}[v]

"""The questions a capstone report answers, each computed from the measured numbers:
is the KV transfer time linear in input length and what sets its bandwidth; when does P/D
improve TTFT, ITL and goodput over colocated (per workload, under the tight TPOT SLO and a
loose one); how busy each pool's GPU was; what conditional disaggregation did. Every
sentence carries the numbers it rests on; none is written in advance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.benchmarks.capstone_metrics import Window, attainment
from pdserve.benchmarks.capstone_report import Context, SetupResult, gpu_summary

LOOSE_TPOT_FACTOR = 4.0  # "loose TPOT": the SLO's TPOT times this


def linear_fit(pts: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R^2); NaNs with fewer than 3 points."""
    n = len(pts)
    if n < 3:
        return math.nan, math.nan, math.nan
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return my, 0.0, math.nan
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - a - b * x) ** 2 for x, y in pts)
    return a, b, (1 - ss_res / ss_tot) if ss_tot > 0 else math.nan


def _runs_by(setups, wname):
    return [(s, s.by_workload[wname]) for s in setups if wname in s.by_workload
            and s.by_workload[wname].runs]


def best_rate(w, slos: dict[str, float], target: float, window: Window,
              run_slos: dict[str, float] | None = None) -> float:
    """The highest measured rate whose runs met `slos` at >= target (0 if none). A run
    without per-request data (re-rendered from results.json) has only its attainment
    under `run_slos`, the run's own SLOs: under other SLOs the answer is NaN."""
    best = 0.0
    for r in w.runs:
        if r.results:
            att = attainment(r.results, slos, window)
        elif slos == run_slos:
            att = r.summary.get("slo_attainment", math.nan)
        else:
            return math.nan
        if att >= target:
            best = max(best, r.rate)
    return best


def pd_vs_colocated_lines(setups: Sequence[SetupResult], wname: str, ctx: Context) -> list[str]:
    """TTFT, ITL and goodput of the best P/D setup against the best colocated one, and how
    the answer changes between the tight TPOT SLO and a loose one."""
    have = _runs_by(setups, wname)
    pd = [(s, w) for s, w in have if s.kind == "P/D"]
    co = [(s, w) for s, w in have if s.kind == "colocated"]
    if not pd or not co:
        return []
    tight = dict(ctx.slos)
    loose = dict(tight, tpot=tight.get("tpot", 50.0) * LOOSE_TPOT_FACTOR)
    out = []
    for name, slos in (("tight", tight), ("loose", loose)):
        rate = lambda sw, slos=slos: best_rate(sw[1], slos, ctx.target, ctx.window,  # noqa: E731
                                               ctx.slos)
        if any(math.isnan(rate(sw)) for sw in pd + co):
            out.append(f"- goodput with {name} TPOT (<= {slos.get('tpot', math.nan):g} ms): "
                       "not known (needs per-request data, which this run did not record)")
            continue
        bp, bc = max(pd, key=rate), max(co, key=rate)
        rp, rc = rate(bp), rate(bc)
        who = ("P/D" if rp > 1.1 * rc else "colocated" if rc > 1.1 * rp else "neither")
        out.append(f"- goodput with {name} TPOT (<= {slos.get('tpot', math.nan):g} ms): "
                   f"{bp[0].setup} holds {rp:.3g} req/s, {bc[0].setup} {rc:.3g} req/s at >= "
                   f"{ctx.target:.0%} attainment (highest measured rate): {who} wins"
                   + ("" if who == "neither" else f" ({max(rp, rc) / max(min(rp, rc), 1e-9):.2g}x)"
                      if min(rp, rc) > 0 else ""))
    bp, bc = pd[0], co[0]
    for rate in sorted({r.rate for r in bp[1].runs} & {r.rate for r in bc[1].runs}):
        a, b = bp[1].at_rate(rate).summary, bc[1].at_rate(rate).summary
        out.append(
            f"- at {rate:.3g} req/s: TTFT p90 {a['p90_ttft_ms']:.4g} ms ({bp[0].setup}) vs "
            f"{b['p90_ttft_ms']:.4g} ms ({bc[0].setup}): P/D "
            f"{'improves' if a['p90_ttft_ms'] < b['p90_ttft_ms'] else 'worsens'} TTFT; "
            f"ITL p99 {a['p99_itl_ms']:.4g} vs {b['p99_itl_ms']:.4g} ms: P/D "
            f"{'improves' if a['p99_itl_ms'] < b['p99_itl_ms'] else 'worsens'} ITL; "
            f"attainment {a['slo_attainment']:.0%} vs {b['slo_attainment']:.0%}")
    return out


def conditional_lines(setups: Sequence[SetupResult], wname: str, ctx: Context) -> list[str]:
    out = []
    for s, w in _runs_by(setups, wname):
        if s.kind != "conditional":
            continue
        fr = [r.summary.get("local_prefill_fraction", math.nan) for r in w.runs]
        fr = [f for f in fr if not math.isnan(f)]
        base = next((b for b, bw in _runs_by(setups, wname)
                     if b.kind == "P/D" and b.setup == s.setup.split("-cond")[0]), None)
        tail = ""
        if base is not None:
            rb = best_rate(base.by_workload[wname], ctx.slos, ctx.target, ctx.window, ctx.slos)
            rs = best_rate(w, ctx.slos, ctx.target, ctx.window, ctx.slos)
            tail = f"; holds {rs:.3g} req/s against {rb:.3g} for {base.setup} (always P/D)"
        share = f"{sum(fr) / len(fr):.0%}" if fr else "an unknown share"
        out.append(f"- conditional {s.setup}: {share} of requests were prefilled on their "
                   f"decode worker (no transfer){tail}")
    return out


def gpu_lines(setups: Sequence[SetupResult]) -> list[str]:
    rows = [r for s in setups for r in gpu_summary(s)]
    if not rows:
        notes = "; ".join(dict.fromkeys(s.gpu_note for s in setups if s.gpu_note))
        return [f"- GPU busy per pool: {notes or 'not measured (no samples)'}"]
    by_setup: dict[str, list[str]] = {}
    for r in rows:
        by_setup.setdefault(r["setup"], []).append(
            f"{r['pool']} GPU{'s' if ',' in r['gpus'] else ''} {r['gpus']} "
            f"{r['mean_util_pct']:.0f}%")
    return ["- GPU busy per pool (mean of the samples over the whole setup, a kernel running "
            "= busy; not SM occupancy): "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_setup.items())]


def findings(setups: Sequence[SetupResult], ctx: Context) -> list[str]:
    names = list(dict.fromkeys(w for s in setups for w in s.by_workload))
    from pdserve.benchmarks.capstone_throughput import throughput_lines
    from pdserve.benchmarks.capstone_transfer import transfer_lines

    out = ["### Transfer", *transfer_lines(setups, ctx), "", "### GPU utilization per pool",
           *gpu_lines(setups), "", "### Output token throughput", *throughput_lines(setups), ""]
    for wname in names:
        lines = pd_vs_colocated_lines(setups, wname, ctx) + conditional_lines(setups, wname, ctx)
        if lines:
            out += [f"### P/D against colocated: {wname}", *lines, ""]
    return out

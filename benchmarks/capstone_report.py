"""What a capstone run measured, and its report: `results.json` (run summaries under
`vllm bench serve` field names), `calibration.json` (for `pdserve plan`) and `report.md`
(tables, plots, and conclusions generated from the measured numbers).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import plotting
from pdserve.benchmarks.capstone_metrics import RequestResult, Window, meets
from pdserve.benchmarks.capstone_mixed import steady
from pdserve.benchmarks.capstone_relay import fit_relay
from pdserve.benchmarks.capstone_relay_probe import probed_relay
from pdserve.benchmarks.capstone_search import SearchResult
from pdserve.benchmarks.capstone_steps import prompt_key, warm_counts


@dataclass(slots=True)
class Run:
    rate: float  # req/s asked for (inf in fixed-concurrency mode)
    concurrency: int  # 0: arrival-rate mode
    results: list[RequestResult]
    summary: dict


@dataclass(slots=True)
class WorkloadRuns:
    workload: str
    describe: str
    runs: list[Run] = field(default_factory=list)
    search: SearchResult | None = None

    def at_rate(self, rate: float) -> Run | None:
        return next((r for r in self.runs if r.rate == rate), self.runs[0] if self.runs else None)


@dataclass(slots=True)
class SetupResult:
    setup: str  # "1P1D", "2both", "external"
    workers: str  # "prefill@cuda:0, decode@cuda:1"
    pools: dict[str, list[int]] = field(default_factory=dict)  # role -> GPU indices
    by_workload: dict[str, WorkloadRuns] = field(default_factory=dict)
    gpu: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    gpu_note: str = ""
    gpu_rows: list[dict] = field(default_factory=list)  # gpu_summary as recorded (re-render)
    heartbeats: object = None  # capstone_heartbeats.HeartbeatRecorder of the setup, if any

    @property
    def kind(self) -> str:
        """"P/D", "colocated", "conditional", or "external" (not a setup name)."""
        from pdserve.benchmarks.planner_setups import parse_setup

        try:
            return parse_setup(self.setup).kind
        except ValueError:
            return "external"


@dataclass(slots=True)
class Context:
    """Settings the report states (from the command line)."""

    slos: dict[str, float]
    target: float
    window: Window
    burstiness: float
    seed: int
    start_rate: float
    num_prompts: int
    meta: dict[str, str]
    max_runs: int = 6
    rel_tol: float = 0.15
    run_duration_s: float = 0.0  # --run-duration (0: a fixed request count)
    budget_s: float = 0.0  # --budget-s (0: none)
    transfer_step: dict | None = None  # the dedicated transfer step (capstone_transfer_step)
    relay_probe: dict | None = None  # the host path below its knee (capstone_relay_probe)

    def run_sizes(self) -> str:
        if self.budget_s:
            return (f"runs sized to a {self.budget_s:g} s budget (sending for up to "
                    f"{self.run_duration_s or 'its share of'} s, at least {self.num_prompts} "
                    "requests)")
        if self.run_duration_s:
            return (f"{self.run_duration_s:g} s of arrivals per run (at least "
                    f"{self.num_prompts} requests)")
        return f"{self.num_prompts} requests per run"


RUN_FIELDS = ["setup", "workload", "request_rate", "max_concurrency", "completed", "failed",
              "request_throughput", "request_goodput", "steady_throughput", "steady_goodput",
              "slo_attainment", "local_prefill_fraction", "output_throughput",
              "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms",
              "mean_e2el_ms", "mean_transfer_ms"]


def run_row(s: SetupResult, w: WorkloadRuns, run: Run, ctx: Context) -> dict:
    return {"setup": s.setup, "workload": w.workload,
            "request_rate": run.rate if not math.isinf(run.rate) else "inf",
            "burstiness": ctx.burstiness, "max_concurrency": run.concurrency or None,
            **run.summary}


def miss_counts(results: Sequence[RequestResult], slos: dict[str, float],
                window: Window) -> dict[str, int]:
    """How many windowed requests miss each SLO on its own (failures count for all)."""
    sel = window.select(results)
    return {k: sum(not meets(r, {k: v}) for r in sel) for k, v in slos.items()}


def gpu_summary(s: SetupResult) -> list[dict]:
    if not s.gpu and s.gpu_rows:  # re-rendered from results.json without the samples
        return list(s.gpu_rows)
    rows = []
    for role, gpus in s.pools.items():
        pts = [p for g in gpus for p in s.gpu.get(g, [])]
        if pts:
            row = {"setup": s.setup, "pool": role, "gpus": ",".join(map(str, gpus)),
                   "mean_util_pct": sum(p[1] for p in pts) / len(pts),
                   "max_mem_gib": max(p[2] for p in pts)}
            # SM clock and power (samples from runs that recorded them): a GPU capped by
            # power or heat runs its kernels slower than the profiles measured at low load
            for i, key in ((3, "sm_mhz"), (4, "power_w")):
                busy = [p[i] for p in pts if len(p) > i and p[1] >= 50 and p[i] == p[i]]
                if busy:
                    row[f"busy_mean_{key}"] = sum(busy) / len(busy)
                    row[f"busy_min_{key}" if key == "sm_mhz" else f"busy_max_{key}"] = \
                        (min if key == "sm_mhz" else max)(busy)
            rows.append(row)
    return rows


def _pd_vs_colocated(setups: Sequence[SetupResult], wname: str, ctx: Context) -> list[str]:
    have = [s for s in setups if wname in s.by_workload and s.by_workload[wname].search]
    pd = [s for s in have if s.kind == "P/D"]
    co = [s for s in have if s.kind == "colocated"]
    rate = lambda s: s.by_workload[wname].search.max_rate  # noqa: E731
    lines = [f"- highest rate at >= {ctx.target:.0%} attainment: " + ", ".join(
        f"{s.setup} {rate(s):.3g} req/s" for s in have)]
    if not pd or not co:
        return lines + ["- only one kind of setup ran: no P/D vs colocated comparison"]
    bp, bc = max(pd, key=rate), max(co, key=rate)
    rp, rc = rate(bp), rate(bc)
    for s in (s for s in have if s.kind == "conditional"):
        rs = rate(s)
        rel = "above both" if rs > max(rp, rc) else "below both" if rs < min(rp, rc) else "between"
        lines.append(f"- conditional {s.setup}: {rs:.3g} req/s, {rel} the best P/D "
                     f"({bp.setup} {rp:.3g}) and the best colocated ({bc.setup} {rc:.3g})")
    if rp > 1.1 * rc or (rp > 0 and rc == 0):
        verdict = (f"- **P/D wins** on {wname}: {bp.setup} holds {rp:.3g} req/s vs "
                   f"{rc:.3g} for {bc.setup}" + (f" ({rp / rc:.2f}x)" if rc > 0 else ""))
    elif rc > 1.1 * rp or (rc > 0 and rp == 0):
        verdict = (f"- **P/D loses** on {wname}: {bc.setup} holds {rc:.3g} req/s vs "
                   f"{rp:.3g} for {bp.setup}" + (f" ({rc / rp:.2f}x)" if rp > 0 else ""))
    else:
        verdict = (f"- **no clear winner** on {wname}: {bp.setup} {rp:.3g} vs {bc.setup} "
                   f"{rc:.3g} req/s (within 10%, about the resolution of the search)")
    lines.append(verdict)
    rp_run, rc_run = bp.by_workload[wname].at_rate(ctx.start_rate), \
        bc.by_workload[wname].at_rate(ctx.start_rate)
    if rp_run and rc_run and rp_run.rate == rc_run.rate:  # a plan check has no common rate
        a, b = rp_run.summary, rc_run.summary
        lines.append(
            f"- why, at the common rate {rp_run.rate:g} req/s: TTFT p90 {a['p90_ttft_ms']:.4g} ms "
            f"({bp.setup}) vs {b['p90_ttft_ms']:.4g} ms ({bc.setup}); ITL p99 "
            f"{a['p99_itl_ms']:.4g} vs {b['p99_itl_ms']:.4g} ms; TPOT mean "
            f"{a['mean_tpot_ms']:.4g} vs {b['mean_tpot_ms']:.4g} ms. "
            + ("P/D decodes with fewer stalls (prefills run elsewhere). "
               if a["p99_itl_ms"] < b["p99_itl_ms"] else
               "P/D does not decode more smoothly here. ")
            + ("P/D pays in TTFT (fewer GPUs prefill, and the KV transfer)."
               if a["p90_ttft_ms"] > b["p90_ttft_ms"] else "P/D's TTFT is not worse."))
        xfer, ttft = a.get("mean_transfer_ms", math.nan), a["mean_ttft_ms"]
        if not math.isnan(xfer) and ttft > 0:
            lines.append(f"- KV transfer: mean {xfer:.3g} ms per request after the prefill "
                         f"(pdserve sends token 0 first, so it delays the second token: "
                         f"{xfer / max(1e-9, a['mean_tpot_ms']):.2g} mean TPOTs; {bp.setup}'s "
                         f"mean TTFT is {ttft:.3g} ms)")
    for s in (bp, bc):
        runs = s.by_workload[wname].runs
        fails = [r for r in runs if not r.summary["slo_attainment"] >= ctx.target]
        if fails:
            worst = min(fails, key=lambda r: r.rate)
            if not worst.results:
                lines.append(f"- {s.setup} first fails at {worst.rate:.3g} req/s (which SLO it "
                             "misses: per-request data not recorded)")
                continue
            miss = miss_counts(worst.results, ctx.slos, ctx.window)
            key = max(miss, key=miss.get)
            lines.append(f"- {s.setup} first fails at {worst.rate:.3g} req/s, mostly on "
                         f"{key.upper()} ({miss[key]} of {worst.summary['measured']} requests "
                         f"miss it; misses per SLO: {miss})")
    return lines


def conclusions(setups: Sequence[SetupResult], ctx: Context, map_text: dict[str, str]) -> list[str]:
    out = []
    names = list(dict.fromkeys(w for s in setups for w in s.by_workload))
    for wname in names:
        out += [f"### {wname}", *_pd_vs_colocated(setups, wname, ctx)]
        if map_text.get(wname):
            out.append(f"- SLO map: {map_text[wname]}")
        out.append("")
    return out


def write_json(out_dir: str, setups: Sequence[SetupResult], ctx: Context,
               workloads: dict[str, dict]) -> str:
    doc = {"meta": ctx.meta, "slos": ctx.slos, "target": ctx.target, "seed": ctx.seed,
           "burstiness": ctx.burstiness, "num_prompts": ctx.num_prompts,
           "search": {"start_rate": ctx.start_rate, "max_runs": ctx.max_runs,
                      "rel_tol": ctx.rel_tol, "run_duration_s": ctx.run_duration_s,
                      "budget_s": ctx.budget_s},
           "window": {"warmup": ctx.window.warmup, "cooldown": ctx.window.cooldown,
                      "describe": ctx.window.describe()},
           "workloads": workloads, "runs": [], "setups": []}
    if ctx.transfer_step is not None:
        doc["transfer_step"] = ctx.transfer_step
    if ctx.relay_probe is not None:
        doc["relay_probe"] = ctx.relay_probe
    for s in setups:
        entry = {"setup": s.setup, "workers": s.workers, "pools": s.pools,
                 "gpu": gpu_summary(s), "gpu_note": s.gpu_note, "by_workload": {}}
        for w in s.by_workload.values():
            doc["runs"] += [run_row(s, w, r, ctx) for r in w.runs]
            # the longest run's lengths: a run of n requests used the first n of them
            first = max(w.runs, key=lambda r: len(r.results), default=None)
            entry["by_workload"][w.workload] = {
                "max_rate": w.search.max_rate if w.search else math.nan,
                "search": w.search.describe() if w.search else "fixed concurrency: no search",
                "search_runs": w.search.runs if w.search else [],
                "bracketed": bool(w.search and w.search.bracketed),
                "cut": bool(w.search and w.search.cut),
                "search_guess": w.search.guess if w.search else 0.0,
                "check_tol": w.search.check_tol if w.search else 0.0,
                "send_durations_s": [r.summary.get("send_duration_s") for r in w.runs],
                # the same for every run of this workload (one seed): only arrivals change
                "lengths": [[r.prompt_tokens, r.target_tokens or r.output_tokens]
                            for r in first.results] if first else []}
        doc["setups"].append(entry)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=lambda o: None)
    return path


def write_calibration(out_dir: str, setups: Sequence[SetupResult], ctx: Context) -> str:
    """Fitted on every run: the prefill profile on the prefill workers' steps rebuilt from
    the P/D runs (batched steps appear only under load, so every rate counts; requests
    resending an earlier run's prompts left out), the transfer
    profile on the transfers that overlapped no other (queueing is the simulator's), the
    decode step on the P/D setups' requests from their second token (colocated steps
    include prefills), over every batch size the runs reached."""
    runs, pd_runs, keyed, colocated = [], [], [], []
    for s in setups:
        for w in s.by_workload.values():
            for r in w.runs:
                runs.append(r.results)
                keyed.append((prompt_key(s.setup, w.workload, r.summary), r.results))
                if s.kind == "P/D":
                    pd_runs.append(r.results)
                # colocated runs that kept up only: past saturation the client's token times
                # lag the steps (a step rebuilt from them is not the worker's)
                if s.kind == "colocated" and steady(r.summary, ctx.slos, ctx.target):
                    colocated.append(len(runs) - 1)
    warm = warm_counts(keyed)
    cal = calib.fit(runs, meta=ctx.meta, decode_runs=pd_runs or runs, warm=warm,
                    mixed_runs=[(runs[i], warm[i]) for i in colocated])
    # from the records written (requests.json.gz: heartbeats); then the decode step without
    # the P/D runs in which the relay was saturated, and the mixed step on it
    if fit_relay(cal, out_dir) and calib.fit_decode_unsaturated(cal, out_dir, always=False):
        calib.fit_mixed(cal, [(runs[i], warm[i]) for i in colocated])
    cal.meta.setdefault("decode_left_out", "0")
    probed_relay(cal, ctx.relay_probe)
    return cal.save(os.path.join(out_dir, "calibration.json"))


def write_markdown(out_dir: str, setups: Sequence[SetupResult], ctx: Context,
                   workloads: dict[str, dict], pngs: dict[str, str], map_text: dict[str, str],
                   plan_lines: Sequence[str] = (), answers: Sequence[str] = ()) -> str:
    rows = [dict(run_row(s, w, r, ctx)) for s in setups for w in s.by_workload.values()
            for r in w.runs]
    L = ["# Capstone: when does disaggregation help?", ""]
    L += [f"- {k}: {v}" for k, v in ctx.meta.items()] + [""]
    L += ["## Setup", ""]
    L += [f"- {s.setup}: {s.workers}" for s in setups]
    L += ["", f"SLOs (ms): {ctx.slos}; attainment target {ctx.target:.0%}; arrivals gamma "
          f"with burstiness {ctx.burstiness:g} (1 = Poisson); {ctx.run_sizes()}; "
          f"seed {ctx.seed}.", "", "## Workloads", ""]
    L += [f"- {n}: {w['describe']}" for n, w in workloads.items()]
    L += ["", "## Measurement window", "", f"Measured: {ctx.window.describe()}. "
          "steady_throughput and steady_goodput (the goodput plot, the planner validation): "
          "requests (meeting every SLO) finishing within the send span of the measured "
          "requests, per second of that span: the offered rate while the server keeps up, "
          "its service rate once it saturates.", ""]
    L += ["## Results", "", plotting.markdown_table(rows, RUN_FIELDS, floatfmt=".4g"), ""]
    L += ["## Max rate at target attainment", ""]
    for s in setups:
        for w in s.by_workload.values():
            L.append(f"- {s.setup} / {w.workload}: "
                     + (w.search.describe() if w.search else "fixed concurrency: no search"))
    L += ["", "## Where P/D wins and loses", "",
          "(Generated from the numbers above; the search resolution is about 10%.)", ""]
    L += conclusions(setups, ctx, map_text)
    if answers:
        L += ["## The questions, answered from the measurements", "", *answers]
    L += ["## Plots", ""] + [f"![{k}]({os.path.relpath(v, out_dir)})" for k, v in pngs.items()] + [""]
    L += ["## GPU utilization", ""]
    gpu_rows = [r for s in setups for r in gpu_summary(s)]
    if gpu_rows:
        L.append(plotting.markdown_table(gpu_rows, floatfmt=".3g"))
    else:
        L.append("Not measured: " + "; ".join(dict.fromkeys(s.gpu_note for s in setups
                                                             if s.gpu_note)))
    L += ["", "## Calibration and planner", "",
          "calibration.json holds the fitted profiles (format in "
          "benchmarks/capstone_calibration.py); check it with "
          f"`pdserve plan --validate {out_dir}`.", *plan_lines, ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return path

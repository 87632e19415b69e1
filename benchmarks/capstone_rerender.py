"""Re-render a capstone report without a GPU: `pdserve bench capstone --report-from DIR
[--out DIR2]` reads what the run recorded and writes report.md, the plots, the planner's
validation and extrapolation again (with today's code: a fixed simulator or report applies
to an old run).

What it reads: `results.json` (settings, every run's summary, the search, the request
lengths, GPU summaries, the dedicated transfer step's rows when the run made it), `calibration.json`, and `requests.json.gz` when the run wrote it
(every request's send time, chunk timeline and server timings per run, the heartbeats
the coordinator received during each run (capstone_heartbeats.py; runs before branch hb
did not record them), and the GPU samples; runs before it existed did not record them). Without `requests.json.gz` the
sections that need per-request data (latency CDFs, SLO map, transfer scatter, GPU trace,
misses per SLO, the loose-TPOT goodput) say so, and PNGs already in DIR2 are linked as
the run drew them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys

from pdserve.benchmarks import capstone_report as report
from pdserve.benchmarks.capstone_check import add_run_lengths
from pdserve.benchmarks.capstone_metrics import RequestResult, Window
from pdserve.benchmarks.capstone_records import NAMES as RECORD_NAMES
from pdserve.benchmarks.capstone_records import read_records, records_path
from pdserve.benchmarks.capstone_search import SearchResult

REQUESTS_FILE = "requests.json.gz"


def run_key(setup: str, workload: str, rate: float, concurrency: int) -> str:
    return f"{setup}|{workload}|{rate!r}|{concurrency}"


def write_records(out: str, setups, ctx: report.Context, wls: list) -> list[str]:
    """results.json and requests.json.gz: after every setup and with the report, so a sweep
    cut short (killed, or its report failed) keeps what it measured for --report-from."""
    workloads = {wl.name: {"describe": wl.describe, "params": wl.params} for wl, _ in wls}
    os.makedirs(out, exist_ok=True)
    return [report.write_json(out, setups, ctx, workloads), write_requests(out, setups)]


def write_requests(out_dir: str, setups) -> str:
    """Every run's per-request data, its workers' heartbeats as the coordinator received
    them (capstone_heartbeats, when recorded) and every setup's GPU samples, gzipped JSON.
    Written after each setup too (benchmarks/capstone.py), so a sweep cut short keeps them."""
    from pdserve.benchmarks.capstone_heartbeats import run_record

    doc: dict = {"runs": {}, "gpu": {}, "heartbeats": {}}
    for s in setups:
        doc["gpu"][s.setup] = {str(g): pts for g, pts in s.gpu.items()}
        hb = s.heartbeats
        for w in s.by_workload.values():
            for r in w.runs:
                t0 = min((x.t_send for x in r.results), default=0.0)
                key = run_key(s.setup, w.workload, r.rate, r.concurrency)
                doc["runs"][key] = [_compact(x, t0) for x in r.results]
                if hb is not None and hb.beats:
                    t_end = max((t for x in r.results for t in [x.t_send] + [c for c, _ in
                                                                            x.chunks]),
                                default=t0)
                    doc["heartbeats"][key] = run_record(hb.beats, hb.roles, hb.period_s, t0,
                                                        t_end)
    path = os.path.join(out_dir, REQUESTS_FILE)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", compresslevel=6) as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)  # a sweep killed while writing keeps the previous file
    return path


def _compact(r: RequestResult, t0: float) -> dict:
    d = r.to_json()
    d["t_send"] = round(r.t_send - t0, 5)  # seconds from the run's first send (10 us)
    d["chunks"] = [[round(t - t0, 5), k] for t, k in r.chunks]
    return d


def load(run_dir: str) -> tuple[list[report.SetupResult], report.Context, dict, bool]:
    """(setups, context, workloads, per-request data present) from a run directory."""
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    per_req: dict = {"runs": {}, "gpu": {}}
    per_req = read_records(run_dir) or per_req
    win, search = res.get("window", {}), res.get("search", {})
    ctx = report.Context(res["slos"], res["target"],
                         Window(win.get("warmup", 0.1), win.get("cooldown", 0.1)),
                         res["burstiness"], res["seed"], search.get("start_rate", 2.0),
                         res["num_prompts"], dict(res.get("meta", {})),
                         search.get("max_runs", 6), search.get("rel_tol", 0.15),
                         search.get("run_duration_s", 0.0), search.get("budget_s", 0.0),
                         res.get("transfer_step"),  # None: a run from before the step
                         res.get("relay_probe"))
    summaries: dict[tuple[str, str], list[dict]] = {}
    for r in res["runs"]:
        summaries.setdefault((r["setup"], r["workload"]), []).append(r)
    setups = []
    for e in res["setups"]:
        s = report.SetupResult(e["setup"], e["workers"], {k: list(v) for k, v in
                                                          (e.get("pools") or {}).items()},
                               gpu_note=e.get("gpu_note", ""), gpu_rows=list(e.get("gpu") or []))
        s.gpu = {int(g): [tuple(p) for p in pts]
                 for g, pts in per_req["gpu"].get(e["setup"], {}).items()}
        for wname, w in e["by_workload"].items():
            wr = report.WorkloadRuns(wname, res.get("workloads", {}).get(wname, {})
                                     .get("describe", ""))
            for summ in summaries.get((e["setup"], wname), []):
                rate = math.inf if summ["request_rate"] == "inf" else float(summ["request_rate"])
                conc = int(summ.get("max_concurrency") or 0)
                reqs = [RequestResult.from_json(x) for x in
                        per_req["runs"].get(run_key(e["setup"], wname, rate, conc), [])]
                wr.runs.append(report.Run(rate, conc, reqs, summ))
            if w.get("search_runs") or w.get("check_tol"):
                wr.search = SearchResult(w["max_rate"], res["target"],
                                         [tuple(x) for x in w["search_runs"]],
                                         bool(w.get("bracketed")), bool(w.get("cut")),
                                         float(w.get("search_guess") or 0.0),
                                         float(w.get("check_tol") or 0.0))
                if wr.search.check_tol:  # the check's run lengths (SearchResult.verdict)
                    add_run_lengths(wr.search, wr.runs, float(search.get("run_duration_s") or 0.0))
            s.by_workload[wname] = wr
        setups.append(s)
    return setups, ctx, res.get("workloads", {}), bool(per_req["runs"])


def rerender(args: argparse.Namespace) -> int:
    """`--report-from DIR [--out DIR2]`: write the report again from DIR's records."""
    from pdserve.benchmarks.capstone import write_report
    from pdserve.benchmarks.capstone_workloads import parse_workload

    src = args.report_from
    try:
        setups, ctx, workloads, have_requests = load(src)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: --report-from {src}: {e}", file=sys.stderr)
        return 2
    out = args.out if args.out_given else src
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) != os.path.abspath(src):
        names = ["results.json", "calibration.json", *RECORD_NAMES]
        if not have_requests:  # PNGs that need per-request data: the run's own
            names += ["transfer.png", "gpu.png"] + [
                os.path.join(f"w{i}", f) for i in range(len(workloads))
                for f in ("cdf.png", "slo_map.png")]
        for name in names:
            if os.path.exists(os.path.join(src, name)):
                os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
                shutil.copy(os.path.join(src, name), os.path.join(out, name))
    for item in args.meta or []:
        k, _, v = item.partition("=")
        ctx.meta[k.strip()] = v.strip()
    wls = []
    for name, w in workloads.items():
        try:
            wl = parse_workload(name)
        except ValueError:  # a dataset: only its name and description are needed here
            wl = None
        wls.append((wl or argparse.Namespace(name=name, describe=w.get("describe", ""),
                                             params=w.get("params", {})), None))
    args.out = out
    note = (f"from results.json and {os.path.basename(records_path(src) or REQUESTS_FILE)}"
            if have_requests else
            f"from results.json alone: the run did not record {REQUESTS_FILE}, so sections "
            "that need per-request data say so, and those PNGs are the run's own")
    for path in write_report(args, setups, ctx, wls, rerendered=note):
        print("wrote", path)
    return 0

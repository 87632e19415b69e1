"""The planner's validation and extrapolation, as report lines (plan.py computes them)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.benchmarks import plotting
from pdserve.benchmarks.planner_setups import parse_setup

SENSITIVITY = 0.05  # +-5%: about the largest residual of the decode profile's fits


def mean_abs_error(rows: Sequence[dict]) -> float:
    errs = [abs(r["error"]) for r in rows if not math.isnan(r["error"])]
    return sum(errs) / len(errs) if errs else math.nan


def validation_lines(per_run: Sequence[dict], per_search: Sequence[dict],
                     sensitivity: float = SENSITIVITY) -> list[str]:
    """Markdown: both tables, the mean absolute errors and the knife edges."""

    cols = [c for c in plotting.columns_of(per_run) if c not in ("band", "heartbeats")]
    recorded = sum(r.get("heartbeats") == "recorded" for r in per_run)
    edges = [r for r in per_run if "edge" in r.get("note", "")]
    return ["Goodput at each measured rate (same requests and arrivals, same window and time "
            f"limit, simulated). band_{sensitivity:.0%} and attainment_band_{sensitivity:.0%}: "
            f"what the simulator predicts with every profiled time (prefill, decode step, "
            f"transfer) scaled by {1 - sensitivity:g} and {1 + sensitivity:g}; note `edge`: "
            "that moves the goodput by more than 15%, so the prediction sits on a knife edge "
            "(a queue near saturation, or the SLO near most requests' latency) and its error "
            "says little about the model; `decode batch N > profiled M`: the simulation ran "
            "decode batches past the profiled range, where the decode step is extrapolated "
            "linearly. Last column: mean TTFT, TPOT, prefill and KV transfer in ms, measured "
            "vs simulated (a prefill time is the prefill worker's, first chunk's step start to "
            "token 0, 0 for a prompt prefilled on its decode worker; a measured transfer is the "
            "prefill worker's end of forward to last layer landed, a simulated one token 0 to "
            "the KV landing; the simulator leaves out the coordinator's own 10-15 ms of TTFT):",
            "", plotting.markdown_table(per_run, cols, floatfmt=".3g"), "",
            f"Mean |error| of goodput: {mean_abs_error(per_run):.1%} over {len(per_run)} runs; "
            f"{len(edges)} on a knife edge (`edge`). Heartbeats: {recorded} of {len(per_run)} "
            "runs replay the times the coordinator received each routed worker's heartbeats "
            "(recorded by the run); the others assume evenly spread phases.",
            *(["", "Max rate at target attainment (same search procedure on the simulator):",
               "", plotting.markdown_table(per_search, floatfmt=".3g"), "",
               f"Mean |error| of max rate: {mean_abs_error(per_search):.1%} over "
               f"{len(per_search)} searches."] if per_search else
              ["", "No max-rate search to compare (a plan check measures two rates per "
               "setup and workload instead: 'Planner check')."]),
            "", *within_lines(per_run)]


def within_lines(per_run: Sequence[dict], tol: float = 0.15) -> list[str]:
    """Per setup: how many runs' predicted goodput is within `tol` of the measured one, and
    the largest |error|; then every run outside it, with its note."""
    out = []
    for setup in dict.fromkeys(r["setup"] for r in per_run):
        rows = [r for r in per_run if r["setup"] == setup and not math.isnan(r["error"])]
        if not rows:
            out.append(f"- {setup}: no run with a measured goodput > 0 to compare")
            continue
        worst = max(rows, key=lambda r: abs(r["error"]))
        ok = abs(worst["error"]) <= tol
        out.append(f"- {setup}: predicted goodput within {tol:.0%} of measured in "
                   f"{sum(abs(r['error']) <= tol for r in rows)} of {len(rows)} runs "
                   f"({'every run' if ok else 'NOT every run'}); largest |error| "
                   f"{abs(worst['error']):.1%} "
                   f"({worst['workload']} at {worst['rate']:.3g} req/s: predicted "
                   f"{worst['predicted_goodput_rps']:.3g}, measured "
                   f"{worst['measured_goodput_rps']:.3g} req/s)")
    misses = [r for r in per_run if not math.isnan(r["error"]) and abs(r["error"]) > tol]
    n = sum(not math.isnan(r["error"]) for r in per_run)
    out += ["", f"Within {tol:.0%}: {n - len(misses)} of {n} runs. Outside:"
            if misses else f"Within {tol:.0%}: every one of {n} runs."]
    out += [f"- {r['setup']} {r['workload']} at {r['rate']:.3g} req/s: predicted "
            f"{r['predicted_goodput_rps']:.3g} (band {r['band'][0]:.3g}-{r['band'][1]:.3g}"
            + (", the measured value inside it" if r["band"][0] * 0.98 <= r["measured_goodput_rps"]
               <= r["band"][1] * 1.02 else "")
            + f"), measured {r['measured_goodput_rps']:.3g} req/s ({r['error']:+.0%})"
            + (f"; {r['note']}" if r.get("note") else "") for r in misses if "band" in r]
    return out


def mean_out_tokens(setups) -> dict[str, float]:
    """Mean output length asked for, per workload, over the requests a capstone run's
    setups (capstone_report.SetupResult) recorded; none for a run without them."""
    lens: dict[str, list[int]] = {}
    for s in setups:
        for w, wr in s.by_workload.items():
            lens.setdefault(w, []).extend(q.target_tokens for r in wr.runs for q in r.results)
    return {w: sum(v) / len(v) for w, v in lens.items() if v}


def host_path_busy(rate: float, out_tokens: float, setup: str, relay: dict,
                   every: int = 1) -> float:
    """The share of one relay's time (a coordinator with its clients, at `relay`'s profile:
    t_tok ms a token message, t_req_pd / t_req_local ms a request set up) that `rate` req/s
    of requests of `out_tokens` output tokens take: one message each, or with the workers
    streaming `every` tokens a message after a stream's first, about 2 + (out - 2) / every;
    a conditional setup counts as P/D."""
    local = parse_setup(setup).kind == "colocated"
    msgs = out_tokens if every <= 1 else 2 + max(0.0, out_tokens - 2) / every
    return rate * (msgs * relay["t_tok"] + relay["t_req_local" if local else "t_req_pd"]) / 1e3


def relays_needed(rate: float, out_tokens: float, setup: str, relay: dict,
                  every: int = 1) -> int:
    """How many relays carry `rate` req/s (`host_path_busy`), each busy at most 100%."""
    return max(1, math.ceil(host_path_busy(rate, out_tokens, setup, relay, every) - 1e-9))


def extrapolation_lines(per_search: Sequence[dict], gpu_counts: Sequence[int],
                        assumptions: str, relay: dict | None = None,
                        out_tokens: dict[str, float] | None = None,
                        every: int = 1) -> list[str]:
    """Goodput on N GPUs as N / g replicas of each validated g-GPU setup (its predicted and
    its measured max rate times the replicas), best first per workload and N; with the
    run's relay profile and the workloads' mean output lengths, how many coordinators that
    rate needs (`relays_needed`, with the workers' `every` tokens a message); then the
    assumptions. Replicas need no new simulation,
    so this costs nothing at 64 GPUs."""

    rows = []
    for wname in dict.fromkeys(r["workload"] for r in per_search):
        for n in gpu_counts:
            cands = []
            for r in per_search:
                g = parse_setup(r["setup"]).gpus
                if r["workload"] == wname and n % g == 0:
                    k = n // g
                    row = {"workload": wname, "gpus": n, "setup": f"{k} x {r['setup']}",
                           "predicted_goodput_rps": k * r["predicted_max_rate"],
                           "from_measured_rps": k * r["measured_max_rate"]}
                    if relay and out_tokens and wname in out_tokens:
                        row["coordinators"] = relays_needed(row["predicted_goodput_rps"],
                                                            out_tokens[wname], r["setup"], relay,
                                                            every)
                    cands.append(row)
            rows += sorted(cands, key=lambda c: -c["predicted_goodput_rps"])
    if not per_search:
        return ["No max-rate search in this run (a plan check measures two rates per setup): "
                "nothing to extrapolate from."]
    if not rows:
        return ["No setup of this run divides the GPU counts asked for."]
    need = [] if not any("coordinators" in r for r in rows) else [
        f"coordinators: how many coordinator processes (each with its own clients) the "
        f"predicted rate needs at this run's relay profile ({relay['t_tok'] * 1e3:.3g} us a "
        f"token message, {relay['t_req_pd']:.3g} ms a P/D request set up, "
        f"{relay['t_req_local']:.3g} ms a local one; one message a token, the workload's mean "
        "output length): the simulator gives every replica its own relay, a single "
        "coordinator in front of all of them would cap the rate at what one relay carries.",
        ""]
    return ["Goodput on N GPUs as N / g independent replicas of each g-GPU setup measured "
            "here (the planner's predicted max rate x replicas, and the measured one x "
            "replicas), best first:", "", plotting.markdown_table(rows, floatfmt=".3g"), "",
            *need,
            assumptions.strip() + " Replicas share no load: one larger pool would multiplex "
            "requests better, so these are lower bounds in that respect; splits that no "
            "measured setup replicates (e.g. 5P3D) need `pdserve plan --gpus N`.", ""]


# -- command line ----------------------------------------------------------------------------

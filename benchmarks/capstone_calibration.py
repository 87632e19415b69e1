"""Calibration profiles for `pdserve plan`, fitted from a capstone run's per-request data.

File format (`calibration.json`, "format": "pdserve-calibration/1"); times in ms:

    prefill_ms(T, sum_sq)   = c0 + c_token * max(0, T - knee_tokens) + c_token2 * sum_sq
                              T: prompt tokens in the step, sum_sq: attention's quadratic
                              term (a whole prompt adds its square; a chunk of n tokens
                              after s computed ones adds n (2 s + n)); knee_tokens (0 when
                              absent): below it a step costs its fixed c0 whatever its
                              tokens (launch- and host-bound), above it the forward is
                              compute-bound (capstone_steps.fit_prefill_steps);
                              mixed_c0: what short prompts add to a colocated decode
                              step (`Calibration.mixed_fixed_ms`; older files)
    mixed_ms(T)             = c0 + c_token * max(0, T - knee_tokens): what T prompt tokens
                              add to a colocated worker's decode step (capstone_mixed.py;
                              {} when no colocated run was fitted: then prefill_ms - c0 +
                              mixed_fixed_ms)
    decode_step_ms(B, ctx, sync) = c0 + c_seq * B + c_ctx_token * ctx
                              + sync * (c_sync + c_sync_seq * B)
                              B: sequences in the step, ctx: their total context tokens,
                              sync: the step could not overlap the host's work for the one
                              before (its batch changed; capstone_decode.py; older files
                              have no c_sync, c_sync_seq: 0)
    transfer_ms(bytes)      = c0 + ms_per_byte * bytes
    relay                   t_tok (ms a token message), t_req_pd, t_req_local (ms a request
                              set up): the host path's cost, coordinator to client, in
                              overload (capstone_relay.py; {} in older files: no relay)
    relay_host              the same below its knee, probed on the host (capstone_relay_probe.py)
    kv_bytes_per_token      bytes of KV one prompt token carries (all layers, K and V)
    max_batch, prefill_token_budget: a decode worker's most sequences, a prefill step's tokens
    source                  "measured" per profile, "default" when the run had no data
    meta                    the run's header, ranges fitted: decode_max_batch, prefill_max_tokens

Where the points come from (every run of the sweep, so the profiles span the loads the
runs reached): prefill from the prefill workers' steps, rebuilt from each request's
`prefill_ms` and token-0 time (`prefill_steps`: batched and chunked steps up to the token
budget; the workers expose no step times); transfer from `transfer_ms` vs `kv_bytes` of the
requests whose transfer overlapped no other on the same worker (`unqueued_transfers`; the
simulator queues transfers itself); the decode step from each P/D request's time per token
after its second token (token 0 comes from the prefill worker, before the KV transfer: its
gap is the transfer, not a decode step) against the mean number of requests decoding on the
same worker during its decode, their mean context and the share of its steps whose batch
changed (capstone_decode.py). Fits are least squares, negative coefficients clamped to 0.
A run recorded without per-request data (results.json before requests.json.gz existed)
refits the decode step from its P/D runs' summaries that held the target
(`decode_from_summaries`, `run_calibration`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pdserve.benchmarks.capstone_decode import (
    DECODE_FIT,
    SYNC_FITS,
    fit_decode_unsaturated,
    fit_runs,
)
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_mixed import fit_mixed, steady_colocated_runs
from pdserve.benchmarks.capstone_relay import fit_relay
from pdserve.benchmarks.capstone_steps import fit_prefill_steps, nonneg_lstsq, prefill_steps

FORMAT = "pdserve-calibration/1"


@dataclass(slots=True)
class Calibration:
    prefill: dict[str, float] = field(default_factory=lambda: {"c0": 5.0, "c_token": 0.05,
                                                               "c_token2": 0.0})
    decode: dict[str, float] = field(default_factory=lambda: {"c0": 8.0, "c_seq": 0.05,
                                                              "c_ctx_token": 1e-4})
    transfer: dict[str, float] = field(default_factory=lambda: {"c0": 1.0, "ms_per_byte": 1e-7})
    kv_bytes_per_token: float = 131072.0
    max_batch: int = 256
    prefill_token_budget: int = 8192
    source: dict[str, str] = field(default_factory=lambda: {"prefill": "default",
                                                            "decode": "default",
                                                            "transfer": "default"})
    meta: dict[str, str] = field(default_factory=dict)
    mixed: dict[str, float] = field(default_factory=dict)  # colocated steps (capstone_mixed)
    relay: dict[str, float] = field(default_factory=dict)  # the host path (capstone_relay)
    # the same path below its knee, measured on the host (capstone_relay_probe)
    relay_host: dict[str, float] = field(default_factory=dict)

    def prefill_ms(self, tokens: int, sum_sq: float) -> float:
        p = self.prefill
        return (p["c0"] + p["c_token"] * max(0.0, tokens - p.get("knee_tokens", 0.0))
                + p["c_token2"] * sum_sq)

    @property
    def mixed_fixed_ms(self) -> float:
        """What prompt chunks add to a decode step on top of their tokens' share (a
        colocated worker's mixed step: decode_step_ms + prefill_ms - c0 + this): the
        measured `mixed_c0` when the runs had colocated steps to fit it on, else the
        prefill's fixed cost less the smaller of both (one forward pays it once)."""
        p, d = self.prefill, self.decode
        return p.get("mixed_c0", p["c0"] - min(p["c0"], d["c0"]))

    def mixed_ms(self, tokens: int, sum_sq: float) -> float:
        """What prompt chunks of `tokens` tokens add to a colocated worker's decode step:
        the mixed profile fitted on colocated steps, else the prefill profile less its
        fixed part plus `mixed_fixed_ms`."""
        m = self.mixed
        if m:
            return m["c0"] + m["c_token"] * max(0.0, tokens - m.get("knee_tokens", 0.0)) \
                + m.get("c_token2", 0.0) * sum_sq
        return self.prefill_ms(tokens, sum_sq) - self.prefill["c0"] + self.mixed_fixed_ms

    def decode_step_ms(self, batch: int, ctx_tokens: float, sync: bool = False) -> float:
        """A decode step of `batch` sequences; `sync`: planned after the step before it was
        applied (its batch changed, or it carries a prompt: capstone_decode.py)."""
        d = self.decode
        ms = d["c0"] + d["c_seq"] * batch + d["c_ctx_token"] * ctx_tokens
        return ms + (d.get("c_sync", 0.0) + d.get("c_sync_seq", 0.0) * batch if sync else 0.0)

    def transfer_ms(self, kv_bytes: float) -> float:
        t = self.transfer
        return t["c0"] + t["ms_per_byte"] * kv_bytes

    def scaled(self, factor: float) -> Calibration:
        """Every time of every profile (prefill, decode step, transfer) times `factor`: the
        planner's sensitivity to an error of the profiles."""
        import dataclasses

        return dataclasses.replace(
            self, prefill={k: v if k == "knee_tokens" else v * factor
                           for k, v in self.prefill.items()},
            decode={k: v * factor for k, v in self.decode.items()},
            transfer={k: v * factor for k, v in self.transfer.items()},
            mixed={k: v if k == "knee_tokens" else v * factor for k, v in self.mixed.items()},
            relay={k: v * factor for k, v in self.relay.items()},
            relay_host={k: v * factor for k, v in self.relay_host.items()})

    @property
    def decode_max_batch(self) -> float:
        """The largest decode batch per worker the decode profile was fitted on (NaN:
        not recorded); past it the linear profile is an extrapolation."""
        try:
            return float(self.meta.get("decode_max_batch", "nan"))
        except ValueError:
            return math.nan

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> Calibration:
        with open(path) as f:
            d = json.load(f)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        return cls(**d)


def unqueued_transfers(results: Sequence[RequestResult]) -> list[RequestResult]:
    """The disaggregated requests of one run whose prefill and transfer (token 0 less
    `prefill_ms` to token 0 plus `transfer_ms`, on the client's clock) overlapped no other
    request's on the same decode worker or the same prefill worker: their `transfer_ms` is
    the transfer's own time, without waiting for a busy sender or receiver."""
    spans = []
    for r in results:
        sv = r.server
        if r.ok and sv.get("kv_bytes") and sv.get("transfer_ms", 0) > 0 \
                and sv.get("prefill_worker") != sv.get("decode_worker"):
            t0 = r.chunks[0][0]  # token 0: the end of the prefill forward
            spans.append((t0 - sv.get("prefill_ms", 0.0) / 1e3, t0 + sv["transfer_ms"] / 1e3, r))
    return [r for a0, a1, r in spans if all(
        b1 <= a0 or b0 >= a1 for b0, b1, o in spans if o is not r and (
            o.server.get("decode_worker") == r.server.get("decode_worker")
            or o.server.get("prefill_worker") == r.server.get("prefill_worker")))]


def decode_from_summaries(runs: Sequence[tuple[dict, int, float, float]]) -> dict[str, float]:
    """The decode step profile from run summaries, for runs recorded without per-request
    data: per run (summary, decode workers, mean input, mean output), the decode step is
    its mean TPOT less its mean KV transfer spread over the output's tokens, and the batch
    per decode worker comes from Little's law (steady throughput x decode time / workers).
    Use P/D runs in a steady state (see `run_calibration`). The result carries
    "max_batch": the largest batch among the points (the profiled range)."""
    pts = []
    for s, workers, mean_in, mean_out in runs:
        if mean_out <= 2 or workers < 1 or math.isnan(s.get("mean_tpot_ms", math.nan)):
            continue
        xfer = s.get("mean_transfer_ms", 0.0)
        step_ms = s["mean_tpot_ms"] - (0.0 if math.isnan(xfer) else xfer) / (mean_out - 1)
        batch = s["steady_throughput"] * mean_out * step_ms / 1e3 / workers
        pts.append((1.0, batch, batch * (mean_in + mean_out / 2), step_ms))
    if len(pts) < 3:
        raise ValueError("need at least 3 runs with a TPOT to fit the decode step")
    c = nonneg_lstsq(np.array([p[:3] for p in pts]), np.array([p[3] for p in pts]))
    return {"c0": c[0], "c_seq": c[1], "c_ctx_token": c[2],
            "max_batch": max(p[1] for p in pts)}


def _design(x: np.ndarray, degree: int) -> np.ndarray:
    """Columns [1, x, x^2][:degree + 1], reduced to what the data can identify: one distinct
    x fits only a slope through 0, two fit a line."""
    distinct = len(np.unique(x))
    cols = [np.ones_like(x), x, x * x][:degree + 1]
    if distinct <= 1:
        return np.stack([np.zeros_like(x), x] + [np.zeros_like(x)] * (degree - 1), 1)
    if distinct == 2:
        return np.stack(cols[:2] + [np.zeros_like(x)] * (degree - 1), 1)
    return np.stack(cols, 1)

def fit(runs: Sequence[Sequence[RequestResult]], meta: dict[str, str] | None = None,
        max_batch: int = 256, prefill_token_budget: int = 8192,
        decode_runs: Sequence[Sequence[RequestResult]] | None = None,
        warm: Sequence[int] | None = None,
        mixed_runs: Sequence[tuple[Sequence[RequestResult], int]] = ()) -> Calibration:
    """A calibration from the per-request results of several runs (P/D runs carry the
    prefill and transfer timings; decode points come from `decode_runs`, default `runs`).
    The prefill profile is fitted on the prefill workers' steps (`prefill_steps`: batched
    steps up to the token budget when the runs loaded the workers), else, when no step can
    be rebuilt, on each request's prefill time against its prompt. `warm` (per run, see
    capstone_steps.warm_counts): its first requests resend earlier prompts and may have hit
    the prefix cache, so they are left out of the prefill profile, a cold one.
    `mixed_runs` (colocated runs that held the target, each with its warm count): the
    mixed profile (`capstone_mixed.fit_mixed`), once the decode step is fitted. The
    calibration's meta records the ranges the profiles were fitted on (decode_max_batch,
    prefill_max_tokens)."""
    cal = Calibration(max_batch=max_batch, prefill_token_budget=prefill_token_budget,
                      meta={**(meta or {}), "decode_fit": "token1"})
    reqs = [r for run in runs for r in run if r.ok]
    cal.meta["prefill_cold"] = "1" if warm is not None else "0"  # cache hits left out
    warm = list(warm or [0] * len(runs))
    steps = [s for run, n in zip(runs, warm) for s in prefill_steps(run, prefill_token_budget, n)]
    cold = [r for run, n in zip(runs, warm)
            for r in sorted(run, key=lambda x: x.t_send)[n:] if r.ok]
    pre = [(r.prompt_tokens, r.server["prefill_ms"]) for r in cold
           if r.server.get("prefill_ms", 0) > 0]
    if len(steps) >= 3 and len({t for t, _, _ in steps}) >= 2:
        cal.prefill, dropped = fit_prefill_steps(steps)
        cal.meta["prefill_fit"] = "steps"
        cal.meta["prefill_max_tokens"] = str(max(t for t, _, _ in steps))
        batched = sum(1 for t, _, _ in steps if t > max(p for p, _ in pre or [(0, 0)]))
        cal.source["prefill"] = (f"measured ({len(steps)} prefill steps rebuilt from "
                                 f"{len(pre)} requests, up to {cal.meta['prefill_max_tokens']} "
                                 f"tokens, {batched} longer than any one prompt; {dropped} "
                                 "taking over 3x or under 1/3 of the fit left out"
                                 + (f"; {sum(warm)} requests resending an earlier run's "
                                    "prompts (prefix-cache hits) left out" if any(warm) else "")
                                 + ")")
    elif len(pre) >= 3:
        t = np.array([p[0] for p in pre], dtype=float)
        c = nonneg_lstsq(_design(t, 2), np.array([p[1] for p in pre]))
        cal.prefill = {"c0": c[0], "c_token": c[1], "c_token2": c[2]}
        cal.source["prefill"] = f"measured ({len(pre)} requests)"
    xfer = [(r.server["kv_bytes"], r.server["transfer_ms"]) for run in runs
            for r in unqueued_transfers(run)]
    queued = len(xfer) < 3  # too few alone: every transfer, queueing included
    if queued:
        xfer = [(r.server["kv_bytes"], r.server["transfer_ms"]) for r in reqs
                if r.server.get("kv_bytes", 0) > 0 and r.server.get("transfer_ms", 0) > 0]
    if len(xfer) >= 3:
        b = np.array([p[0] for p in xfer], dtype=float)
        c = nonneg_lstsq(_design(b, 1), np.array([p[1] for p in xfer]))
        cal.transfer = {"c0": c[0], "ms_per_byte": c[1]}
        cal.kv_bytes_per_token = float(np.median([r.server["kv_bytes"] / r.prompt_tokens
                                                  for r in reqs if r.server.get("kv_bytes")]))
        cal.source["transfer"] = (f"measured ({len(xfer)} requests"
                                  + (", queueing included)" if queued else
                                     " whose transfer overlapped no other)"))
    fit_runs(cal, runs if decode_runs is None else decode_runs)
    fit_mixed(cal, mixed_runs)
    return cal


def samples(runs: Sequence[Sequence[RequestResult]]) -> dict[str, list[list[float]]]:
    """The raw points behind a fit (for plots): prefill [tokens, ms], transfer [bytes, ms]."""
    reqs = [r for run in runs for r in run if r.ok]
    return {"prefill": [[r.prompt_tokens, r.server["prefill_ms"]] for r in reqs
                        if r.server.get("prefill_ms", 0) > 0],
            "transfer": [[r.prompt_tokens, r.server["kv_bytes"], r.server["transfer_ms"]]
                         for r in reqs if r.server.get("kv_bytes", 0) > 0]}


UNQUEUED_OCCUPANCY = 0.15  # a decode worker's receiver busy less than this: few transfers wait


def unqueued_transfer_points(rows: Sequence[dict], occupancy: float = UNQUEUED_OCCUPANCY
                             ) -> list[tuple[str, float, float]]:
    """(run label, mean KV bytes, mean transfer ms) of the P/D runs (results.json rows)
    whose transfers rarely queued: per sender (prefill worker) and per receiver (decode
    worker), arrival rate x mean transfer time < UNQUEUED_OCCUPANCY (the chance that a
    transfer finds the sender or the receiver busy with another)."""
    out = []
    for r in rows:
        m = re.fullmatch(r"(\d+)P(\d+)D", str(r["setup"]))
        xfer, kvb = r.get("mean_transfer_ms", math.nan), r.get("mean_kv_bytes", math.nan)
        if not m or r["request_rate"] == "inf" or xfer is None or kvb is None \
                or math.isnan(xfer) or math.isnan(kvb) or not xfer > 0:
            continue
        per_worker = float(r["request_rate"]) / min(int(m.group(1)), int(m.group(2)))
        if per_worker * xfer / 1e3 < occupancy:
            out.append((f"{r['setup']} {str(r['workload']).split(':')[0]} @ "
                        f"{float(r['request_rate']):.3g}", float(kvb), float(xfer)))
    return out


def run_calibration(run_dir: str, res: dict) -> Calibration:
    """The calibration a capstone run directory's validation uses: `calibration.json`,
    with the decode step refitted from run summaries when the run was fitted by the old
    method (TPOT from token 0, which includes the KV transfer) and left no per-request data
    to refit from (`decode_from_summaries`); the file is not changed. The summaries are
    those of every P/D run that held the attainment target: in a steady state Little's law
    gives the batch, and runs at several rates span a range of batch sizes (the lowest-rate
    runs alone stopped at about 30 per worker while the runs went to 120 and more). A file
    without the mixed profile (fitted before it existed) gets one from the run's steady
    colocated runs when the directory holds their per-request data
    (`capstone_mixed.steady_colocated_runs`), and one without the relay profile gets it
    from the runs' records when they hold heartbeats (`capstone_relay.fit_relay`)."""
    cal = Calibration.load(os.path.join(run_dir, "calibration.json"))
    if not cal.relay and fit_relay(cal, run_dir):
        cal.source["relay"] += "; fitted from requests.json.gz, the file has none"
    had_mixed, refit, old = bool(cal.mixed), False, cal.meta.get("decode_fit") != DECODE_FIT
    if old or not cal.meta.get("decode_left_out"):
        refit = fit_decode_unsaturated(cal, run_dir, old)
        if refit:
            cal.source["decode"] += "; refitted from requests.json.gz" + (
                " (the file's has no sync part)" if old else "")
        elif old and not (cal.meta.get("decode_fit") in ("token1", *SYNC_FITS)
                          or cal.source.get("decode") == "default"):
            _refit_decode(cal, res)
    # the mixed profile is a step's time less the decode step: refitted with a new one
    if (refit or not had_mixed) and fit_mixed(cal, steady_colocated_runs(run_dir, res)):
        cal.source["mixed"] += ("; refitted from requests.json.gz"
                                + (" on the refitted decode step" if had_mixed else
                                   ", the file has none"))
    return cal


def _refit_decode(cal: Calibration, res: dict) -> None:
    """run_calibration's decode (and transfer) refit from the run summaries."""
    lengths = {w: v["lengths"] for s in res["setups"] for w, v in s["by_workload"].items()
               if v.get("lengths")}
    target = res.get("target", 0.9)
    pts = []
    for r in res["runs"]:
        m = re.fullmatch(r"(\d+)P(\d+)D", str(r["setup"]))
        ls = lengths.get(r["workload"], [])[:int(r.get("num_prompts") or 0)]
        # steady runs only (Little's law): those that held the attainment target
        if m and ls and r.get("slo_attainment", 0.0) >= target:
            pts.append((r, int(m.group(2)), sum(i for i, _ in ls) / len(ls),
                        sum(o for _, o in ls) / len(ls)))
    try:
        fitted = decode_from_summaries(pts)
    except ValueError:
        return
    cal.meta["decode_max_batch"] = f"{fitted.pop('max_batch'):.1f}"
    cal.decode = fitted
    cal.source["decode"] = (f"refitted from {len(pts)} P/D run summaries that held the "
                            f"{target:.0%} target (TPOT less the KV transfer per token; batch "
                            f"by Little's law; batches up to {cal.meta['decode_max_batch']} "
                            "per decode worker)")
    xfer = unqueued_transfer_points(res["runs"])
    if len(xfer) >= 3:
        c = nonneg_lstsq(_design(np.array([b for _, b, _ in xfer]), 1),
                         np.array([t for _, _, t in xfer]))
        cal.transfer = {"c0": c[0], "ms_per_byte": c[1]}
        cal.source["transfer"] = (f"refitted from {len(xfer)} run summaries whose transfers "
                                  "rarely queued (the simulator queues them itself)")


def load_calibration(path: str | None) -> Calibration:
    """calibration.json, or a run directory's profiles refitted as validate() refits them."""
    if not path:
        print("note: no --calibration: using default profiles (not measured)", file=sys.stderr)
        return Calibration()
    if os.path.isfile(os.path.join(path, "results.json")):
        with open(os.path.join(path, "results.json")) as f:
            return run_calibration(path, json.load(f))
    return Calibration.load(os.path.join(path, "calibration.json") if os.path.isdir(path) else path)

"""The capstone report's transfer question: is the KV transfer time linear in input length,
and what sets its bandwidth? Answered first from the run's dedicated transfer step, then
from the serving requests.

The dedicated step (capstone_transfer_step.py, results.json "transfer_step") is `pdserve
bench transfer` on the run's prefill and decode GPUs with the model's KV geometry, at a
few prompt lengths, nothing else running. Fitted (transfer_fit.fit_line: time = fixed +
bytes / bandwidth, fixed >= 0, relative residuals, lengths off the line left out) with R^2:
the receiver-side time (rx_p50_ms: the clock's start to the decode side's own result,
nothing subtracted; the clock starts at finish() since `--start ahead`, at start() in older
runs), the bench's transfer time (p50_ms: to the receiver's done ack at the
sender, less an empty request's round trip) and the raw send of the same bytes measured in
the same step (baseline_p50_ms); the bandwidth is compared with the raw send's and with
one peer-to-peer copy_ (phys_ms, GPUs only).

What a prefill worker reports as `transfer_ms` is the time from the end of its forward to
the last layer landing (worker/core.py `timings`): with layer-wise push, the part of the
transfer not hidden behind the forward. Under load it also holds the wait for the sender
and the decode worker's receiver busy with other transfers, so a fit over every request of
every run measures queueing, not the transfer. Used here:
- with per-request data (requests.json.gz): the requests of P/D runs whose transfer
  window (prefill start to transfer end, on the client's clock) overlapped no other
  request's on the same decode worker or the same prefill worker;
- without it (older runs): each run's mean transfer time and mean KV bytes, for the P/D
  runs whose receivers were rarely busy (capstone_calibration.unqueued_transfer_points).
The fit is time = fixed + bytes / bandwidth with fixed >= 0 (least squares), with R^2.
Runs from before the dedicated step have only the serving part; the report says so (no
committed `bench transfer` result stands in: it was measured on another commit, device or
geometry).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pdserve.benchmarks import plotting
from pdserve.benchmarks.capstone_calibration import (
    unqueued_transfer_points,
    unqueued_transfers,
)
from pdserve.benchmarks.capstone_report import Context, SetupResult, run_row
from pdserve.benchmarks.capstone_steps import nonneg_lstsq
from pdserve.benchmarks.transfer_fit import LineFit, fit_line


def fit_fixed_bandwidth(pts: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """(fixed ms >= 0, GB/s, R^2) of time_ms = fixed + bytes / bandwidth; GB/s is inf when
    the slope is 0 (bytes add nothing measurable)."""
    if len(pts) < 2:
        return math.nan, math.nan, math.nan
    x = np.array([[1.0, b] for b, _ in pts])
    y = np.array([t for _, t in pts])
    c0, slope = nonneg_lstsq(x, y)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - x @ np.array([c0, slope])) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return c0, (1e-6 / slope if slope > 0 else math.inf), r2  # bytes/ms -> GB/s


def unqueued_requests(setups: Sequence[SetupResult]) -> list[tuple[float, float]]:
    """(KV bytes, transfer ms) of every run's requests whose transfer did not queue
    (capstone_calibration.unqueued_transfers)."""
    return [(float(r.server["kv_bytes"]), float(r.server["transfer_ms"]))
            for s in setups for w in s.by_workload.values() for run in w.runs
            for r in unqueued_transfers(run.results)]


def step_fits(rows: Sequence[dict]) -> dict[str, LineFit]:
    """The dedicated step's fits, as `bench transfer` fits them: "rx" (receiver side),
    "transfer" (the bench's p50_ms) and "raw" (the raw send of the same bytes)."""
    nbytes, lens = [r["bytes"] for r in rows], [r["input_len"] for r in rows]
    ms = lambda r, k: r.get(k) if r.get(k) is not None else math.nan  # noqa: E731
    return {key: fit_line(nbytes, [ms(r, col) / 1e3 for r in rows], lens)
            for key, col in (("rx", "rx_p50_ms"), ("transfer", "p50_ms"),
                             ("raw", "baseline_p50_ms"))}


def r_squared(fit: LineFit, rows: Sequence[dict], col: str) -> float:
    """R^2 of the fit over the lengths it used, on the times (ms)."""
    y = np.array([rows[i][col] for i in fit.used], dtype=float)
    if len(y) < 2 or not fit.ok:
        return math.nan
    pred = np.array([float(fit.predict_s(rows[i]["bytes"])) * 1e3 for i in fit.used])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def phys_gbps(rows: Sequence[dict]) -> float | None:
    """One peer-to-peer copy_'s GB/s, measured in the step (GPUs only)."""
    r = rows[-1]
    return r["bytes"] / (r["phys_ms"] * 1e6) if r.get("phys_ms") else None


def _describe(fit: LineFit, r2: float) -> str:
    if not fit.ok:
        return f"no fit ({fit.note})"
    bw = f"{fit.gbps:.3g} GB/s" if math.isfinite(fit.gbps) else "no measurable per-byte cost"
    linear = ("linear" if r2 >= 0.95 else "roughly linear" if r2 >= 0.8 else
              "not linear" if not math.isnan(r2) else "undetermined")
    return (f"time = {fit.fixed_us / 1e3:.3g} ms + bytes / ({bw}), fixed >= 0, R^2 {r2:.3f}: "
            f"{linear} ({fit.note})")


STEP_TABLE = ["input_len", "MB", "rx_p50_ms", "p50_ms", "baseline_p50_ms", "rx_ratio",
              "ratio", "via", "verified"]


def dedicated_lines(step: dict | None) -> tuple[list[str], LineFit | None]:
    """The report's lines on the dedicated step, and its receiver-side fit (None without)."""
    head = "**Dedicated measurement** (this run, before the serving setups)"
    rows = (step or {}).get("rows") or []
    if not rows:
        why = (step or {}).get("note") or ("this run predates the in-run transfer step "
                                           "(`--transfer-lens`)")
        return [f"{head}: none: {why}. `pdserve bench transfer --geometry LAYERSxKV_HEADSx"
                "HEAD_DIM:DTYPE` measures it on its own."], None
    fits = step_fits(rows)
    r2 = {k: r_squared(f, rows, c) for (k, f), c in
          zip(fits.items(), ("rx_p50_ms", "p50_ms", "baseline_p50_ms"))}
    backend, phys = step["backend"], phys_gbps(rows)
    ok = all(r["verified"] for r in rows)
    table = [{**r, "MB": r["bytes"] / 1e6} for r in rows]
    # runs before `bench transfer --start` timed from start(); since, from finish() (start()
    # called with the reservation, before the prompt's forward, as workers do)
    clock = ("finish(), when the KV is whole (start() was called with the reservation, as "
             "the prefill worker does before the prompt's forward)" if step.get("start") == "ahead"
             else "start() (finish() right after it: the request's setup is timed too)")
    out = [f"{head}: `pdserve bench transfer` from {step['sender']} (the prefill side) to "
           f"{step['receiver']} (the decode side), {backend}, KV geometry {step['geometry']} "
           f"(layers x KV heads x head dim: dtype), block size {step['block_size']}, "
           f"{step['iters']} timed iterations per length after {step['warmup']} untimed, "
           f"{step.get('wall_s', math.nan):.0f} s; "
           + ("every transfer arrived byte for byte." if ok else "**not every transfer "
              "arrived intact** (verified column).")
           + (f" Note: {step['note']}." if step.get("note") else ""), "",
           plotting.markdown_table(table, STEP_TABLE, floatfmt=".4g"), "",
           f"- The clock starts at {clock}.",
           "- Linear in input length? The receiver side (rx: the clock's start to the decode "
           f"side's own result, nothing subtracted): {_describe(fits['rx'], r2['rx'])}.",
           "- The bench's transfer time (the clock's start to the receiver's done ack at the sender, "
           f"less an empty request's round trip): {_describe(fits['transfer'], r2['transfer'])}.",
           f"- The raw {backend} send of the same bytes in the same step (one contiguous "
           f"buffer, receive pre-posted): {_describe(fits['raw'], r2['raw'])}.",
           "- What sets the bandwidth: " + _bandwidth(fits, rows, backend, phys)]
    return out, fits["rx"]


def _bandwidth(fits: dict[str, LineFit], rows: Sequence[dict], backend: str,
               phys: float | None) -> str:
    rx, raw = fits["rx"], fits["raw"]
    if not rx.ok or not math.isfinite(rx.gbps):
        return ("no per-byte cost was measurable at these lengths: the fixed part "
                f"({rx.fixed_us / 1e3:.3g} ms) sets the time." if rx.ok else "no fit.")
    via = "+".join(sorted({str(r["via"]) for r in rows}))
    paths = {f"the raw {backend} send": raw.gbps if raw.ok else math.nan}
    if phys:
        paths["one copy_ between the two GPUs (copy engines)"] = phys
    known = {k: v for k, v in paths.items() if math.isfinite(v) and v > 0}
    text = (f"pdserve moves the bytes ({via}) at {rx.gbps:.3g} GB/s (the receiver-side fit's "
            "per-byte rate); " + ", ".join(f"{k} {v:.3g} GB/s (pdserve at {rx.gbps / v:.0%} "
                                           "of it)" for k, v in known.items()) + ". ")
    if known:
        best_name, best = max(known.items(), key=lambda kv: kv[1])
        if rx.gbps > 1.25 * best:
            text += (f"Faster than the fastest measured path ({best_name}): pdserve's path "
                     f"({via}) does not go through it, so it does not bound pdserve; no faster "
                     "path was measured here to say what does. ")
        elif rx.gbps >= 0.8 * best:
            text += (f"Within 20% of the fastest ({best_name}): the link sets it, not "
                     "pdserve's own per-block work. ")
        else:
            text += (f"Short of the fastest ({best_name}) by more than 20%: pdserve's own "
                     "work per block (gathering and scattering blocks spread over the pool, "
                     "its messages, the receiver noticing) sets it, not the link. ")
    per_token = rows[-1]["bytes"] / rows[-1]["input_len"]
    half = rx.fixed_s * rx.gbps * 1e9 / per_token
    return text + (f"The fixed part ({rx.fixed_us / 1e3:.3g} ms) is half the time at about "
                   f"{half:.0f} tokens: below that the per-transfer cost, not the bandwidth, "
                   "sets the time." if half >= 1 else "The fixed part is negligible.")


def transfer_lines(setups: Sequence[SetupResult], ctx: Context) -> list[str]:
    """The report's "### Transfer": the dedicated step first, then the serving tail."""
    out, rx = dedicated_lines(ctx.transfer_step)
    return out + ["", "**Serving: the part of the transfer not hidden behind the forward** "
                  "(what prefill workers report as `transfer_ms`: from the end of the "
                  f"forward to the last layer landing; this run's workers pushed KV "
                  f"{_push(ctx).describe()}"
                  + ("; with layer-wise push most bytes move during the forward, so this is "
                     "a tail, not the transfer time)" if _layerwise(ctx) else
                     ": the whole copy starts after the forward, so this is the transfer "
                     "with the messages around it)"), "",
                  *serving_lines(setups, ctx, rx)]


def _push(ctx: Context):
    from pdserve.benchmarks.planner_setups import KVPush

    return KVPush.from_meta(ctx.meta)


def _layerwise(ctx: Context) -> bool:
    return _push(ctx).layerwise(1 << 62)


def serving_lines(setups: Sequence[SetupResult], ctx: Context,
                  rx: LineFit | None = None) -> list[str]:
    per_req = unqueued_requests(setups)
    if len(per_req) >= 3:
        pts, source = per_req, (f"{len(per_req)} requests whose prefill and transfer "
                                "overlapped no other request's on the same prefill or decode "
                                "worker")
    rows = [run_row(s, w, r, ctx) for s in setups for w in s.by_workload.values()
            for r in w.runs]
    every = unqueued_transfer_points(rows, occupancy=math.inf)
    if len(per_req) < 3:
        runs = unqueued_transfer_points(rows)
        pts = [(b, t) for _, b, t in runs]
        source = (f"the mean transfer time and KV bytes of {len(runs)} P/D runs whose senders "
                  "and receivers were busy < 15% of the time (rate per prefill or decode "
                  "worker x mean transfer; per-request data not recorded): "
                  + ", ".join(f"{name} ({b / 1e6:.0f} MB, {t:.3g} ms)" for name, b, t in runs))
    if len(pts) < 3:
        return ["- Fewer than 3 transfers that did not queue; no fit"]
    fixed, gbps, r2 = fit_fixed_bandwidth(pts)
    r2_all = fit_fixed_bandwidth([(b, t) for _, b, t in every])[2]
    big = max(b for b, _ in pts)
    at_big = fixed + (big / 1e6 / gbps if math.isfinite(gbps) else 0.0)
    eff = big / at_big / 1e6 if at_big > 0 else math.nan
    linear = ("linear" if r2 >= 0.8 else "roughly linear" if r2 >= 0.5 else
              "not well described by a line" if not math.isnan(r2) else "undetermined")
    bw = f"{gbps:.3g} GB/s" if math.isfinite(gbps) else "no measurable per-byte cost"
    return [
        f"- Transfers that did not queue, from {source}.",
        f"- Fit: {fixed:.3g} ms + bytes / ({bw}), fixed >= 0, R^2 {r2:.2f}: {linear} in the "
        "KV bytes, which are proportional to the input length.",
        f"- What sets this tail: at {big / 1e6:.3g} MB the fixed part is "
        f"{fixed / at_big:.0%} of {at_big:.3g} ms ({eff:.3g} GB/s effective), so "
        + ("the fixed per-request part sets it, not the link: the reported time starts at "
           "the end of the prefill forward, "
           + ("and with layer-wise push most bytes have moved during the forward; what is "
              "left is the last layers, the final message and the decode worker's "
              "acknowledgement." if _layerwise(ctx) else
              "the copy itself is short against it (see the dedicated step), and the rest is "
              "the messages around it and the decode worker's acknowledgement.")
           if fixed > 0.5 * at_big else
           f"the per-byte rate ({bw}) sets it.")
        + " Under load the same field also holds the wait for a busy sender or receiver: "
        f"the same fit over the means of all {len(every)} P/D runs has R^2 {r2_all:.2f}.",
    ] + ([] if rx is None or not rx.ok else [
        _against(rx, big, at_big)])


def _against(rx: LineFit, nbytes: float, tail_ms: float) -> str:
    whole = float(rx.predict_s(nbytes)) * 1e3
    share = tail_ms / whole if whole > 0 else math.nan
    return (f"- Against the dedicated step: the whole transfer of {nbytes / 1e6:.3g} MB takes "
            f"{whole:.3g} ms on the receiver side (its fit); the serving tail at that size, "
            f"{tail_ms:.3g} ms, is {share:.2g}x that"
            + (": the forward hides most of the transfer." if share < 0.5 else
               ": the tail holds more than moving the bytes (waits for the sender, the "
               "receiver and the decode worker's loop)." if share > 1 else "."))


"""The capstone report's transfer question: is the KV transfer time linear in input length,
and what sets its bandwidth? Answered from transfers that did not queue.

What a prefill worker reports as `transfer_ms` is the time from the end of its forward to
the last layer landing (worker/core.py `timings`). Under load it also holds the wait for
the sender and the decode worker's receiver busy with other transfers, so a fit over every
request of every run measures queueing, not the transfer. Used here:
- with per-request data (requests.json.gz): the requests of P/D runs whose transfer
  window (prefill start to transfer end, on the client's clock) overlapped no other
  request's on the same decode worker or the same prefill worker;
- without it (older runs): each run's mean transfer time and mean KV bytes, for the P/D
  runs whose receivers were rarely busy (capstone_calibration.unqueued_transfer_points).
The fit is time = fixed + bytes / bandwidth with fixed >= 0 (least squares), with R^2.
The dedicated measurement is `pdserve bench transfer` (benchmarks/results/transfer/).
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from pdserve.benchmarks.capstone_calibration import (
    unqueued_transfer_points,
    unqueued_transfers,
)
from pdserve.benchmarks.capstone_report import Context, SetupResult, run_row
from pdserve.benchmarks.capstone_steps import nonneg_lstsq


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


def bench_reference(root: str | None = None) -> str:
    """The fit line of `pdserve bench transfer`'s committed result (nccl), if present."""
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transfer")
    for path in sorted(glob.glob(os.path.join(root, "transfer_nccl_*.md"))):
        with open(path) as f:
            text = f.read()
        fit = re.search(r"fit kvtransfer: time = (.*?)\n", text)
        dev = re.search(r"- device: (.*?)\n", text)
        if fit:
            return (f"`pdserve bench transfer` (benchmarks/results/transfer/{os.path.basename(path)}"
                    f", {dev.group(1) if dev else 'device not stated'}): {fit.group(1)}")
    return "`pdserve bench transfer`: no committed result found"


def transfer_lines(setups: Sequence[SetupResult], ctx: Context) -> list[str]:
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
        return ["- KV transfer: fewer than 3 transfers that did not queue; no fit"]
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
        f"- What sets the bandwidth: at {big / 1e6:.0f} MB the fixed part is "
        f"{fixed / at_big:.0%} of {at_big:.3g} ms ({eff:.3g} GB/s effective), so "
        + ("the fixed per-request part sets it, not the link: the reported time starts at "
           "the end of the prefill forward, and with layer-wise push most bytes have moved "
           "during the forward; what is left is the last layers, the final message and the "
           "decode worker's acknowledgement." if fixed > 0.5 * at_big else
           f"the per-byte rate ({bw}) sets it.")
        + " Under load the same field also holds the wait for a busy sender or receiver: "
        f"the same fit over the means of all {len(every)} P/D runs has R^2 {r2_all:.2f}.",
        f"- The dedicated measurement, {bench_reference()}, against {eff:.3g} GB/s effective "
        "here.",
    ]


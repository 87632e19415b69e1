"""The PNGs of a capstone report (matplotlib, Agg): goodput vs achieved rate, TTFT and ITL
CDFs, the SLO attainment map (which setup wins where), transfer time vs input length, and
GPU utilization per pool. Each function returns the path it wrote, or None without data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from pdserve.benchmarks.capstone_metrics import Window, cdf, meets
from pdserve.benchmarks.capstone_report import SetupResult, WorkloadRuns
from pdserve.benchmarks.plotting import save_png


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_png(fig, path)
    _plt().close(fig)
    return path


def _workloads(setups: Sequence[SetupResult]) -> list[str]:
    return list(dict.fromkeys(w for s in setups for w in s.by_workload))


def goodput_vs_rate(path: str, setups: Sequence[SetupResult], title: str) -> str | None:
    names = _workloads(setups)
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), dpi=110, squeeze=False)
    for ax, wname in zip(axes[0], names):
        for s in setups:
            w = s.by_workload.get(wname)
            if not w or not w.runs:
                continue
            pts = sorted((r.summary.get("steady_throughput", r.summary["request_throughput"]),
                          r.summary.get("steady_goodput", r.summary["request_goodput"]))
                         for r in w.runs)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s.setup)
        ax.set_xlabel("achieved request throughput (req/s)")
        ax.set_ylabel("goodput (req/s meeting all SLOs)")
        ax.set_title(wname, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def latency_cdfs(path: str, setups: Sequence[SetupResult], wname: str, rate: float,
                 window: Window) -> str | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    drawn = False
    for s in setups:
        w = s.by_workload.get(wname)
        run = w.at_rate(rate) if w else None
        if not run:
            continue
        ok = [r for r in window.select(run.results) if r.ok]
        for ax, vals in ((axes[0], [r.ttft_s * 1e3 for r in ok]),
                         (axes[1], [g * 1e3 for r in ok for g in r.itls_s()])):
            xs, ys = cdf(vals)
            if xs:
                ax.plot(xs, ys, label=f"{s.setup} @ {run.rate:g} req/s")
                drawn = True
    if not drawn:
        _plt().close(fig)
        return None
    for ax, name in ((axes[0], "TTFT (ms)"), (axes[1], "ITL (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if ax is axes[0] else "fraction of token gaps")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{wname}: latency CDFs (measurement window)", fontsize=9)
    return _save(fig, path)


def _grid(values: Sequence[float], n: int) -> list[float]:
    xs = sorted(v for v in values if v > 0 and not math.isnan(v))
    if not xs:
        return [1.0] * n
    lo, hi = max(xs[0] * 0.8, 1e-3), xs[-1] * 1.2
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def slo_map(setups: Sequence[SetupResult], wname: str, rate: float, window: Window,
            n: int = 8) -> tuple[list[float], list[float], list[list[str]], list[list[float]]]:
    """Over a TTFT SLO x TPOT SLO grid (ms, spanning the measured values): the setup with the
    highest attainment in each cell ("tie" when several share it, "none" when no request
    meets the pair) and that attainment."""
    runs = {}
    for s in setups:
        w: WorkloadRuns | None = s.by_workload.get(wname)
        run = w.at_rate(rate) if w else None
        if run:
            runs[s.setup] = window.select(run.results)
    ok = [r for rs in runs.values() for r in rs if r.ok]
    ttfts = _grid([r.ttft_s * 1e3 for r in ok], n)
    tpots = _grid([r.tpot_s * 1e3 for r in ok], n)
    winners, best = [], []
    for tp in tpots:
        wrow, brow = [], []
        for tt in ttfts:
            slos = {"ttft": tt, "tpot": tp}
            att = {k: sum(meets(r, slos) for r in rs) / len(rs) if rs else 0.0
                   for k, rs in runs.items()}
            top = max(att.values(), default=0.0)
            leaders = [k for k, v in att.items() if v == top]
            wrow.append("none" if top == 0 else leaders[0] if len(leaders) == 1 else "tie")
            brow.append(top)
        winners.append(wrow)
        best.append(brow)
    return ttfts, tpots, winners, best


def map_summary(winners: list[list[str]]) -> str:
    cells = [w for row in winners for w in row]
    counts = {k: cells.count(k) for k in dict.fromkeys(cells)}
    return ", ".join(f"{k} best in {v} of {len(cells)} (TTFT SLO, TPOT SLO) cells"
                     for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def slo_map_png(path: str, setups: Sequence[SetupResult], wname: str, rate: float,
                window: Window) -> tuple[str | None, str]:
    ttfts, tpots, winners, best = slo_map(setups, wname, rate, window)
    labels = sorted({w for row in winners for w in row})
    if not labels:
        return None, ""
    plt = _plt()
    idx = {k: i for i, k in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    cmap = plt.get_cmap("tab10", max(2, len(labels)))
    ax.imshow([[idx[w] for w in row] for row in winners], origin="lower", cmap=cmap,
              vmin=-0.5, vmax=max(2, len(labels)) - 0.5, aspect="auto")
    for i, row in enumerate(best):
        for j, v in enumerate(row):
            ax.text(j, i, f"{winners[i][j]}\n{v:.0%}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(ttfts)), [f"{x:.3g}" for x in ttfts], fontsize=7, rotation=45)
    ax.set_yticks(range(len(tpots)), [f"{x:.3g}" for x in tpots], fontsize=7)
    ax.set_xlabel("TTFT SLO (ms)")
    ax.set_ylabel("TPOT SLO (ms)")
    ax.set_title(f"{wname} @ {rate:g} req/s: setup with the highest SLO attainment", fontsize=9)
    return _save(fig, path), map_summary(winners)


def transfer_vs_input(path: str, setups: Sequence[SetupResult],
                      step: dict | None = None) -> str | None:
    """Left: the dedicated transfer step (receiver-side time, the bench's transfer time and
    the raw send, p50 per length, with their fits; the peer-to-peer copy_ line on GPUs).
    Right: the serving requests' worker-reported transfer_ms (the tail after the forward).
    Either panel alone when the other has no data."""
    rows = (step or {}).get("rows") or []
    serving = {s.setup: [(r.prompt_tokens, r.server["transfer_ms"])
                         for w in s.by_workload.values() for run in w.runs for r in run.results
                         if r.ok and r.server.get("transfer_ms", 0) > 0] for s in setups}
    serving = {k: v for k, v in serving.items() if v}
    if not rows and not serving:
        return None
    plt = _plt()
    n = int(bool(rows)) + int(bool(serving))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.4), dpi=110, squeeze=False)
    if rows:
        _step_panel(axes[0, 0], rows, step)
    if serving:
        ax = axes[0, n - 1]
        for name, pts in serving.items():
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.5, label=name)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("transfer_ms (ms, worker-reported)")
        ax.set_title("serving: the part not hidden behind the forward", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _step_panel(ax, rows: Sequence[dict], step: dict) -> None:
    import numpy as np

    from pdserve.benchmarks.capstone_transfer import phys_gbps, step_fits

    fits = step_fits(rows)
    lens = np.array([r["input_len"] for r in rows], dtype=float)
    per_token = rows[-1]["bytes"] / rows[-1]["input_len"]
    dense = np.geomspace(lens.min() / 1.5, lens.max() * 1.5, 100)
    series = (("rx", "rx_p50_ms", "o", "C0", "pdserve, receiver side (rx)"),
              ("transfer", "p50_ms", "^", "C2", "pdserve, bench transfer time"),
              ("raw", "baseline_p50_ms", "s", "C1", f"raw {step['backend']} send"))
    for key, col, marker, color, name in series:
        pts = [(r["input_len"], r[col]) for r in rows if r.get(col)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, label=name)
        f = fits[key]
        if f.ok and key != "transfer":
            bw = f"{f.gbps:.3g} GB/s" if math.isfinite(f.gbps) else "inf"
            ax.plot(dense, f.predict_s(dense * per_token) * 1e3, "-", color=color, alpha=0.7,
                    label=f"fit: {f.fixed_us / 1e3:.3g} ms + B/{bw}")
    phys = phys_gbps(rows)
    if phys:
        ax.plot(dense, dense * per_token / (phys * 1e9) * 1e3, "k--",
                label=f"one copy_ between the GPUs: B/{phys:.3g} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"input length (tokens; {per_token / 1024:.4g} KiB of KV each)")
    ax.set_ylabel("transfer time p50 (ms)")
    ax.set_title(f"dedicated step: {step['sender']} -> {step['receiver']}, {step['geometry']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def gpu_util(path: str, setups: Sequence[SetupResult]) -> str | None:
    with_data = [s for s in setups if any(s.gpu.values())]
    if not with_data:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(with_data), 1, figsize=(9, 2.6 * len(with_data)), dpi=110,
                             squeeze=False)
    for ax, s in zip(axes[:, 0], with_data):
        t0 = min(p[0] for pts in s.gpu.values() for p in pts)
        for role, gpus in s.pools.items():
            for g in gpus:
                pts = s.gpu.get(g, [])
                ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], lw=0.8,
                        label=f"{role} GPU {g}")
        ax.set_ylabel(f"{s.setup}\nutil (%)")
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (s)")
    return _save(fig, path)

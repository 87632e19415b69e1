"""`bench transfer`'s figure: time vs bytes (log-log) with the measured points, both
constrained fits and the physical line; below it the ratio raw / pdserve per length."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdserve.benchmarks.plotting import save_png
from pdserve.benchmarks.transfer_fit import LineFit

TARGETS = (0.9, 0.8)  # the ratio raw / pdserve a whole-request transfer should reach


def plot_transfer(path: str, rows: Sequence[dict[str, Any]], fit: LineFit, raw_fit: LineFit,
                  phys_gbps: float | None, title: str, raw_name: str = "raw") -> str | None:
    """Write the two-panel PNG; returns its path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = np.array([r["bytes"] for r in rows], dtype=np.float64)
    dense = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
    fig, (top, bot) = plt.subplots(2, 1, figsize=(7.5, 7.5), dpi=120, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.4]})
    top.plot(x, [r["p50_ms"] for r in rows], "o", color="C0", label="pdserve p50")
    top.plot(x, [r["baseline_p50_ms"] for r in rows], "s", color="C1", label=f"{raw_name} one send p50")
    for f, color, name in ((fit, "C0", "pdserve"), (raw_fit, "C1", raw_name)):
        if f.ok:
            top.plot(dense, f.predict_s(dense) * 1e3, "-", color=color, alpha=0.7,
                     label=f"fit {name}: {f.fixed_us:.0f} us + B/{f.gbps:.3g} GB/s")
    if phys_gbps:
        top.plot(dense, dense / (phys_gbps * 1e9) * 1e3, "k--",
                 label=f"physical: B/{phys_gbps:.3g} GB/s (copy_ peer to peer)")
    else:
        top.text(0.02, 0.96, "no physical line (no NVLink here)", transform=top.transAxes,
                 fontsize=8, va="top")
    top.set_xscale("log", base=2)
    top.set_yscale("log")
    top.set_ylabel("transfer time (ms)")
    top.set_title(title, fontsize=9)
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=7, loc="lower right")
    for r in rows:
        top.annotate(f"{r['input_len']}", (r["bytes"], r["p50_ms"]), textcoords="offset points",
                     xytext=(4, 4), fontsize=7)
    bot.plot(x, [r["ratio"] for r in rows], "o-", color="C0", label=f"{raw_name} / pdserve")
    for t, style in zip(TARGETS, ("g--", "r:")):
        bot.axhline(t, color=style[0], linestyle=style[1:], linewidth=1, label=f"target {t}")
    bot.set_ylim(0, max(1.1, max(r["ratio"] for r in rows) * 1.1))
    bot.set_xlabel("bytes per transfer (whole blocks, all layers)")
    bot.set_ylabel("ratio")
    bot.grid(True, which="both", alpha=0.3)
    bot.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_png(fig, path)
    plt.close(fig)
    return path

"""A constrained latency/bandwidth fit: time = fixed + bytes / bandwidth, fixed >= 0.

The fit minimises relative residuals ((fit - measured) / measured), so a 0.5 ms point
weighs as much as a 50 ms one on a log-log plot, under fixed >= 0 and 1/bandwidth >= 0.
With two unknowns the non-negative least squares solution is closed-form: the
unconstrained solution if both are >= 0, else the best fit with the offending one at 0.

"Where the model holds": a length whose relative residual exceeds `max_resid` is not on
the line (a transfer that is not bandwidth-bound there, e.g. staging stalls at one size).
The worst such point is dropped and the fit redone while at least `min_points` remain;
the note says which lengths were used, which were left out and by how much they missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LineFit:
    """time_s = fixed_s + bytes * s_per_byte over the points in `used` (indices)."""

    fixed_s: float  # >= 0
    s_per_byte: float  # >= 0; 0 means "no bandwidth term" (gbps = inf)
    used: tuple[int, ...]
    excluded: tuple[int, ...]
    resid_pct: tuple[float, ...]  # every point: (measured - fit) / fit * 100
    note: str

    @property
    def fixed_us(self) -> float:
        return self.fixed_s * 1e6

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.fixed_s) and np.isfinite(self.s_per_byte))

    @property
    def gbps(self) -> float:
        if not self.ok:
            return float("nan")
        return 1.0 / self.s_per_byte / 1e9 if self.s_per_byte > 0 else float("inf")

    def predict_s(self, nbytes: float | np.ndarray) -> float | np.ndarray:
        return self.fixed_s + np.asarray(nbytes, dtype=np.float64) * self.s_per_byte

    def describe(self, name: str) -> str:
        if not self.ok:
            return f"fit {name}: none ({self.note})"
        return f"fit {name}: time = {self.fixed_us:.1f} us + bytes / ({self.gbps:.4g} GB/s); {self.note}"


def nnls_line(nbytes: np.ndarray, times_s: np.ndarray) -> tuple[float, float]:
    """(fixed_s, s_per_byte) >= 0 minimising sum(((fixed + x * s) - t) / t)^2."""
    x = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(times_s, dtype=np.float64)
    w = 1.0 / t  # relative residuals: every row divided by its own time
    a = np.stack([w, x * w], axis=1)  # rows (1/t, x/t) . (fixed, s) ~ 1
    y = np.ones_like(t)
    (fixed, slope), *_ = np.linalg.lstsq(a, y, rcond=None)
    if fixed >= 0 and slope >= 0:
        return float(fixed), float(slope)
    # one constraint is active: the better of the two one-parameter fits that is feasible
    slope_only = max(float(a[:, 1] @ y / (a[:, 1] @ a[:, 1])), 0.0)
    fixed_only = max(float(a[:, 0] @ y / (a[:, 0] @ a[:, 0])), 0.0)
    err_slope = float(np.sum((a[:, 1] * slope_only - y) ** 2))
    err_fixed = float(np.sum((a[:, 0] * fixed_only - y) ** 2))
    return (0.0, slope_only) if err_slope <= err_fixed else (fixed_only, 0.0)


def fit_line(nbytes: Sequence[float], times_s: Sequence[float], labels: Sequence[object] | None = None,
             max_resid: float = 0.25, min_points: int = 3) -> LineFit:
    """Fit over the points where the line holds (see the module docstring).

    labels name the points in the note (e.g. input lengths); default: the byte counts.
    """
    x = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(times_s, dtype=np.float64)
    labels = list(labels) if labels is not None else [int(b) for b in x]
    ok = np.isfinite(t) & (t > 0)
    used = [i for i in range(len(x)) if ok[i]]
    if len(used) < 2:
        nan = float("nan")
        return LineFit(nan, nan, (), tuple(range(len(x))), tuple([nan] * len(x)),
                       "fewer than 2 lengths with a time: no fit")
    dropped: list[tuple[int, float]] = []
    while True:
        fixed, slope = nnls_line(x[used], t[used])
        fit = fixed + x * slope
        rel = (t - fit) / np.where(fit > 0, fit, np.nan)
        worst = max(used, key=lambda i: abs(rel[i]))
        if abs(rel[worst]) <= max_resid or len(used) <= max(min_points, 2):
            break
        dropped.append((worst, float(rel[worst])))
        used.remove(worst)
    resid = tuple(float(r) * 100 for r in rel)
    note = f"fitted over {', '.join(str(labels[i]) for i in used)}"
    if dropped:
        why = ", ".join(f"{labels[i]} ({r * 100:+.0f}% off the fit with it)" for i, r in dropped)
        note += f"; left out {why}: more than {max_resid * 100:.0f}% off the line"
    if fixed == 0.0:
        note += "; fixed cost at its bound 0 (the unconstrained fit wanted it negative)"
    bad = [i for i in range(len(x)) if not ok[i]]
    return LineFit(fixed, slope, tuple(used), tuple(sorted([i for i, _ in dropped] + bad)), resid, note)

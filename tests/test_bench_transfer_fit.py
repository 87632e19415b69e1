"""The constrained latency/bandwidth fit of `bench transfer` (benchmarks/transfer_fit.py)."""

import numpy as np
import pytest

from pdserve.benchmarks.transfer_fit import fit_line, nnls_line

MIB = 1 << 20
SIZES = np.array([16, 64, 256, 1024, 4096], dtype=np.float64) * MIB


def _objective(x, t, fixed, slope):
    return float(np.sum((((fixed + x * slope) - t) / t) ** 2))


def test_recovers_known_fixed_cost_and_bandwidth():
    rng = np.random.default_rng(0)
    fixed_s, gbps = 150e-6, 300.0
    t = (fixed_s + SIZES / (gbps * 1e9)) * (1 + rng.uniform(-0.01, 0.01, len(SIZES)))
    fit = fit_line(SIZES, t, labels=[128, 512, 2048, 8192, 32768])
    assert fit.fixed_us == pytest.approx(150, abs=10)
    assert fit.gbps == pytest.approx(300, rel=0.03)
    assert fit.used == (0, 1, 2, 3, 4) and fit.excluded == ()
    assert max(abs(r) for r in fit.resid_pct) < 2.5


def test_fixed_cost_never_negative_where_least_squares_goes_negative():
    # pure bandwidth, the small transfers a little faster than the line: an unconstrained
    # fit puts the intercept below zero
    t = SIZES / 300e9 * np.array([0.8, 0.9, 1.0, 1.0, 1.0])
    w = 1 / t
    (free_fixed, _), *_ = np.linalg.lstsq(np.stack([w, SIZES * w], 1), np.ones_like(t), rcond=None)
    assert free_fixed < 0
    fit = fit_line(SIZES, t, max_resid=1.0)
    assert fit.fixed_s == 0.0
    assert fit.gbps == pytest.approx(300, rel=0.1)
    assert "bound 0" in fit.note


def test_measured_nccl_run_leaves_out_the_length_off_the_line():
    # bench transfer on 2 x H200 (results/transfer/transfer_nccl_cuda_llama-3.1-8b.md):
    # unconstrained least squares over all five gave -1963 us + bytes / 85.9 GB/s
    p50_ms = np.array([0.735, 0.86, 1.51, 4.1, 49.6])
    fit = fit_line(SIZES, p50_ms / 1e3, labels=[128, 512, 2048, 8192, 32768])
    assert fit.fixed_s >= 0
    assert fit.excluded == (4,) and fit.used == (0, 1, 2, 3)
    assert "left out 32768" in fit.note
    assert 250 < fit.gbps < 400 and 400 < fit.fixed_us < 900
    assert fit.resid_pct[4] > 100  # reported for the left-out length too


def test_constrained_solution_is_optimal_among_feasible_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        t = rng.uniform(0.1e-3, 50e-3, len(SIZES))
        fixed, slope = nnls_line(SIZES, t)
        assert fixed >= 0 and slope >= 0
        best = _objective(SIZES, t, fixed, slope)
        for f, s in zip(rng.uniform(0, 50e-3, 200), rng.uniform(0, 2e-11, 200)):
            assert best <= _objective(SIZES, t, f, s) + 1e-12


def test_too_few_points_give_no_fit():
    fit = fit_line([MIB], [1e-3])
    assert not fit.ok and np.isnan(fit.gbps) and fit.used == () and fit.excluded == (0,)
    assert fit.describe("pdserve").startswith("fit pdserve: none (fewer than 2")

"""`pdserve bench decode` on CPU with the tiny preset: one grid point, overlap off and on
through the engine's own step loop (the GPU run is the one that means something)."""

from __future__ import annotations

import argparse
import csv

import pytest

from pdserve.benchmarks import decode


def test_decode_bench_reports_sync_and_overlap_steps(tmp_path) -> None:
    p = argparse.ArgumentParser()
    decode.add_arguments(p)
    args = p.parse_args(["--model", "tiny", "--device", "cpu", "--attention", "torch",
                         "--batch-sizes", "2", "--contexts", "40", "--iters", "3",
                         "--warmup", "1", "--out", str(tmp_path)])
    assert decode.run(args) == 0
    with open(tmp_path / "decode.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["batch"], r["ctx"]) for r in rows] == [("2", "40")]
    r = rows[0]
    for col in ("sync_ms", "overlap_ms", "fwd_ms", "roofline_ms"):
        assert float(r[col]) > 0, col
    assert float(r["overlap_ratio"]) == pytest.approx(float(r["overlap_ms"]) / float(r["roofline_ms"]),
                                                      rel=1e-3)
    md = (tmp_path / "decode.md").read_text()
    assert "overlap_ms" in md and "target batch" not in md  # no batch-1 point, no verdict

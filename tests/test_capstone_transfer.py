"""The capstone's dedicated transfer step (benchmarks/capstone_transfer_step.py) and the
report's transfer section built from it (benchmarks/capstone_transfer.py): where the step
runs, with which geometry, and what the report concludes from given rows. No subprocess
here: tests/test_capstone_smoke.py runs the step for real on CPU."""

from __future__ import annotations

import argparse
import json

import pytest

from pdserve.benchmarks import capstone
from pdserve.benchmarks import capstone_transfer as ct
from pdserve.benchmarks import capstone_transfer_step as step
from pdserve.benchmarks.capstone_budget import Budget
from pdserve.benchmarks.transfer_peer import geometry, geometry_spec

PNG = b"\x89PNG\r\n\x1a\n"
KIB_PER_TOKEN = 128  # llama-3.1-8b


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    capstone.add_arguments(p)
    return p.parse_args(list(argv))


def test_step_runs_on_the_first_pd_setups_prefill_and_decode_devices() -> None:
    a = _args("--devices", "0,1,2,3")
    assert step.devices(a, ["4both", "2P2D", "1P3D"]) == ("cuda:0", "cuda:2")
    assert step.devices(a, ["3P1D-cond512"]) == ("cuda:0", "cuda:3")
    assert step.devices(a, ["4both"]) == ("cuda:0", "cuda:1")  # no P/D: the first two
    assert step.devices(_args("--devices", "cpu"), ["1P1D"]) == ("cpu", "cpu")
    assert step.devices(_args("--coordinator", "h:1"), ["external"]) is None


def test_step_uses_the_workers_geometry_dtype_and_block_size() -> None:
    a = _args("--model", "llama-3.1-8b", "--worker-arg=--block-size=32",
              "--worker-arg=--dtype", "--worker-arg=float16")
    assert step.worker_flag(a, "--block-size") == "32"
    assert step.kv_geometry(a, on_gpu=True) == "32x8x128:float16"
    assert step.kv_geometry(_args("--model", "llama-3.1-8b"), on_gpu=True) == "32x8x128:bfloat16"
    assert step.kv_geometry(_args(), on_gpu=False) == "2x2x16:float32"
    assert geometry("2x2x16:float32") == geometry("tiny")  # the bench's own tiny geometry
    assert geometry(geometry_spec(32, 8, 128, "bfloat16")) == geometry("llama-3.1-8b")
    for bad in ("32x8x128", "32x8x128:int8", "0x8x128:bfloat16", "llama"):
        with pytest.raises(ValueError, match="LAYERSxKV_HEADSxHEAD_DIM"):
            geometry(bad)


def test_step_flags_are_checked_and_none_skips() -> None:
    assert "--transfer-lens" in capstone.check_args(_args("--transfer-lens", "512,x"))
    assert "--transfer-lens" in capstone.check_args(_args("--transfer-lens", "0"))
    assert "--transfer-iters" in capstone.check_args(_args("--transfer-iters", "0"))
    assert capstone.check_args(_args("--transfer-lens", "none")) is None
    rec = step.run_step(_args("--devices", "cpu", "--transfer-lens", "none"), ["1P1D"], None)
    assert rec == {"rows": [], "note": "skipped (--transfer-lens none)"}
    rec = step.run_step(_args("--coordinator", "h:1"), ["external"], None)
    assert rec["rows"] == [] and "did not launch" in rec["note"]
    a = _args("--transfer-max-s", "40")
    assert step.time_limit_s(a, 0.0) == 40.0 and step.time_limit_s(a, 100.0) == 15.0
    # a budget too small for the step skips it (15% of 30 s), before any subprocess
    rec = step.run_step(_args("--devices", "cpu"), ["1P1D"], Budget(30.0))
    assert rec["rows"] == [] and rec["note"].startswith("skipped: the budget leaves it 4 s")


def _rows(rx_gbps: float, raw_gbps: float, phys_gbps: float | None = 150.0) -> list[dict]:
    """Rows as `bench transfer --json` writes them: every time a line in the bytes."""
    rows = []
    for n in (512, 2048, 8192, 32768):
        b = n * KIB_PER_TOKEN * 1024
        rows.append({"input_len": n, "bytes": b, "p50_ms": 0.1 + b / rx_gbps / 1e6 * 0.9,
                     "rx_p50_ms": 0.3 + b / rx_gbps / 1e6,
                     "baseline_p50_ms": 0.05 + b / raw_gbps / 1e6, "via": "peer_copy",
                     "verified": True, "phys_ms": b / phys_gbps / 1e6 if phys_gbps else None})
        rows[-1]["ratio"] = rows[-1]["baseline_p50_ms"] / rows[-1]["p50_ms"]
        rows[-1]["rx_ratio"] = rows[-1]["baseline_p50_ms"] / rows[-1]["rx_p50_ms"]
    return rows


def _step(rows: list[dict]) -> dict:
    return {"rows": rows, "note": "", "sender": "cuda:0", "receiver": "cuda:1",
            "backend": "nccl", "geometry": "32x8x128:bfloat16", "block_size": 16,
            "iters": 5, "warmup": 2, "wall_s": 18.0}


def test_dedicated_lines_fit_the_receiver_side_and_name_what_sets_the_bandwidth() -> None:
    lines, rx = ct.dedicated_lines(_step(_rows(rx_gbps=100.0, raw_gbps=110.0)))
    text = "\n".join(lines)
    assert rx.gbps == pytest.approx(100.0, rel=1e-6) and rx.fixed_us == pytest.approx(300.0)
    assert "**Dedicated measurement**" in lines[0] and "byte for byte" in lines[0]
    assert "| input_len | MB | rx_p50_ms | p50_ms | baseline_p50_ms |" in text
    assert "- Linear in input length? The receiver side" in text
    assert "time = 0.3 ms + bytes / (100 GB/s), fixed >= 0, R^2 1.000: linear" in text
    assert "- The raw nccl send of the same bytes" in text and "(110 GB/s)" in text
    # the copy_ between the GPUs is the fastest path here (150 GB/s): 100 is a third short
    assert "Short of the fastest (one copy_ between the two GPUs" in text
    lines, _ = ct.dedicated_lines(_step(_rows(rx_gbps=100.0, raw_gbps=110.0, phys_gbps=None)))
    assert "Within 20% of the fastest (the raw nccl send)" in "\n".join(lines)
    slow = "\n".join(ct.dedicated_lines(_step(_rows(rx_gbps=40.0, raw_gbps=110.0)))[0])
    assert "Short of the fastest" in slow and "pdserve's own work per block" in slow
    fast = "\n".join(ct.dedicated_lines(_step(_rows(rx_gbps=300.0, raw_gbps=110.0)))[0])
    assert "Faster than the fastest measured path (one copy_" in fast


def test_dedicated_lines_without_the_step_say_why() -> None:
    lines, rx = ct.dedicated_lines(None)  # a run from before the step
    assert rx is None and "predates the in-run transfer step" in lines[0]
    lines, _ = ct.dedicated_lines({"rows": [], "note": "skipped (--transfer-lens none)"})
    assert "skipped (--transfer-lens none)" in lines[0]
    bad = _rows(100.0, 110.0)
    bad[1]["verified"] = False
    assert "not every transfer arrived intact" in ct.dedicated_lines(_step(bad))[0][0]


def test_report_from_renders_the_step_and_an_old_run_without_it(tmp_path) -> None:
    from test_capstone_rerender import _write_run

    src = tmp_path / "run"
    src.mkdir()
    _write_run(src, [4.0, 8.0])
    out = tmp_path / "old"
    assert capstone.run(_args("--report-from", str(src), "--out", str(out), "--no-plan")) == 0
    md = (out / "report.md").read_text()
    assert "**Dedicated measurement** (this run, before the serving setups): none" in md
    assert "**Serving: the part of the transfer not hidden behind the forward**" in md
    assert "benchmarks/results/transfer/" not in md  # no committed result stands in
    doc = json.loads((src / "results.json").read_text())
    doc["transfer_step"] = _step(_rows(rx_gbps=100.0, raw_gbps=110.0))
    (src / "results.json").write_text(json.dumps(doc))
    out = tmp_path / "new"
    assert capstone.run(_args("--report-from", str(src), "--out", str(out), "--no-plan")) == 0
    md = (out / "report.md").read_text()
    sec = md[md.index("### Transfer"):md.index("### GPU utilization per pool")]
    assert sec.index("**Dedicated measurement**") < sec.index("**Serving:")
    assert "- What sets the bandwidth: pdserve moves the bytes (peer_copy)" in sec
    assert "transfer.png" in md  # drawn from the step's rows alone (no per-request data)
    with open(out / "transfer.png", "rb") as f:
        assert f.read(8) == PNG

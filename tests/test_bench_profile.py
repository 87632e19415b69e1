"""`pdserve bench profile`: kernel classification, point parsing, and a tiny CPU run whose
categories come from CPU op self time (no timing assertions)."""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict

import pytest

from pdserve.benchmarks import cli
from pdserve.benchmarks import profile as bp

ARGV = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--attention", "torch",
        "--decode", "1x32,2x64", "--prefill", "64", "--iters", "2", "--warmup", "1"]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bp.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(("name", "category"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("aten::mm", "gemm"),
    ("_decode_kernel", "attention"),
    ("_skinny_kernel", "gemm"),
    ("_rope_store_kernel", "rope"),
    ("_prefill_kernel", "attention"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("_store_kv_kernel", "kv_store"),
    ("_rms_norm_kernel", "norm"),
    ("_rope_kernel", "rope"),
    ("_silu_mul_kernel", "activation"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4>", "copy"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<float>>>", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "other"),
])
def test_classify(name, category) -> None:
    assert bp.classify(name) == category


def test_points_and_defaults() -> None:
    args = parse()
    assert args.decode == [(1, 512), (64, 2048)] and args.prefill == [8192]
    assert args.iters == 5 and args.block_size == 16 and not args.enforce_eager
    assert args.out == "benchmarks/results/profile"
    assert bp.point_list("4x128, 8X64") == [(4, 128), (8, 64)] and bp.point_list("") == []
    for bad in ("4", "4x", "0x64", "ax2", "1x2x3"):
        with pytest.raises(SystemExit):
            parse("--decode", bad)


def test_summarize_per_step() -> None:
    times = [("k1", "gemm", 300.0), ("k1", "gemm", 100.0), ("k2", "copy", 200.0)]
    s = bp.summarize(times, iters=2)
    assert s["ms"] == pytest.approx(0.3) and s["launches"] == 1.5
    assert s["categories"]["gemm"] == pytest.approx([0.2, 1.0])
    assert s["kernels"]["k2", "copy"] == pytest.approx([0.1, 0.5])


def test_listed_as_a_benchmark() -> None:
    assert "profile" in cli.available() and "kernel category" in cli.KNOWN["profile"]


def test_tiny_cpu_run(tmp_path, capsys) -> None:
    assert bp.run(parse(*ARGV, "--out", str(tmp_path), "--trace", str(tmp_path / "tr"))) == 0
    trace = json.loads((tmp_path / "tr" / "decode_1x32.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    with open(tmp_path / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    by_point: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_point[r["point"]].append(r)
    assert list(by_point) == ["decode 1x32", "decode 2x64", "prefill 64"]
    for point, rs in by_point.items():
        total = [r for r in rs if r["category"] == "total"]
        assert len(total) == 1, point
        assert float(total[0]["wall_ms"]) > 0 and float(total[0]["launches_per_step"]) > 0
        cats = [r for r in rs if r["category"] != "total"]
        assert {r["category"] for r in cats} <= set(bp.CATEGORY_NAMES)
        assert sum(float(r["share"]) for r in cats) == pytest.approx(1.0, abs=1e-6)
        assert sum(float(r["ms_per_step"]) for r in cats) == pytest.approx(
            float(total[0]["ms_per_step"]), rel=1e-6)
        # the model's matmuls and attention are there, from CPU op self time
        assert {"gemm", "attention"} <= {r["category"] for r in cats}, point
    md = (tmp_path / "profile.md").read_text()
    assert "Top 15 CPU ops, prefill 64" in md and "aten::mm" in md
    assert (tmp_path / "profile.png").stat().st_size > 0

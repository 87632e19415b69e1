"""`bench transfer` on CPU: UCX over loopback, two processes, concurrent requests, the fit
columns and the two-panel plot."""

import argparse
import csv

import pytest
import torch

from pdserve.benchmarks import transfer
from pdserve.benchmarks.transfer_fit import fit_line
from pdserve.benchmarks.transfer_peer import GEOMETRIES, checksum, make_pool
from pdserve.benchmarks.transfer_plot import plot_transfer

PNG = b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    transfer.add_arguments(p)
    return p.parse_args(list(argv))


def _rows():
    rows = [{"input_len": n, "bytes": n * 4096, "p50_ms": 0.2 + n * 4096 / 20e9 * 1e3,
             "baseline_p50_ms": 0.1 + n * 4096 / 25e9 * 1e3} for n in (128, 512, 2048, 8192)]
    for r in rows:
        r["ratio"] = r["baseline_p50_ms"] / r["p50_ms"]
    return rows


def test_checksum_sees_block_order_and_content():
    pool = make_pool(GEOMETRIES["tiny"], 16, 8, torch.device("cpu"), seed=0)
    assert checksum(pool, [1, 2]) != checksum(pool, [2, 1])
    before = checksum(pool, [3])
    pool[1][3].view(-1)[0] += 1  # one element of one layer
    assert checksum(pool, [3]) != before


def test_fit_columns_and_lines(tmp_path):
    rows = _rows()
    fit, raw_fit = transfer.add_fits(rows, phys_gbps=None)
    assert fit.gbps == pytest.approx(20, rel=1e-6) and fit.fixed_us == pytest.approx(200, rel=1e-6)
    assert raw_fit.gbps == pytest.approx(25, rel=1e-6)
    assert all(r["in_fit"] == "yes" and abs(r["resid_pct"]) < 1e-6 for r in rows)
    assert all(r["phys_ms"] != r["phys_ms"] for r in rows)  # nan: no physical line
    lines = transfer.summary_lines("ucx", fit, raw_fit, None, "no physical line on cpu")
    assert lines[0].startswith("fit pdserve: time = 200.0 us + bytes / (20 GB/s)")
    assert "no physical line on cpu" in lines
    rows_gpu = _rows()
    transfer.add_fits(rows_gpu, phys_gbps=40.0)
    assert rows_gpu[0]["phys_ms"] == pytest.approx(128 * 4096 / 40e9 * 1e3)


@pytest.mark.parametrize("phys", [None, 40.0])
def test_plot_written(tmp_path, phys):
    rows = _rows()
    nb = [r["bytes"] for r in rows]
    fit = fit_line(nb, [r["p50_ms"] / 1e3 for r in rows])
    raw = fit_line(nb, [r["baseline_p50_ms"] / 1e3 for r in rows])
    path = plot_transfer(str(tmp_path / "t.png"), rows, fit, raw, phys, "title", "raw ucx")
    assert path is not None
    with open(path, "rb") as f:
        assert f.read(8) == PNG


@pytest.mark.parametrize("peer_copy", [True, False])
def test_concurrent_requests_end_to_end_on_cpu(tmp_path, capsys, peer_copy):
    """Peer copy (shared memory on CPU) by default, the backend with --no-peer-copy; the
    clock from finish() (start() ahead, the default) with peer copy, from start() (called
    with finish()) without."""
    pytest.importorskip("ucxx")
    args = _args("--backend", "ucx", "--device", "cpu", "--geometry", "tiny",
                 "--input-lens", "64,256,1024", "--concurrency", "3", "--iters", "2",
                 "--warmup", "1", "--out", str(tmp_path),
                 *([] if peer_copy else ["--no-peer-copy", "--start", "with-finish"]))
    assert transfer.run(args) == 0  # 0: every request of every length verified
    out = capsys.readouterr().out
    assert "fit pdserve: time =" in out and "fit raw ucx: time =" in out
    clock = "finish()" if peer_copy else "start()"
    assert f"fit pdserve rx ({clock} -> the receiver's result): time =" in out
    assert "no physical line on cpu" in out
    stem = tmp_path / ("transfer_ucx_cpu_tiny_peercopy_c3" if peer_copy
                       else "transfer_ucx_cpu_tiny_c3_startclock")
    with open(f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["input_len"]) for r in rows] == [64, 256, 1024]
    one_block = 2 * 2 * 16 * 2 * 16 * 4  # layers x (k, v) x block x heads x dim x fp32
    for r in rows:
        n_blocks = -(-int(r["input_len"]) // 16)
        assert int(r["bytes"]) == 3 * n_blocks * one_block  # all three requests' bytes
        assert r["verified"] == "True" and int(r["concurrency"]) == 3
        assert r["via"] == ("peer_copy" if peer_copy else "ucx")
        assert float(r["fit_ms"]) >= 0 and r["in_fit"] in ("yes", "no")
        assert float(r["baseline1_gbps"]) > 0 and float(r["ratio1"]) > 0
        # start() -> the receiver's own result, on the host's one monotonic clock
        assert 0 < float(r["rx_p50_ms"]) < 60_000
        assert float(r["rx_ratio"]) == pytest.approx(
            float(r["baseline_p50_ms"]) / float(r["rx_p50_ms"]), rel=1e-3)
    md = open(f"{stem}.md").read()
    assert "| phys_ms | concurrency | baseline1_gbps | ratio1 |" in md
    assert "fit pdserve" in md and "3 requests at once" in md
    with open(f"{stem}.png", "rb") as f:
        assert f.read(8) == PNG

"""`pdserve bench coordinator`: argument handling, CPU accounting and summary math on
synthetic numbers (no timing assertions, no processes started)."""

from __future__ import annotations

import argparse
import math
import os

import pytest

from pdserve.benchmarks import coordinator as bc
from pdserve.benchmarks import cpu_sample
from pdserve.benchmarks.fake_workers import FakeWorker, apply_command


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bc.add_arguments(p)
    return p.parse_args(list(argv))


def test_defaults_cover_the_design_grid() -> None:
    args = parse()
    assert args.tokens_per_msg == [1, 4, 16, 64]
    assert args.mode == ["pd"] and args.streams == [16, 64, 256]
    assert bc.check_args(args) is None


@pytest.mark.parametrize("argv", [["--streams", "0"], ["--streams", "a,b"], ["--tokens-per-msg", ""],
                                  ["--mode", "pd,colocated"]])
def test_bad_lists_are_rejected(argv) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


@pytest.mark.parametrize(("argv", "word"), [
    (["--output-len", "1"], "--output-len"), (["--duration", "0"], "--duration"),
    (["--streams", "4,8", "--client-procs", "5"], "--client-procs"),
])
def test_check_args(argv, word) -> None:
    assert word in bc.check_args(parse(*argv))


def test_split_streams_over_processes() -> None:
    assert bc._split(10, 3) == [4, 3, 3] and sum(bc._split(256, 7)) == 256


def test_summarize_rates_and_target() -> None:
    clients = [{"tokens": 240_000, "msgs": 15_000, "done": 200, "errors": 0},
               {"tokens": 60_000, "msgs": 5_000, "done": 40, "errors": 1}]
    cpu = {"coordinator": 0.75, "workers": 0.5, "clients": 0.4, "other": 0.2}
    r = bc.summarize("pd", 64, 16, clients, window_s=2.0, cpu=cpu)
    assert r["tokens_per_s"] == 150_000 and r["client_msgs_per_s"] == 10_000
    assert r["tok_per_client_msg"] == 15.0 and r["requests_per_s"] == 120 and r["errors"] == 1
    assert r["tok_per_coord_cpu_s"] == pytest.approx(200_000)
    assert r["meets_target"] is True and r["other_cpu"] == 0.2
    slow = bc.summarize("pd", 64, 1, [{"tokens": 10, "msgs": 0, "done": 0, "errors": 0}], 2.0, {})
    assert slow["meets_target"] is False and slow["tok_per_client_msg"] == 0.0
    assert math.isnan(slow["tok_per_coord_cpu_s"])
    assert bc.best_row([r, slow]) is r and bc.best_row([]) is None


def test_cpu_usage_splits_the_machine() -> None:
    a = cpu_sample.CpuSample(t=10.0, system=100.0, procs={"coordinator": 5.0, "clients": 1.0})
    b = cpu_sample.CpuSample(t=12.0, system=103.6, procs={"coordinator": 6.5, "clients": 1.6})
    use = cpu_sample.cpu_usage(a, b)
    assert use["coordinator"] == pytest.approx(0.75) and use["clients"] == pytest.approx(0.3)
    assert use["other"] == pytest.approx(1.8 - 1.05)
    assert cpu_sample.cpu_usage(b, b)["other"] == 0.0


def test_proc_accounting_reads_this_process() -> None:
    assert cpu_sample.proc_cpu_s(os.getpid()) > 0 and cpu_sample.system_busy_s() > 0
    assert cpu_sample.proc_cpu_s(2**22 + 12345) == 0.0  # no such pid


def test_write_results(tmp_path) -> None:
    args = parse("--streams", "8", "--tokens-per-msg", "1,16")
    rows = [bc.summarize("pd", 8, k, [{"tokens": 1000 * k, "msgs": 1000, "done": 1, "errors": 0}],
                         1.0, {"coordinator": 0.5}) for k in (1, 16)]
    meta = {"device": "test cpu, nproc 2", "date": "2026-01-01T00:00:00", "commit": "abc"}
    paths = bc.write_results(str(tmp_path), rows, meta, args)
    names = {os.path.basename(p) for p in paths}
    assert {"coordinator.csv", "coordinator.md"} <= names
    md = (tmp_path / "coordinator.md").read_text()
    assert "test cpu, nproc 2" in md and "NOT met" in md and "| pd | 8 | 16 |" in md
    assert (tmp_path / "coordinator.csv").read_text().startswith("mode,streams,tokens_per_msg,")


def test_fake_workers_commands() -> None:
    ws = [FakeWorker("decode"), FakeWorker("prefill")]
    assert apply_command("chunk_tokens 16", ws) == "ok"
    assert all(w.knobs.chunk_tokens == 16 for w in ws)
    assert apply_command("chunk_delay_s 0.5", ws) == "ok" and ws[0].knobs.chunk_delay_s == 0.5
    assert apply_command("chunk_tokens 0", ws).startswith("error")
    assert apply_command("chunk_tokens x", ws).startswith("error")
    assert apply_command("explode now", ws).startswith("error")

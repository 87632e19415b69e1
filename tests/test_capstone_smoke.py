"""`pdserve bench capstone` end to end, checking the report's structure (files, JSON fields,
markdown sections), never its numbers: against the in-process fake cluster (gRPC and the
OpenAI-compatible gateway through --base-url), and a CPU smoke run that launches the
`tiny` model's workers through LocalCluster."""

from __future__ import annotations

import argparse
import json

import pytest
from fake_worker import Cluster, LoopThread

from pdserve.benchmarks import capstone
from pdserve.benchmarks import cli as bench_cli

VLLM_FIELDS = ["request_throughput", "request_goodput", "output_throughput",
               "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
               "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
               "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "completed",
               "duration", "total_input_tokens", "total_output_tokens"]
SECTIONS = ["## Setup", "## Workloads", "## Measurement window", "## Results",
            "## Max rate at target attainment", "## Where P/D wins and loses", "## Plots",
            "## GPU utilization", "## Calibration and planner"]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    capstone.add_arguments(p)
    return p.parse_args(list(argv))


def test_args_and_setups() -> None:
    a = parse("--configs", "1P3D,2P2D", "--configs", "3P1D,4both")
    assert capstone.setups_of(a) == ["1P3D", "2P2D", "3P1D", "4both"]
    assert capstone.setups_of(parse()) == ["1P1D", "2both"]
    assert capstone.setups_of(parse("--base-url", "http://x:1")) == ["external"]
    with pytest.raises(SystemExit):
        parse("--configs", "1P0D")
    assert "--goodput" in capstone.check_args(parse("--goodput", "itl:5"))
    assert "sharegpt" in capstone.check_args(parse("--dataset", "other", "x.json"))
    assert "at most one" in capstone.check_args(parse("--coordinator", "h:1", "--base-url", "u"))
    assert capstone.check_args(parse("--concurrency", "1,4")) is None
    assert "capstone" in bench_cli.available()
    assert "plan" not in bench_cli.available()


def check_report(out, setups: list[str], searched: bool = True) -> dict:
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "calibration.json", "report.md", "goodput_vs_rate.png"} <= names
    assert {p.name for p in (out / "w0").iterdir()} == {"cdf.png", "slo_map.png"}
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # what the device tool returns
    res = json.loads((out / "results.json").read_text())
    assert [s["setup"] for s in res["setups"]] == setups
    assert res["runs"] and all(f in r for r in res["runs"] for f in VLLM_FIELDS)
    assert {"warmup", "cooldown", "describe"} <= set(res["window"])
    for s in res["setups"]:
        for w in s["by_workload"].values():
            assert ("max_rate" in w and w["search_runs"]) if searched else True
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["format"] == "pdserve-calibration/1"
    assert {"prefill", "decode", "transfer", "kv_bytes_per_token", "source"} <= set(cal)
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    assert "ramp-up" in md
    return res


def fake_cluster(http: bool = False):
    lt = LoopThread()
    cluster = Cluster(lt, **({"http_port": 0} if http else {}))
    cluster.add("prefill")
    cluster.add("decode")
    return lt, cluster


FAST = ["--workload", "uniform:in=4-12,out=3-6", "--num-requests", "10", "--max-runs", "2",
        "--start-rate", "50", "--warmup-requests", "1", "--timeout", "20"]


def test_capstone_against_fake_coordinator(tmp_path) -> None:
    from pdserve.benchmarks.capstone_calibration import Calibration

    guide = Calibration(prefill={"c0": 5.0, "c_token": 0.5, "c_token2": 0.0})
    guide.save(str(tmp_path / "guide.json"))
    out = tmp_path / "out"
    lt, cluster = fake_cluster()
    try:
        # the searches steered by a planner prediction, and the warm-up burst before them
        rc = capstone.run(parse("--coordinator", cluster.address, *FAST, "--out", str(out),
                                "--start-rate-from", str(tmp_path / "guide.json"),
                                "--warmup-burst", "2", "--load-procs", "2"))
    finally:
        cluster.stop()
        lt.close()
    assert rc == 0
    tmp_path = out
    res = check_report(tmp_path, ["1P1D"])
    md = (tmp_path / "report.md").read_text()
    assert "Planner validation" in md and "band_5%" in md
    assert len(res["runs"]) == 2
    assert res["meta"]["load processes"] == "2"
    assert [r["prompt_salt"] for r in res["runs"]] == [1, 2]  # each run cold: its own prompts
    (w,) = res["setups"][0]["by_workload"].values()
    assert w["search_guess"] > 0 and "steered by a predicted" in w["search"]
    assert "--start-rate-from" in capstone.check_args(parse("--start-rate-from", "/no/such"))
    # the report again from what the run recorded, per-request data included
    again = tmp_path / "again"
    assert capstone.run(parse("--report-from", str(tmp_path), "--out", str(again))) == 0
    md = (again / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    assert "from results.json and requests.json.gz" in md
    assert "not recorded" not in md  # every section had its data


def test_capstone_base_url_fixed_concurrency(tmp_path) -> None:
    lt, cluster = fake_cluster(http=True)
    try:
        url = "http://" + cluster.coord.http_address
        rc = capstone.run(parse("--base-url", url, *FAST, "--concurrency", "1,4",
                                "--load-procs", "2", "--out", str(tmp_path)))
    finally:
        cluster.stop()
        lt.close()
    assert rc == 0
    res = check_report(tmp_path, ["external"], searched=False)
    assert [r["max_concurrency"] for r in res["runs"]] == [1, 4]
    assert all(r["completed"] > 0 for r in res["runs"])


def test_capstone_cpu_smoke_tiny_model(tmp_path) -> None:
    """The real thing on CPU: tiny model, 1P1D-cond20 (2 workers; the coordinator prefills
    prompts under 20 tokens on the decode worker, the rest go P/D), a few requests over 2 s
    (so the heartbeat records, every 1 s, hold at least two per worker)."""
    rc = capstone.run(parse("--configs", "1P1D-cond20", "--devices", "cpu", "--model", "tiny",
                            "--workload", "uniform:in=8-32,out=4-8", "--num-requests", "8",
                            "--run-duration", "2", "--max-runs", "1", "--start-rate", "8",
                            "--warmup-requests", "1", "--timeout", "60",
                            "--start-timeout", "120", "--extrapolate", "8",
                            "--transfer-lens", "64,1024", "--transfer-iters", "2",
                            "--transfer-max-s", "240", "--out", str(tmp_path)))
    assert rc == 0
    res = check_report(tmp_path, ["1P1D-cond20"])
    check_transfer_step(res, tmp_path)
    assert "transfer.png" in {p.name for p in tmp_path.iterdir()}
    (run,) = res["runs"]
    assert run["mean_transfer_ms"] is not None  # the long prompts were disaggregated
    assert 0 < run["local_prefill_fraction"] < 1  # and the short ones prefilled on D
    assert run["num_prompts"] >= 8 and run["steady_throughput"] is not None
    # the coordinator launched here and this process (the load generator) did work in it
    assert run["cpu_cores"]["coordinator"] > 0 and run["cpu_cores"]["harness"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "no GPU" in md and "## The questions, answered from the measurements" in md
    assert "### Transfer" in md and "prefilled on their decode worker" in md
    assert "### Extrapolation" in md and "Assumptions when extrapolating" in md
    check_heartbeats(tmp_path, {"prefill", "decode"})
    assert "Heartbeats: 1 of 1 runs replay" in md  # the validation used them


def check_transfer_step(res: dict, out) -> None:
    """The dedicated transfer step ran before the setup, on its prefill and decode devices
    with the model's KV geometry: `bench transfer`'s rows in results.json, and the report's
    transfer section answers from them first, the serving tail second."""
    st = res["transfer_step"]
    assert (st["sender"], st["receiver"], st["backend"]) == ("cpu", "cpu", "ucx")
    assert st["geometry"] == "2x2x16:float32" and st["note"] == ""
    assert [r["input_len"] for r in st["rows"]] == [64, 1024]
    for r in st["rows"]:
        assert r["verified"] is True and r["via"]
        assert min(r["p50_ms"], r["rx_p50_ms"], r["baseline_p50_ms"]) > 0
        assert {"ratio", "rx_ratio", "bytes"} <= set(r)
    assert st["rows"][1]["bytes"] == 16 * st["rows"][0]["bytes"]  # whole blocks of 16
    md = (out / "report.md").read_text()
    sec = md[md.index("### Transfer"):md.index("### GPU utilization per pool")]
    assert sec.index("**Dedicated measurement**") < sec.index("**Serving: the part of the "
                                                              "transfer not hidden")
    for part in ("| input_len | MB | rx_p50_ms |", "- Linear in input length? The receiver "
                 "side", "- The raw ucx send of the same bytes", "- What sets the bandwidth:"):
        assert part in sec, part


def check_heartbeats(out, roles: set[str]) -> None:
    """requests.json.gz holds, per run, when the coordinator received each worker's
    heartbeats (benchmarks/capstone_heartbeats.py), on the per-request records' clock."""
    import gzip

    from pdserve.benchmarks.capstone_heartbeats import MARGIN_AFTER_S, MARGIN_BEFORE_S

    with gzip.open(out / "requests.json.gz", "rt") as f:
        doc = json.load(f)
    assert doc["runs"] and set(doc["heartbeats"]) == set(doc["runs"])
    for key, rec in doc["heartbeats"].items():
        reqs = doc["runs"][key]
        end = max(c[0] for r in reqs for c in r["chunks"])
        assert 0 < rec["poll_s"] < 1
        assert {w["role"] for w in rec["workers"].values()} == roles
        # the workers the requests went to are the ones recorded
        assert {r["server"]["decode_worker"] for r in reqs if r["server"]} <= set(rec["workers"])
        # the wait in front of the coordinator's handler, on one host's clocks
        assert all(-5 <= r["server"]["accept_ms"] < 60e3 for r in reqs if r["server"])
        for wid, w in rec["workers"].items():
            ts = [b[0] for b in w["beats"]]
            assert len(ts) >= 2 and ts == sorted(ts), (wid, ts)
            assert -MARGIN_BEFORE_S - 1 <= ts[0] and ts[-1] <= end + MARGIN_AFTER_S + 1
            gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
            assert 0.5 < gaps[len(gaps) // 2] < 2.5, gaps  # every heartbeat_s (1 s)
            for _, half_width, free, running, waiting, queued in w["beats"]:
                assert 0 <= half_width < 0.5 and free > 0
                assert min(running, waiting, queued) >= 0


@pytest.mark.slow
def test_capstone_cpu_conditional_and_colocated(tmp_path) -> None:
    """Conditional disaggregation (the coordinator prefills prompts under 20 tokens on the
    decode worker) and a colocated setup on CPU: the report compares the three kinds."""
    rc = capstone.run(parse("--configs", "1P1D,1both,1P1D-cond20", "--devices", "cpu",
                            "--workload", "uniform:in=8-32,out=4-8", "--num-requests", "10",
                            "--max-runs", "1", "--start-rate", "8", "--warmup-requests", "1",
                            "--timeout", "60", "--start-timeout", "120", "--out", str(tmp_path)))
    assert rc == 0
    check_report(tmp_path, ["1P1D", "1both", "1P1D-cond20"])
    md = (tmp_path / "report.md").read_text()
    assert "conditional 1P1D-cond20" in md
    assert "Planner validation" in md

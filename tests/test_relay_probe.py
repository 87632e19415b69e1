"""The capstone's relay probe (capstone_relay_probe.py): the host path's costs below its
knee from closed-loop cells of `bench coordinator`, and where they go (calibration.json
"relay_host", the predictions a plan check makes)."""

from __future__ import annotations

import argparse

import pytest

from pdserve.benchmarks import capstone_guess
from pdserve.benchmarks import capstone_relay_probe as probe
from pdserve.benchmarks.capstone_budget import Budget
from pdserve.benchmarks.capstone_calibration import Calibration

COSTS = {"t_tok": 0.05, "t_req_pd": 4.0, "t_req_local": 1.0}  # ms


def _cell(mode: str, out_len: int) -> dict:
    """A closed-loop cell of a relay at COSTS, busy all through: requests of out_len tokens
    (one message each, and the final one)."""
    per_req = (out_len + 1) * COSTS["t_tok"] + COSTS["t_req_pd" if mode == "pd" else "t_req_local"]
    req_s = 1e3 / per_req
    return {"mode": mode, "output_len": out_len, "requests_per_s": req_s,
            "client_msgs_per_s": req_s * (out_len + 1)}


def test_fit_recovers_the_costs_of_a_busy_relay() -> None:
    rows = [_cell(m, n) for m in ("pd", "both") for n in probe.LENS]
    got = probe.fit(rows)
    assert got == pytest.approx(COSTS, rel=1e-6)
    with pytest.raises(ValueError):
        probe.fit([r for r in rows if r["mode"] == "pd"])  # no local set-up measured


def test_probed_relay_goes_to_the_calibration_with_its_source() -> None:
    rec = {"rows": [_cell(m, n) for m in ("pd", "both") for n in probe.LENS],
           "streams": probe.STREAMS}
    rec["fit"] = probe.fit(rec["rows"])
    cal = Calibration()
    probe.probed_relay(cal, rec)
    assert cal.relay_host == pytest.approx(COSTS) and "probed on this host" in cal.source["relay_host"]
    assert "50 us a token message" in cal.source["relay_host"]
    other = Calibration()
    probe.probed_relay(other, {"rows": [], "fit": {}, "note": "failed: x"})
    probe.probed_relay(other, None)
    assert other.relay_host == {} and "relay_host" not in other.source


def test_the_probe_runs_only_when_asked_and_on_a_server_it_launches() -> None:
    args = argparse.Namespace(relay_probe=False, relay_probe_s=3.0, coordinator=None, base_url=None)
    assert probe.run_step(args, Budget(0)) is None
    args.relay_probe, args.coordinator = True, "127.0.0.1:1"
    rec = probe.run_step(args, Budget(0))
    assert rec["fit"] == {} and "did not launch" in rec["note"]
    args.coordinator = None
    rec = probe.run_step(args, Budget(30))  # 15% of 30 s: too little
    assert rec["fit"] == {} and rec["note"].startswith("skipped")
    args.relay_probe_s = 0
    assert "--relay-probe-s" in probe.check(args)


def test_a_plan_check_predicts_with_the_host_probed_now(monkeypatch, tmp_path) -> None:
    Calibration(relay=dict(COSTS)).save(str(tmp_path / "calibration.json"))
    seen = []
    monkeypatch.setattr("pdserve.benchmarks.plan.guess_max_rates",
                        lambda cal, *a, **k: seen.append(cal) or {})
    args = argparse.Namespace(plan_check_from=str(tmp_path), num_requests=16, seed=0,
                              run_duration=5.0, burstiness=1.0, target=0.9, coordinator=None,
                              base_url=None, worker_arg=[],
                              relay_host={"t_tok": 0.01, "t_req_pd": 1.0, "t_req_local": 0.5})
    capstone_guess.start_guesses(args, ["1P1D"], [], {"ttft": 500.0})
    assert seen[0].relay == COSTS and seen[0].relay_host == args.relay_host
    assert seen[0].source["relay_host"].startswith("probed on this host")


@pytest.mark.slow
def test_the_probe_measures_this_host() -> None:
    """The real cells on this machine (a coordinator, fake workers in 4 processes per mode,
    one client): every cell without errors, and costs that carry what the cells carried."""
    args = argparse.Namespace(relay_probe=True, relay_probe_s=1.0, coordinator=None, base_url=None)
    rec = probe.run_step(args, Budget(0))
    assert rec["note"] == "" and len(rec["rows"]) == 2 * len(probe.LENS)
    assert all(r["errors"] == 0 and r["client_msgs_per_s"] > 0 for r in rec["rows"])
    f = rec["fit"]
    assert f["t_tok"] > 0 and f["t_req_pd"] + f["t_req_local"] > 0


def test_fake_workers_kv_elsewhere_serve_pd_across_processes(make_cluster) -> None:
    """The probe's fake P/D workers live in separate processes, where a prefill cannot hand
    KV to its decode worker: with `kv_elsewhere` an endpoint no worker of this process holds
    counts as reached and the KV as landed at Reserve, so P/D requests stream their tokens
    and free every block."""
    from fake_worker import Knobs, assert_no_leaks, fake_outputs

    from pdserve.coordinator.client import Client

    c = make_cluster()
    c.add("prefill", knobs=Knobs(kv_elsewhere=True))
    # an endpoint nobody in this process holds, as a decode worker of another process
    c.add("decode", knobs=Knobs(kv_elsewhere=True, bad_kv_address=True))
    with Client(c.address, timeout_s=10) as cl:
        for i in range(4):
            r = cl.generate(prompt_token_ids=[i + 1], max_tokens=5)
            assert r.token_ids == fake_outputs([i + 1], 5)[0]
        assert cl.stats()["requests_failed"] == 0
    assert_no_leaks(c)

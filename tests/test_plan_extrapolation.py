"""The extrapolation table: N / g replicas of each measured setup, and with a relay profile
how many coordinators the predicted rate needs."""

from types import SimpleNamespace

import pytest

from pdserve.benchmarks.plan_report import (
    extrapolation_lines,
    host_path_busy,
    mean_out_tokens,
    relays_needed,
)

RELAY = {"t_tok": 0.05, "t_req_pd": 5.0, "t_req_local": 1.0}  # ms
SEARCH = [{"setup": "1P1D", "workload": "w", "predicted_max_rate": 40.0,
           "measured_max_rate": 36.0},
          {"setup": "2both", "workload": "w", "predicted_max_rate": 30.0,
           "measured_max_rate": 30.0}]


def test_relays_needed_counts_tokens_and_set_ups_by_kind():
    # 100 req/s of 200 tokens: 100 x (200 x 0.05 + 5) ms = 1.5 s a second for P/D: 2 relays
    assert relays_needed(100.0, 200.0, "1P1D", RELAY) == 2
    assert relays_needed(100.0, 200.0, "2both", RELAY) == 2  # 1.1 s a second
    assert relays_needed(80.0, 200.0, "2both", RELAY) == 1  # 0.88 s a second
    assert relays_needed(0.5, 10.0, "1P1D", RELAY) == 1  # at least one


def test_host_path_busy_is_the_share_of_one_relay():
    assert host_path_busy(100.0, 200.0, "1P1D", RELAY) == 1.5  # tokens 1.0 s + set-ups 0.5 s
    assert host_path_busy(80.0, 200.0, "2both", RELAY) == 0.88  # local set-ups, 1 ms each
    # a conditional setup is costed as P/D (its long prompts are)
    assert host_path_busy(100.0, 200.0, "1P1D-cond512", RELAY) == 1.5
    # workers streaming 4 tokens a message after the first: 2 + 198 / 4 = 51.5 messages
    assert host_path_busy(100.0, 200.0, "1P1D", RELAY, every=4) == pytest.approx(
        100 * (51.5 * RELAY["t_tok"] + RELAY["t_req_pd"]) / 1e3)


def test_extrapolation_adds_coordinators_only_with_a_relay_profile():
    with_relay = "\n".join(extrapolation_lines(SEARCH, [8], "Assumptions.", RELAY, {"w": 200.0}))
    assert "| 4 x 1P1D | 160 | 144 | 3 |" in with_relay  # 160 x 15 ms = 2.4 s a second
    assert "| 4 x 2both | 120 | 120 | 2 |" in with_relay  # 120 x 11 ms = 1.32 s a second
    assert "coordinators: how many coordinator processes" in with_relay
    plain = "\n".join(extrapolation_lines(SEARCH, [8], "Assumptions."))
    assert "coordinators" not in plain and "| 4 x 1P1D | 160 | 144 |" in plain


def test_mean_out_tokens_reads_the_recorded_requests():
    run = SimpleNamespace(results=[SimpleNamespace(target_tokens=t) for t in (100, 300)])
    setup = SimpleNamespace(by_workload={"w": SimpleNamespace(runs=[run]),
                                         "empty": SimpleNamespace(runs=[])})
    assert mean_out_tokens([setup]) == {"w": 200.0}

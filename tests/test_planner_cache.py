"""The planner's replay of what a capstone sweep does between runs and across workers:
prefix caches kept from run to run, the cold prefill profile (with its knee) fitted
without the resent prompts, and colocated routing on heartbeat snapshots."""

from __future__ import annotations

import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.planner_cache import PrefixCaches
from pdserve.benchmarks.planner_sim import SimRun, simulate

CAL = calib.Calibration(prefill={"c0": 10.0, "c_token": 0.1, "c_token2": 0.0},
                        decode={"c0": 10.0, "c_seq": 0.2, "c_ctx_token": 0.0},
                        transfer={"c0": 1.0, "ms_per_byte": 1e-6}, kv_bytes_per_token=1000.0,
                        max_batch=64, prefill_token_budget=2048)


def test_prefix_cache_hits_full_blocks_short_of_the_end_and_evicts_lru() -> None:
    c = PrefixCaches(capacity_tokens=300)
    assert c.hit_tokens("p", "a", 100) == 0  # nothing held yet
    c.add("p", "a", 100)
    assert c.hit_tokens("p", "a", 100) == 96  # 6 full blocks; the last token is computed
    assert c.hit_tokens("p", "a", 97) == 96 and c.hit_tokens("p", "a", 96) == 80
    assert c.hit_tokens("q", "a", 100) == 0  # another worker's cache
    assert c.hit_tokens("p", None, 100) == 0  # an unnamed prompt never hits
    c.add("p", "b", 150)
    c.hit_tokens("p", "a", 100)  # a is now the most recently used
    c.add("p", "c", 150)  # over 300 tokens: b (least recently used) goes
    assert c.hit_tokens("p", "b", 150) == 0 and c.hit_tokens("p", "a", 100) > 0
    d = c.copy()
    d.add("p", "e", 10)
    assert c.hit_tokens("p", "e", 10) == 0  # a copy is independent


def test_resent_prompts_hit_the_prefill_workers_cache_in_the_next_run() -> None:
    cal = CAL
    times = [0.05 * i for i in range(40)]
    lengths = [(1000 + 10 * i, 8) for i in range(40)]
    keys = [("w", i) for i in range(40)]
    caches = PrefixCaches()
    first, second, cold = SimRun(), SimRun(), SimRun()
    simulate(cal, 1, 1, 0, times, lengths, info=first, keys=keys, caches=caches)
    simulate(cal, 1, 1, 0, times, lengths, info=second, keys=keys, caches=caches)
    simulate(cal, 1, 1, 0, times, lengths, info=cold, keys=[("x", i) for i in range(40)],
             caches=caches)
    tokens = [sum(t for t, _ in r.prefill_steps) for r in (first, second, cold)]
    assert tokens[0] == sum(i for i, _ in lengths) == tokens[2]  # new prompts: computed whole
    assert tokens[1] <= 16 * 40  # resent: at most one block each


def test_warm_counts_follow_each_setup_and_workload_in_run_order() -> None:
    from pdserve.benchmarks.capstone_steps import warm_counts

    runs = [("A|w", [0] * 5), ("A|w", [0] * 8), ("A|v", [0] * 4), ("A|w", [0] * 6),
            ("B|w", [0] * 5)]
    assert warm_counts(runs) == [0, 5, 0, 6, 0]


def test_salted_runs_are_cold_and_older_runs_keep_their_warm_counts() -> None:
    from pdserve.benchmarks.capstone_steps import prompt_key, warm_counts

    old = [prompt_key("1P1D", "w", {}), prompt_key("1P1D", "w", {"prompt_salt": 0})]
    assert warm_counts([(k, [0] * 6) for k in old]) == [0, 6]
    salted = [prompt_key("1P1D", "w", {"prompt_salt": k}) for k in (1, 2, 3)]
    assert warm_counts([(k, [0] * 6) for k in salted]) == [0, 0, 0]


def test_prefill_fit_finds_the_knee_between_fixed_and_compute_bound_steps() -> None:
    steps = [(t, 0.0, max(15.0, 15.0 + 0.025 * (t - 600))) for t in range(50, 8200, 50)]
    prof, dropped = calib.fit_prefill_steps(steps)
    assert dropped == 0
    assert 400 <= prof["knee_tokens"] <= 800
    assert prof["c_token"] == pytest.approx(0.025, rel=0.1)
    cal = calib.Calibration(prefill=prof)
    assert cal.prefill_ms(100, 0.0) == pytest.approx(15.0, abs=4.0)  # knees: quantiles
    assert cal.prefill_ms(8000, 0.0) == pytest.approx(15.0 + 0.025 * 7400, rel=0.05)
    # scaling the profile scales times, not the knee
    assert cal.scaled(2.0).prefill["knee_tokens"] == prof["knee_tokens"]


def test_steps_with_resent_prompts_are_left_out_of_the_prefill_profile() -> None:
    from pdserve.benchmarks.capstone_steps import prefill_steps

    def req(t_send: float, prompt: int, ms: float) -> RequestResult:
        start = t_send + 0.001
        return RequestResult(t_send=t_send, prompt_tokens=prompt, target_tokens=2,
                             chunks=[(start + ms / 1e3, 1), (start + ms / 1e3 + 0.01, 1)],
                             server={"prefill_ms": ms, "prefill_worker": "p0",
                                     "decode_worker": "d0"})
    run = [req(0.1 * i, 1000, 40.0) for i in range(6)]
    assert len(prefill_steps(run)) == 6
    assert len(prefill_steps(run, warm=4)) == 2  # the first four resent earlier prompts


def test_colocated_requests_between_heartbeats_go_to_one_worker() -> None:
    # nothing is reserved on a colocated worker: until its next heartbeat the coordinator
    # sees the free blocks it last reported, so the requests of one interval share a worker
    caches = PrefixCaches()
    times = [0.9] + [1.01 + 0.01 * i for i in range(40)]  # heartbeats at 1.0 (both-0), 1.5
    lengths = [(2000, 400)] + [(100, 200)] * 40
    simulate(CAL, 0, 0, 2, times, lengths, keys=list(range(41)), caches=caches)
    assert set(caches.held["both-0"]) == {0}  # the long one, reported at 1.0 s
    assert set(caches.held["both-1"]) == set(range(1, 41))  # 4000 tokens, still unreported


def test_landed_requests_past_max_num_seqs_wait_newest_first() -> None:
    """engine/scheduler.py admit_remote: KV that lands while max_num_seqs run puts its
    request at the FRONT of the waiting queue, so the newest is admitted first and the
    oldest waits longest (what the 2 x H200 1P1D decode-heavy run at 103 req/s shows: some
    requests' token 1 waited seconds while later ones decoded at once)."""
    cal = calib.Calibration(prefill=CAL.prefill, decode=CAL.decode, transfer=CAL.transfer,
                            kv_bytes_per_token=1.0, max_batch=2, prefill_token_budget=2048)
    # two long requests fill the batch; three short ones land one after another meanwhile
    out = simulate(cal, 1, 1, 0, [0.0, 0.0, 0.1, 0.2, 0.3], [(100, 60)] * 2 + [(100, 5)] * 3)
    first, second, third = out[2:]
    assert all(r.landed < out[0].end for r in out[2:])  # all three landed while full
    assert third.end < first.end and second.end < first.end  # newest two ran first
    assert first.end > max(out[0].end, out[1].end) + 4 * cal.decode_step_ms(1, 100) / 1e3


def test_lookup_happens_when_the_scheduler_admits_the_prompt() -> None:
    """A prompt queued behind another finds only what that one's allocation left: with room
    for two 100-token prompts holding keys 1 and 2, admitting key 3 first evicts key 1 (the
    least recently freed), so key 1 then misses; admitted first, it hits."""
    from collections import deque

    from pdserve.benchmarks.planner_batching import SimReq, fill_budget

    def run(order: list[int]) -> dict[int, int]:
        caches = PrefixCaches(capacity_tokens=200, block_size=16)
        caches.add("w", 1, 100)
        caches.add("w", 2, 100)
        reqs = {k: SimReq(0.0, 100, 4, key=k) for k in order}
        fill_budget(1000, [], deque(reqs[k] for k in order), on_take=caches.admit("w"))
        return {k: r.computed for k, r in reqs.items()}

    assert run([3, 1]) == {3: 0, 1: 0}
    assert run([1, 3]) == {1: 96, 3: 0}


def test_pool_blocks_is_the_most_free_blocks_reported() -> None:
    from pdserve.benchmarks.capstone_heartbeats import pool_blocks

    rec = {"workers": {"p": {"beats": [[0.0, 0.1, 500, 0, 0, 0], [1.0, 0.1, 900, 0, 0, 0]]},
                       "d": {"beats": [[0.5, 0.1, 700, 2, 0, 0]]}}}
    assert pool_blocks([rec, None, {}]) == 900
    assert pool_blocks([None]) == 0

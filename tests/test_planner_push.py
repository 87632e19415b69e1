"""The planner's KV push (planner_setups.KVPush) against the engine's transfer modes: on one
host, a peer copy runs after the forward by default (kvtransfer/sender_direct.py,
TransferConfig.peer_copy_during_forward False); with --peer-copy-during-forward, or staged
through the backend, a step of >= layerwise_min_tokens pushes layer by layer from its
start. Runs recorded without the field (every capstone run before branch plan6) are read
as the old behaviour. Simulated times only: nothing here is timed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pdserve.benchmarks import capstone_calibration as calib
from pdserve.benchmarks import plan
from pdserve.benchmarks.capstone_guess import kv_push, kv_push_meta
from pdserve.benchmarks.planner_setups import LAYERWISE_MIN_TOKENS, KVPush, Setup
from pdserve.benchmarks.planner_sim import simulate

CAL = calib.Calibration(prefill={"c0": 10.0, "c_token": 0.1, "c_token2": 0.0},
                        decode={"c0": 10.0, "c_seq": 0.2, "c_ctx_token": 0.0},
                        transfer={"c0": 1.0, "ms_per_byte": 1e-6}, kv_bytes_per_token=1000.0,
                        max_batch=64, prefill_token_budget=4096)
OLD = KVPush()  # before 9df90d7: peer copies during the forward
AFTER = KVPush(during_forward=False)  # the engine's default since 9df90d7, one host
STAGED = KVPush(peer_copy=False, during_forward=False)  # across hosts: still layer-wise


def test_which_steps_push_layer_by_layer() -> None:
    big, small = LAYERWISE_MIN_TOKENS, LAYERWISE_MIN_TOKENS - 1
    assert OLD.layerwise(big) and not OLD.layerwise(small)
    assert not AFTER.layerwise(big) and not AFTER.layerwise(1 << 20)
    assert STAGED.layerwise(big) and not STAGED.layerwise(small)
    assert not KVPush(layerwise_min_tokens=0).layerwise(1 << 20)  # --no-layerwise


def _two_in_one_step(push: KVPush):
    # the first prompt has the worker to itself; the next two share a step of 2400 tokens
    # (layer-wise when the push allows it), and one decode worker's receiver
    return simulate(CAL, 1, 1, 0, [0.0] * 3, [(1200, 4)] * 3, push=push)


def test_a_peer_copy_after_the_forward_holds_the_receiver_only_after_the_step() -> None:
    fwd = CAL.prefill_ms(1200, 1200 ** 2) - CAL.prefill["c0"]  # a prompt's share of a step
    tail = CAL.transfer_ms(1200 * CAL.kv_bytes_per_token)
    old, after = _two_in_one_step(OLD), _two_in_one_step(AFTER)
    # token 0 leaves with the step in both: only the KV's way to the decode worker differs
    assert [r.first for r in old] == [r.first for r in after]
    step_end = old[1].first
    # layer-wise: the push began with the step and the receiver, one transfer at a time,
    # is held for each prompt's share of the forward: the third lands fwd + tail after
    # the second
    assert (old[2].landed - old[1].landed) * 1e3 == pytest.approx(fwd + tail)
    # after the forward: both pushes start at the step's end and queue for the tail only
    assert (after[1].landed - step_end) * 1e3 == pytest.approx(tail)
    assert (after[2].landed - after[1].landed) * 1e3 == pytest.approx(tail)
    assert after[2].landed < old[2].landed
    # staged transfers (another host) stay layer-wise, as before 9df90d7
    staged = _two_in_one_step(STAGED)
    assert [r.landed for r in staged] == pytest.approx([r.landed for r in old])


def test_a_layerwise_push_waits_for_the_receiver_from_the_steps_start() -> None:
    # a 100-token prompt (pushed after its step in every mode) keeps the receiver busy
    # past the start of the next step, a 1200-token one: layer-wise, that push queues
    # behind it from the step's start and then holds the receiver for its forward share;
    # after the forward, it starts at the step's end, when the receiver is free
    cal = dataclasses.replace(CAL, transfer={"c0": 30.0, "ms_per_byte": 0.0})
    first = cal.prefill_ms(100, 100 ** 2) / 1e3
    ls = [(100, 4), (1200, 4)]
    old = simulate(cal, 1, 1, 0, [0.0, first], ls, push=OLD)
    after = simulate(cal, 1, 1, 0, [0.0, first], ls, push=AFTER)
    end = after[1].first  # the second step's end (the same in both)
    assert old[1].first == end and old[0].landed == after[0].landed
    assert old[0].landed > first  # busy into the second step
    fwd = cal.prefill_ms(1200, 1200 ** 2) - cal.prefill["c0"]
    assert (after[1].landed - max(end, after[0].landed)) * 1e3 == pytest.approx(30.0)
    assert (old[1].landed - old[0].landed) * 1e3 == pytest.approx(fwd + 30.0)
    assert old[1].landed > after[1].landed


def test_steps_under_the_layerwise_threshold_do_not_depend_on_the_mode() -> None:
    # a loaded worker whose token budget keeps every step under the threshold
    cal = dataclasses.replace(CAL, prefill_token_budget=LAYERWISE_MIN_TOKENS - 24)
    times, ls = [i * 0.002 for i in range(30)], [(300 + 20 * i, 5) for i in range(30)]
    a = simulate(cal, 1, 2, 0, times, ls, push=OLD)
    b = simulate(cal, 1, 2, 0, times, ls, push=AFTER)
    assert [(r.first, r.landed, r.end) for r in a] == [(r.first, r.landed, r.end) for r in b]


def test_the_push_workers_use_from_their_flags() -> None:
    from pdserve.kvtransfer.common import TransferConfig

    cur = KVPush.current()
    assert cur.during_forward == TransferConfig().peer_copy_during_forward
    assert cur.peer_copy and cur.layerwise_min_tokens == TransferConfig().layerwise_min_tokens
    assert KVPush.current(["--peer-copy-during-forward", "--dtype", "x"]).during_forward
    assert not KVPush.current(["--no-peer-copy"]).peer_copy
    assert not KVPush.current(one_host=False).peer_copy
    assert KVPush.current(["--layerwise-min-tokens=2048"]).layerwise_min_tokens == 2048
    assert KVPush.current(["--no-layerwise"]).layerwise_min_tokens == 0
    # the capstone: workers it starts (one host), none for a server it measures
    import argparse

    ns = argparse.Namespace(coordinator=None, base_url=None,
                            worker_arg=["--peer-copy-during-forward"])
    assert kv_push(ns) == KVPush.current(["--peer-copy-during-forward"])
    assert KVPush.from_meta(kv_push_meta(ns)) == kv_push(ns)
    assert kv_push_meta(argparse.Namespace(coordinator="h:1", base_url=None)) == {}


def _run_dir(d, run_meta: dict, cal_meta: dict) -> None:
    lengths = [[1500, 3], [300, 3]] * 4
    runs = [{"setup": "1P1D", "workload": "w", "request_rate": 5.0, "num_prompts": 8,
             "slo_attainment": 1.0, "request_goodput": 5.0}]
    doc = {"meta": run_meta, "slos": {"ttft": 500.0, "tpot": 50.0}, "target": 0.9,
           "seed": 0, "burstiness": 1.0, "num_prompts": 8,
           "search": {"start_rate": 5.0, "max_runs": 1, "rel_tol": 0.25},
           "window": {"warmup": 0.1, "cooldown": 0.1}, "runs": runs,
           "setups": [{"setup": "1P1D", "by_workload": {"w": {
               "max_rate": 5.0, "search_runs": [[5.0, 1.0]], "bracketed": False,
               "lengths": lengths}}}]}
    (d / "results.json").write_text(json.dumps(doc))
    dataclasses.replace(CAL, meta={"decode_fit": "token1", **cal_meta}).save(
        str(d / "calibration.json"))


@pytest.mark.parametrize("run_meta, cal_meta, during", [
    ({"device": "x"}, {}, True),  # every committed run: the old behaviour
    ({}, AFTER.meta(), False),  # results.json without it: its calibration's record
    (AFTER.meta(), {}, False),
    (OLD.meta(), AFTER.meta(), True),  # results.json first
])
def test_the_validation_simulates_the_push_the_run_recorded(tmp_path, monkeypatch, run_meta,
                                                           cal_meta, during) -> None:
    _run_dir(tmp_path, run_meta, cal_meta)
    cal = calib.Calibration.load(str(tmp_path / "calibration.json"))
    assert KVPush.from_meta(cal.meta).during_forward == ("peer_copy_during_forward"
                                                         not in cal_meta)
    seen: list[KVPush] = []
    real = plan.simulate_setup

    def spy(*a, **kw):
        seen.append(kw["push"] if "push" in kw else a[9])
        return real(*a, **kw)
    monkeypatch.setattr(plan, "simulate_setup", spy)
    with open(tmp_path / "results.json") as f:
        assert plan.run_push(str(tmp_path), json.load(f)).during_forward is during
    per_run, per_search = plan.validate(str(tmp_path))
    assert len(per_run) == 1 and len(per_search) == 1
    assert seen and all(p.during_forward is during for p in seen)  # runs, band and search
    assert ("during the forward" in plan.simulated_with(str(tmp_path))) is during


def new_plan_predict_kwargs(monkeypatch, key: str) -> list:
    """Run `pdserve plan` for 2 GPUs (P/D only); what each of its predict() calls got as
    `key`."""
    import argparse

    seen: list = []
    real = plan.predict

    def spy(*a, **kw):
        seen.append(kw[key])
        return real(*a, **kw)
    monkeypatch.setattr(plan, "predict", spy)
    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    args = p.parse_args(["--gpus", "2", "--num-requests", "20", "--duration", "1",
                         "--no-colocated"])
    assert plan.run(args) == 0
    return seen


def test_a_new_plan_uses_the_installed_defaults(monkeypatch, capsys) -> None:
    seen = new_plan_predict_kwargs(monkeypatch, "push")
    assert seen == [KVPush.current()] and Setup(1, 1, 0).kind == "P/D"
    assert KVPush.current().describe() in capsys.readouterr().out


def test_every_committed_capstone_run_reads_as_it_recorded_or_the_old_behaviour() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    dirs = sorted(p.parent for p in root.glob("capstone-*/results.json"))
    assert dirs
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        meta = plan._run_meta(str(d), res, "peer_copy_during_forward")
        want = KVPush.from_meta(meta) if "peer_copy_during_forward" in meta else OLD
        assert plan.run_push(str(d), res) == want, d
    # the runs of 530b4d8 recorded the push after the forward
    new = root / "capstone-4gpu-530b4d8"
    assert plan.run_push(str(new), json.loads((new / "results.json").read_text())) != OLD

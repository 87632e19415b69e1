"""engine/cpu_affinity.py: the cpulist parser, and that nothing is pinned without CUDA."""

from __future__ import annotations

import os

import torch

from pdserve.engine import cpu_affinity


def test_parse_cpulist_ranges_and_singles():
    assert cpu_affinity.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpu_affinity.parse_cpulist("5") == {5}
    assert cpu_affinity.parse_cpulist("") == set()


def test_no_pinning_for_a_cpu_device():
    before = os.sched_getaffinity(0)
    assert cpu_affinity.pin_to_gpu(torch.device("cpu")) is None
    assert os.sched_getaffinity(0) == before


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_CPU_AFFINITY", "off")
    before = os.sched_getaffinity(0)
    assert cpu_affinity.pin_to_gpu("cuda:0") is None
    assert os.sched_getaffinity(0) == before


def test_pins_to_the_local_cores_it_may_use(monkeypatch):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        import pytest
        pytest.skip("needs two usable cores")
    monkeypatch.setattr(cpu_affinity, "gpu_local_cores", lambda dev: {allowed[0], 10**6})
    calls = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cores: calls.append((tid, cores)))
    assert cpu_affinity.pin_to_gpu("cuda:0") == {allowed[0]}
    assert calls and all(cores == {allowed[0]} for _, cores in calls)

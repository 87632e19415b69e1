"""Advertised addresses: detection, the wildcard rules of WorkerConfig, the CLI flags."""

from __future__ import annotations

import argparse

import pytest

from pdserve import net, worker_cli
from pdserve.worker.config import WorkerConfig


def _detected() -> str:
    try:
        return net.detect_host()
    except OSError as e:
        pytest.skip(f"this machine has only loopback: {e}")


def test_detected_host_is_not_loopback():
    assert not net.is_loopback(_detected())


def test_advertise_host_rules():
    assert net.advertise_host("10.1.2.3", None) is None  # the listen address is advertised
    assert net.advertise_host("0.0.0.0", "10.9.9.9") == "10.9.9.9"
    assert net.advertise_host("0.0.0.0", None) == _detected()
    assert net.is_loopback("127.0.0.1") and net.is_loopback("localhost")


def test_worker_config_needs_a_reachable_advertised_host():
    assert WorkerConfig(role="decode", host="10.0.0.5").advertised_host == "10.0.0.5"
    cfg = WorkerConfig(role="decode", host="0.0.0.0", advertise_host="10.0.0.5")
    assert cfg.advertised_host == "10.0.0.5"
    with pytest.raises(ValueError, match="listens everywhere"):
        WorkerConfig(role="decode", host="0.0.0.0")
    with pytest.raises(ValueError, match="not reachable"):
        WorkerConfig(role="decode", host="10.0.0.5", advertise_host="0.0.0.0")


def test_worker_cli_advertises_what_it_is_told_or_detects():
    p = argparse.ArgumentParser()
    worker_cli.add_arguments(p)
    base = ["--role", "prefill"]
    cfg = worker_cli.config_from_args(p.parse_args(base + ["--host", "0.0.0.0",
                                                           "--advertise-host", "10.7.0.1"]))
    assert (cfg.host, cfg.advertised_host) == ("0.0.0.0", "10.7.0.1")
    detected = _detected()
    cfg = worker_cli.config_from_args(p.parse_args(base + ["--host", "0.0.0.0"]))
    assert cfg.advertised_host == detected
    cfg = worker_cli.config_from_args(p.parse_args(base))
    assert cfg.advertised_host == "127.0.0.1"  # one node: loopback stays the default

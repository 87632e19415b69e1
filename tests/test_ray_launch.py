"""`pdserve up --ray` on a local Ray cluster of two simulated nodes (a head and a second
raylet on this machine, ray.cluster_utils): prefill on the node with resource pool_p,
decode on the one with pool_d; outputs equal colocated; SIGKILL the prefill worker's actor
process and Ray restarts it, the worker registers again and serving goes on.
Skips without Ray (the `ray` extra)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etcd_server import free_port

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

from pdserve import LLM, SamplingParams  # noqa: E402
from pdserve.coordinator.client import Client  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5], list(range(1, 20)), [(7 * i) % 250 for i in range(60)]]
PLACED = re.compile(r"pdserve up: (\S+) on node (\S+) \((\S+)\) actor pid (\d+)")


def _wait_line(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the output of `up --ray`:\n{text[-4000:]}")


def test_up_ray_places_pools_and_survives_a_killed_worker(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "resources": {"pool_p": 2}, "include_dashboard": False})
    node_d = cluster.add_node(num_cpus=4, resources={"pool_d": 2})
    cluster.wait_for_nodes()
    port = free_port()
    log = tmp_path / "up.log"
    up = None
    try:
        with open(log, "wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "pdserve.cli", "up", "--ray", cluster.address,
                 "--model", "tiny", "--devices", "cpu", "--prefill", "1", "--decode", "1",
                 "--prefill-resource", "pool_p", "--decode-resource", "pool_d",
                 "--port", str(port), "--ready-timeout", "240"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        address = _wait_line(log, r"ready at (\S+)", up, 300)
        placed = {m[0]: (m[1], int(m[3])) for m in PLACED.findall(log.read_text())}
        assert placed["prefill-0"][0] == cluster.head_node.node_id
        assert placed["decode-0"][0] == node_d.node_id
        want = [o.token_ids for o in LLM(model="tiny").generate(PROMPTS,
                                                                 SamplingParams(**GREEDY))]
        with Client(address, timeout_s=60) as c:
            assert [c.generate(p, **GREEDY).token_ids for p in PROMPTS] == want
            before = {w["info"]["worker_id"]: w["info"]["address"] for w in c.list_workers()}
            os.kill(placed["prefill-0"][1], signal.SIGKILL)  # the actor's process
            end = time.monotonic() + 180
            while True:  # Ray restarts the actor; the worker registers again, elsewhere
                now = {w["info"]["worker_id"]: w["info"]["address"] for w in c.list_workers()}
                if now.get("prefill-0") not in (None, before["prefill-0"]):
                    break
                assert time.monotonic() < end, f"prefill-0 did not come back: {now}"
                time.sleep(0.5)
            assert [c.generate(p, **GREEDY).token_ids for p in PROMPTS] == want
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
        cluster.shutdown()

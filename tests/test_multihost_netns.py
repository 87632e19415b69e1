"""Across hosts: every process in its own network namespace (a simulated host) on a
private 10.200.N.0/24 subnet that exists only inside the lab (tests/netns.py).

The coordinator, each prefill and each decode worker is `ip netns exec`-ed on its own
host; workers listen on 0.0.0.0 with `--advertise-host` or on their address itself. UCX
carries the KV over TCP (UCX_TLS=tcp, UCX_NET_DEVICES=eth0: shared memory is ruled out,
although the namespaces share one kernel). Outputs must equal the colocated ones (an
in-process LLM on the same model), and the decode hosts must have received the KV bytes
on their eth0. Skips, saying why, where namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import NetnsLab, unavailable

from pdserve import LLM, SamplingParams

WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(WHY is not None, reason=f"multi-host lab: {WHY}")]

UCX_OVER_TCP = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0", "PYTHONUNBUFFERED": "1"}
PROMPTS = [[5], list(range(1, 20)), list(range(40, 73)), [(7 * i) % 250 for i in range(150)]]
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
PORT = 50061


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.parametrize("n_prefill,n_decode", [(1, 1), (2, 2)], ids=["1p1d", "2p2d"])
def test_disaggregated_across_namespaces_equals_colocated(n_prefill, n_decode, tmp_path: Path):
    hosts = ["coord"] + [f"p{i}" for i in range(n_prefill)] + [f"d{i}" for i in range(n_decode)]
    lab = NetnsLab(hosts).up()
    procs: list[subprocess.Popen] = []
    coord = f"{lab.addresses['coord']}:{PORT}"
    try:
        py = [sys.executable, "-m", "pdserve.cli"]
        procs.append(lab.popen("coord", py + ["coordinator", "--host", lab.addresses["coord"],
                                              "--port", str(PORT)],
                               tmp_path / "coord.log", UCX_OVER_TCP))
        for i, host in enumerate(hosts[1:]):
            role = "prefill" if host.startswith("p") else "decode"
            # half the workers listen everywhere and advertise, the others listen on their address
            listen = ["--host", "0.0.0.0", "--advertise-host", lab.addresses[host]] if i % 2 == 0 \
                else ["--host", lab.addresses[host]]
            procs.append(lab.popen(host, py + ["worker", "--role", role, "--model", "tiny",
                                               "--device", "cpu", "--transfer", "ucx",
                                               "--coordinator", coord, *listen],
                                   tmp_path / f"{host}.log", UCX_OVER_TCP))
        rx_before = sum(lab.rx_bytes(h) for h in hosts if h.startswith("d"))
        spec = {"prompts": PROMPTS, "sampling": GREEDY, "ready_s": 150}
        client = lab.run("coord", [sys.executable, str(Path(__file__).parent / "netns_client.py"),
                                   coord, str(n_prefill), str(n_decode), json.dumps(spec)],
                         timeout_s=240, env=UCX_OVER_TCP)
        logs = "\n".join(f"--- {f.name}:\n{f.read_text()[-1500:]}" for f in tmp_path.glob("*.log"))
        assert client.returncode == 0, f"client failed:\n{client.stderr[-3000:]}\n{logs}"
        got = json.loads(client.stdout.strip().splitlines()[-1])
        rx_after = sum(lab.rx_bytes(h) for h in hosts if h.startswith("d"))
    finally:
        _stop(procs)
        lab.down()
    # every worker advertised its own lab address, none a loopback one
    want_hosts = {lab.addresses[h] for h in hosts[1:]}
    assert {a.rpartition(":")[0] for a in got["workers"]} == want_hosts
    llm = LLM(model="tiny")
    want = [o.token_ids for o in llm.generate([list(p) for p in PROMPTS], SamplingParams(**GREEDY))]
    assert got["outputs"] == want
    kv = sum(got["kv_bytes"])
    assert kv > 0 and rx_after - rx_before >= kv, "the KV did not cross the decode hosts' eth0"

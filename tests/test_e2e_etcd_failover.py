"""Two coordinators, one etcd registry, real CPU workers (1 prefill + 1 decode, UCX).

Workers register in etcd under 2 s leases; both coordinators read the registry from
there; clients get both addresses. Killing one coordinator under load: requests that had
not received a token go to the other one and complete with the colocated output;
mid-stream ones end with UNAVAILABLE (never hang); new requests succeed at once. Killing
a worker: it leaves both coordinators' lists when its lease expires.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from etcd_server import ETCD_MISSING, EtcdServer, free_port

from pdserve import LLM, SamplingParams
from pdserve.coordinator.client import Client, ClientError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or "")]

LEASE_S = 2
GREEDY = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[(i * 11 + j) % 250 for j in range(4 + i % 30)] for i in range(40)]


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.procs = log_dir, {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pdserve.cli", *args], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self.procs[name]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-1500:]}"
                         for p in self.log_dir.glob("*.log"))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_workers(address: str, n: int, timeout_s: float) -> list[dict]:
    end = time.monotonic() + timeout_s
    with Client(address) as c:
        while True:
            try:
                workers = c.list_workers()
                if len(workers) == n:
                    return workers
            except ClientError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{address}: not {n} workers after {timeout_s} s")
            time.sleep(0.1)


@pytest.fixture
def etcd_cluster(tmp_path):
    with EtcdServer(tmp_path) as etcd:
        procs = Procs(tmp_path)
        ports = [free_port(), free_port()]
        try:
            for i, port in enumerate(ports):
                procs.spawn(f"coord{i}", "coordinator", "--port", str(port), "--etcd", etcd.url,
                            "--etcd-prefix", "/e2e")
            for role in ("prefill", "decode"):
                procs.spawn(role, "worker", "--role", role, "--model", "tiny", "--device", "cpu",
                            "--transfer", "ucx", "--etcd", etcd.url, "--etcd-prefix", "/e2e",
                            "--lease-ttl", str(LEASE_S), "--heartbeat", "0.5")
            addresses = [f"127.0.0.1:{p}" for p in ports]
            for a in addresses:
                _wait_workers(a, 2, 150)
            yield procs, addresses
        except BaseException:
            print(procs.logs())
            raise
        finally:
            procs.stop()


def test_kill_one_coordinator_under_load_then_a_worker(etcd_cluster):
    procs, addresses = etcd_cluster
    want = [o.token_ids for o in LLM(model="tiny").generate(PROMPTS, SamplingParams(**GREEDY))]
    outcomes: dict[int, tuple[str, object]] = {}

    def one(i: int) -> None:
        ids: list[int] = []
        try:
            with Client(addresses, timeout_s=60) as c:  # coord0 first: most load lands there
                for chunk in c.stream(PROMPTS[i], **GREEDY):
                    ids += chunk.token_ids
                    time.sleep(0.01)  # keep streams open long enough to be cut
            outcomes[i] = ("ok", ids)
        except ClientError as e:
            outcomes[i] = ("error", (e, len(ids)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads[:20]:
        t.start()
    time.sleep(0.5)
    procs.procs["coord0"].kill()  # SIGKILL: no goodbye
    killed_at = time.monotonic()
    for t in threads[20:]:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    with Client(addresses, timeout_s=30) as c:  # new requests: served by the survivor at once
        r = c.generate(PROMPTS[0], **GREEDY)
    assert r.token_ids == want[0] and time.monotonic() - killed_at < 60
    done = {i: v for i, (kind, v) in outcomes.items() if kind == "ok"}
    failed = {i: v for i, (kind, v) in outcomes.items() if kind == "error"}
    print(f"completed {len(done)}, cut mid-stream {len(failed)}")
    assert len(outcomes) == len(PROMPTS)
    assert all(done[i] == want[i] for i in done)  # completed ones are right, failed-over too
    assert all(i in done for i in range(20, len(PROMPTS)))  # started after the kill: all served
    for err, n_tokens in failed.values():  # only streams cut after their first token fail
        assert err.code.name == "UNAVAILABLE" and n_tokens > 0 and "lost the stream" in err.details
    # a worker that dies leaves the registry when its lease expires
    procs.procs["decode"].kill()
    start = time.monotonic()
    workers = _wait_workers(addresses[1], 1, LEASE_S + 5)
    assert [w["info"]["role"] for w in workers] == ["prefill"]
    assert time.monotonic() - start < LEASE_S + 5

"""pdserve forks only to exec (worker and coordinator processes). gRPC's fork support,
when on, restarts its poller in a child forked while the parent's gRPC is busy; the child
then fails on a descriptor close_fds closed and aborts before it execs (about 1 fork in 25
with an active channel). `import pdserve` turns it off (pdserve/__init__.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, subprocess, sys, threading
import pdserve  # before grpc: it sets GRPC_ENABLE_FORK_SUPPORT
import grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(4))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
stop = threading.Event()

def busy():
    while not stop.is_set():
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            pass

threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
bad = []
for _ in range(int(sys.argv[1])):  # as LocalCluster starts its children
    p = subprocess.run([sys.argv[2]], stdin=subprocess.DEVNULL,
                       capture_output=True, close_fds=True, preexec_fn=lambda: None)
    if p.returncode != 0:
        bad.append((p.returncode, p.stderr.decode()[-200:]))
stop.set()
for t in threads:
    t.join(10)
print("bad", len(bad), bad[:1], flush=True)
os._exit(0)  # what is under test is the forks; grpc's teardown at exit can hang (2 cores)
"""


@pytest.mark.timeout(120)
def test_children_forked_while_grpc_is_busy_reach_exec():
    true = shutil.which("true")
    if true is None:
        pytest.skip("no `true` executable to exec")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, "200", true], capture_output=True,
                       text=True, env=env, timeout=110)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad 0 " in r.stdout, r.stdout + r.stderr[-2000:]
    import pdserve  # noqa: F401

    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") in ("false", "0")

"""`pdserve coordinator` stops on SIGTERM within a bound, whatever a thread is stuck in: a
tokenizer load that never returns (it runs in a daemon thread: no wait at all), or any other
call that shutdown would wait for (the exit watchdog ends the process after
--shutdown-grace, with a log line). No timing asserts beyond a generous upper bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

EXIT_BOUND_S = 30.0  # far above the grace used here: proves it did not hang

# Runs `pdserve coordinator` with a tokenizer load that never returns; with `executor`, also
# one default-executor call that never returns (a thread asyncio.run's shutdown joins).
COORDINATOR = r"""
import asyncio, sys, threading
import pdserve.coordinator.server as server

def stuck_tokenizer(model, cache_dir=None):
    print("tokenizer load stuck", file=sys.stderr, flush=True)
    threading.Event().wait()

server.default_tokenizer_factory = stuck_tokenizer
if sys.argv[1] == "executor":
    start = server.CoordinatorServer.start

    async def start_with_a_stuck_call(self):
        port = await start(self)
        asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)
        return port
    server.CoordinatorServer.start = start_with_a_stuck_call
from pdserve.cli import main
sys.exit(main(["coordinator", "--port", "0", "--log-level", "INFO", *sys.argv[2:]]))
"""


def _stop_with_a_stuck_thread(mode: str, *args: str) -> tuple[int, str]:
    """Start the coordinator, make its tokenizer load hang, SIGTERM it: (status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR, mode, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PDSERVE_AUTH_TOKEN": ""})
    try:
        line = proc.stdout.readline()
        assert line.startswith("coordinator listening on "), (line, proc.stderr.read())
        with grpc.insecure_channel(line.split()[-1]) as ch:
            info = pb.WorkerInfo(role=pb.ROLE_BOTH, address="127.0.0.1:1", model="m")
            reply = pb_grpc.CoordinatorStub(ch).Register(pb.RegisterRequest(info=info),
                                                         timeout=20)
            assert reply.accepted
        err = []
        while not any("tokenizer load stuck" in ln for ln in err):  # the load is under way
            err.append(proc.stderr.readline())
            assert err[-1], "".join(err)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the coordinator did not exit within {EXIT_BOUND_S:g} s of SIGTERM")
        assert time.monotonic() - t0 < EXIT_BOUND_S
        return rc, "".join(err) + proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(120)
def test_a_stuck_tokenizer_load_does_not_block_shutdown():
    rc, err = _stop_with_a_stuck_thread("tokenizer")
    assert rc == 0, err  # a clean stop: nothing waits for the load's daemon thread
    assert "shutdown did not finish" not in err


@pytest.mark.timeout(120)
def test_whatever_else_is_stuck_the_watchdog_exits_after_the_grace():
    rc, err = _stop_with_a_stuck_thread("executor", "--shutdown-grace", "1")
    assert rc == 1, err
    assert "shutdown did not finish within 1 s" in err and "exiting now" in err, err


def test_shutdown_grace_must_be_positive():
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "coordinator", "--port", "0",
                        "--shutdown-grace", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--shutdown-grace must be positive" in r.stderr

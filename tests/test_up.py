"""LocalCluster and `pdserve up` with fake workers as child processes (no torch in them):
readiness, environment, SIGTERM / SIGKILL leaving no orphans, and a worker that crashes at
start. The engine-backed workers are exercised by tests/test_demo.py."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.cluster import GPU_ENV, ClusterError, LocalCluster, parse_devices, role_counts
from pdserve.coordinator.client import Client

TESTS_DIR = str(Path(__file__).resolve().parent)

# A fake worker process (tests/fake_worker.py's FakeWorker on its own event loop).
FAKE_WORKER = r"""
import asyncio, json, os, sys
sys.path.insert(0, sys.argv[1])
from fake_worker import FakeWorker
role, coordinator = sys.argv[2], sys.argv[3]
print("env", json.dumps({k: os.environ.get(k) for k in sys.argv[4].split(",")}), flush=True)
async def main():
    w = await FakeWorker(role, coordinator,
                         cluster_secret=os.environ.get("PDSERVE_CLUSTER_SECRET")).start()
    print("fake worker", role, "serving on", w.address, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
CRASHING_WORKER = "import sys; print('fake: cannot load the model weights'); sys.exit(3)"


def fake_worker_cmd(cluster: LocalCluster, spec) -> list[str]:
    return [sys.executable, "-c", FAKE_WORKER, TESTS_DIR, spec.role, cluster.address,
            ",".join(GPU_ENV)]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def marked(marker: str) -> list[int]:
    """Live processes whose environment holds PDSERVE_TEST_MARKER=marker."""
    needle = f"PDSERVE_TEST_MARKER={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and alive(int(d.name)):
                out.append(int(d.name))
    return out


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# -- pure helpers -------------------------------------------------------------------------
def test_parse_devices():
    assert parse_devices("cpu", 3) == ["cpu"] * 3
    assert parse_devices("0,1", 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:2, cuda:3,4", 2) == ["cuda:2", "cuda:3"]
    with pytest.raises(ClusterError, match="1 GPU.*for 2 workers"):
        parse_devices("0", 2)
    with pytest.raises(ClusterError, match="twice"):
        parse_devices("0,0", 2)
    with pytest.raises(ClusterError, match="expected cpu, auto or GPU indices"):
        parse_devices("gpu0", 1)


def test_cluster_options_validated():
    assert role_counts(1, 1, 0) == "1 prefill, 1 decode"
    assert role_counts(0, 0, 2) == "2 both"
    with pytest.raises(ClusterError, match="nccl needs CUDA"):
        LocalCluster(devices="cpu", transfer="nccl")
    with pytest.raises(ClusterError, match="at least one decode"):
        LocalCluster(prefill=1, decode=0)
    c = LocalCluster(prefill=2, decode=1, both=1, devices="0,1,2,3")
    assert [(s.name, s.device) for s in c.specs] == [
        ("prefill-0", "cuda:0"), ("prefill-1", "cuda:1"), ("decode-0", "cuda:2"),
        ("both-0", "cuda:3")]
    assert c.transfer == "nccl"


# -- LocalCluster with fake worker processes ----------------------------------------------
@pytest.mark.timeout(60)
def test_local_cluster_1p1d_ready_env_kill_stop(tmp_path):
    with LocalCluster(prefill=1, decode=1, devices="cpu", log_dir=tmp_path,
                      worker_cmd=fake_worker_cmd, stop_grace_s=5) as cluster:
        workers = cluster.wait_ready(timeout_s=30)
        assert sorted(w["info"]["role"] for w in workers) == ["decode", "prefill"]
        assert set(cluster.worker_pids) == {"prefill-0", "decode-0"}
        # GPU_ENV reaches every child (setdefault: the caller's environment wins)
        for name in ("prefill-0", "decode-0"):
            log = (tmp_path / f"{name}.log").read_text()
            for k, v in GPU_ENV.items():
                assert f'"{k}": "{os.environ.get(k, v)}"' in log
        pids = cluster.pids
        assert len(pids) == 3
        cluster.kill_worker("decode", 0)
        end = time.monotonic() + 10
        while not cluster.exited() and time.monotonic() < end:
            time.sleep(0.02)
        assert [p.name for p in cluster.exited()] == ["decode-0"]
        assert "killed by SIGKILL" in cluster.worker("decode", 0).describe_exit()
        with pytest.raises(ClusterError, match=r"decode-0 \(pid \d+\) was killed by SIGKILL"):
            cluster.wait_ready(timeout_s=5)
    for pid in pids:  # stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_local_cluster_colocated_generate(tmp_path):
    from fake_worker import fake_outputs

    # (fake prefill -> decode KV hand-off only works inside one process, so a `both` worker)
    with LocalCluster(prefill=0, decode=0, both=1, devices="cpu", log_dir=tmp_path,
                      worker_cmd=fake_worker_cmd) as cluster:
        cluster.wait_ready(timeout_s=30)
        with Client(cluster.address, timeout_s=10) as client:
            r = client.generate(prompt_token_ids=[5, 6, 7], max_tokens=6, ignore_eos=True)
        assert r.token_ids == fake_outputs([5, 6, 7], 6)[0]
        pids = cluster.pids
    assert wait_gone(pids) == []


@pytest.mark.timeout(60)
def test_local_cluster_crashing_worker_fails_clearly(tmp_path):
    cluster = LocalCluster(prefill=1, decode=1, devices="cpu", log_dir=tmp_path,
                           worker_cmd=lambda c, s: [sys.executable, "-c", CRASHING_WORKER])
    with cluster, pytest.raises(ClusterError) as err:
        cluster.wait_ready(timeout_s=30)
    msg = str(err.value)
    assert re.search(r"(prefill|decode)-0 \(pid \d+\) exited with code 3", msg), msg
    assert "cannot load the model weights" in msg
    for pid in cluster.pids:
        assert not alive(pid)


# -- `pdserve up` as a process ------------------------------------------------------------
def start_up(tmp_path: Path, *extra: str, worker_cmd: str | None = None) -> subprocess.Popen:
    """`pdserve up` with fake workers; it and its children carry PDSERVE_TEST_MARKER."""
    if worker_cmd is None:
        worker_cmd = shlex.join([sys.executable, "-c", FAKE_WORKER, TESTS_DIR, "{role}",
                                 "{coordinator}", ",".join(GPU_ENV)])
    argv = [sys.executable, "-m", "pdserve.cli", "up", "--devices", "cpu", "--port", "0",
            "--prefill", "1", "--decode", "1", "--log-dir", str(tmp_path), "--grace", "5",
            f"--worker-cmd={worker_cmd}", *extra]
    env = dict(os.environ, PDSERVE_TEST_MARKER=tmp_path.name)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_as_a_terminal_job)


def _as_a_terminal_job() -> None:
    """(In `up` before exec.) SIGINT as a terminal's foreground job has it: a background job
    of a non-interactive shell (`./dev test &` in a CI script) starts with SIGINT ignored,
    `up` inherits that through pytest, Python then keeps ignoring it (no KeyboardInterrupt),
    and a test's Ctrl-C would never reach `up`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ignored_signals(pid: int) -> set[signal.Signals]:
    """The signals process `pid` ignores (SigIgn in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {s for s in signal.Signals if mask >> (s - 1) & 1}
    return set()


def children(up: subprocess.Popen, marker: str) -> list[int]:
    return [p for p in marked(marker) if p != up.pid]


def read_until(proc: subprocess.Popen, pattern: str, timeout_s: float = 30.0) -> str:
    """Stdout lines until one matches (os.set_blocking-free: `up` prints line by line)."""
    seen = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; stdout: {''.join(seen)}"
                         f"\nstderr: {proc.stderr.read()}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_ready_then_signal_leaves_no_orphans(tmp_path, sig):
    up = start_up(tmp_path)
    try:
        line = read_until(up, r"ready at")
        assert re.fullmatch(r"pdserve up: ready at 127\.0\.0\.1:\d+ \(1 prefill, 1 decode\)\n", line)
        address = line.split()[4]
        with Client(address, timeout_s=10) as client:
            assert len(client.list_workers()) == 2
        kids = children(up, tmp_path.name)
        assert len(kids) == 3  # coordinator + 2 workers
        assert sig not in ignored_signals(up.pid)  # else it could only time out below
        up.send_signal(sig)
        out, err = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, err
    assert "shutting down" in out and "stopped" in out
    for pid in kids:  # reaped by `up` itself
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_up_sigkilled_children_die_with_it(tmp_path):
    up = start_up(tmp_path)
    try:
        read_until(up, r"ready at")
        kids = children(up, tmp_path.name)
        assert len(kids) == 3
        up.kill()  # no chance to clean up: PR_SET_PDEATHSIG must do it
        up.wait(10)
        assert wait_gone(kids) == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.mark.timeout(60)
def test_up_worker_crash_at_start(tmp_path):
    up = start_up(tmp_path, worker_cmd=shlex.join([sys.executable, "-c", CRASHING_WORKER]))
    try:
        out, err = up.communicate(timeout=45)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 1, err[-3000:]
    assert "ready at" not in out
    assert re.search(r"pdserve up: error: (prefill|decode)-0 \(pid \d+\) exited with code 3", err), err
    assert "cannot load the model weights" in err
    assert str(tmp_path) in err  # where the full log is
    assert marked(tmp_path.name) == []


def test_up_too_few_devices_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "up", "--devices", "0",
                        "--prefill", "1", "--decode", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "--devices gives 1 GPU(s) (0) for 2 workers" in r.stderr


# -- supervision ---------------------------------------------------------------------------
def _role_child(up: subprocess.Popen, marker: str, role: str) -> int:
    for pid in children(up, marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if role.encode() in argv and b"-c" in argv:
            return pid
    raise AssertionError(f"no {role} child")


def gen(client: Client) -> list[int]:
    return client.generate(prompt_token_ids=[1], max_tokens=2, skip_text=True).token_ids


def _read_err_until(proc: subprocess.Popen, pattern: str, timeout_s: float = 30.0) -> str:
    seen = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no stderr line matching {pattern!r}; stderr: {''.join(seen)}")


@pytest.mark.timeout(90)
def test_up_restarts_a_killed_worker_and_keeps_serving(tmp_path):
    # Colocated fake workers: each serves requests alone (fake P/D pairs need one process).
    up = start_up(tmp_path, "--prefill", "0", "--decode", "0", "--both", "2",
                  "--restart-backoff", "0.2")
    try:
        address = read_until(up, r"ready at").split()[4]
        with Client(address, timeout_s=10) as client:
            ids = {w["info"]["worker_id"] for w in client.list_workers()}
            os.kill(_role_child(up, tmp_path.name, "both"), signal.SIGKILL)
            for _ in range(5):  # serving continues through the other worker meanwhile
                assert gen(client) == [2, 3]
            err = _read_err_until(up, r"restarted both-\d \(pid \d+\)")
            assert "killed by SIGKILL" in err and "restarting both-" in err
            end = time.monotonic() + 20
            while not {w["info"]["worker_id"] for w in client.list_workers()} - ids:
                assert time.monotonic() < end, "the restarted worker did not register"
                time.sleep(0.1)
            assert gen(client) == [2, 3]
        assert up.poll() is None  # still up
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=30)
        assert up.returncode == 0 and "SIGTERM, shutting down" in out
    finally:
        if up.poll() is None:
            up.kill()
    assert marked(tmp_path.name) == []


FLAKY_WORKER = ("import os, sys; flag = sys.argv[1] + '/flag-' + sys.argv[3]\n"
                "if os.path.exists(flag): print('fake: crashing again'); sys.exit(3)\n"
                "open(flag, 'w').close(); sys.argv = sys.argv[1:]\n" + FAKE_WORKER)


@pytest.mark.timeout(90)
def test_up_stops_on_a_crash_loop_and_says_so(tmp_path):
    cmd = shlex.join([sys.executable, "-c", FLAKY_WORKER, str(tmp_path), TESTS_DIR, "{role}",
                      "{coordinator}", ",".join(GPU_ENV)])
    up = start_up(tmp_path, "--restart-backoff", "0.1", "--restart-limit", "2",
                  worker_cmd=cmd)
    try:
        read_until(up, r"ready at")
        os.kill(_role_child(up, tmp_path.name, "prefill"), signal.SIGKILL)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 1
    assert re.search(r"pdserve up: error: crash loop: prefill-0 exited 3 times within 60 s", err), err
    assert "fake: crashing again" in err
    assert marked(tmp_path.name) == []


def test_sighup_stops_up_unless_started_under_nohup():
    """`pdserve up` stops on SIGTERM and on SIGHUP (its terminal closed); started ignoring
    SIGHUP (`nohup pdserve up &`) it keeps ignoring it."""
    import signal

    from pdserve.up import stop_signals

    old = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert stop_signals() == [signal.SIGTERM, signal.SIGHUP]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves to the program
        assert stop_signals() == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, old)

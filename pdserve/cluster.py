"""A coordinator and its workers as child processes on this node (used by `pdserve up`,
`pdserve demo` and the end-to-end tests).

    with LocalCluster(model="tiny", prefill=1, decode=1, devices="cpu") as cluster:
        cluster.wait_ready(timeout_s=60)          # all registered and SERVING
        with Client(cluster.address) as c: ...
        cluster.kill_worker("decode", 0)         # failure tests

Process hygiene: every child runs in its own session (its own process group, so Ctrl-C at
the terminal reaches only the parent, which shuts the children down in order), and on
Linux asks the kernel (prctl PR_SET_PDEATHSIG) for SIGKILL when the thread that started it
dies, so a SIGKILLed parent leaves no orphans. Call `start()` from a thread that lives as
long as the cluster (the main thread). `stop()` sends SIGTERM to each child's process group,
waits `stop_grace_s`, then SIGKILLs what is left. Each child's stdout and stderr go to
`<log_dir>/<name>.log`; errors quote the tail of the failing child's log.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.child_process import Proc, child_preexec, libc, signal_group
from pdserve.proto.cluster_secret import ENV as SECRET_ENV
from pdserve.proto.cluster_secret import new_secret
from pdserve.proto.convert import ROLES
from pdserve.proto.tls import TLSConfig

# Needed on the lent GPU machines (NVLink multicast is not available there); set for every
# child unless the caller's environment already decides.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
_LISTENING = re.compile(r"coordinator listening on (\S+:\d+)")


class ClusterError(RuntimeError):
    """A child failed to start, exited early, or the cluster was not ready in time."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    role: str  # "prefill" | "decode" | "both"
    index: int  # within its role
    device: str  # "cpu" | "cuda:N"

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def parse_devices(devices: str | Sequence[str], n_workers: int,
                  shared_gpus: bool = False) -> list[str]:
    """One device per worker: "cpu" (all on CPU), "auto" (one GPU each when enough are
    visible, else CPU), or a list of GPUs "0,1,..." / "cuda:0,cuda:1" (one role per GPU)."""
    if not isinstance(devices, str):
        devices = ",".join(devices)
    spec = devices.strip().lower()
    if spec == "cpu":
        return ["cpu"] * n_workers
    if spec == "auto":
        count = cuda_device_count()
        if count == 0:
            return ["cpu"] * n_workers
        if count < n_workers:
            raise ClusterError(f"--devices auto: {count} CUDA device(s) visible for {n_workers} "
                               "workers (one GPU per worker); use fewer workers or --devices cpu")
        return [f"cuda:{i}" for i in range(n_workers)]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.startswith("cuda:"):
            item = item[5:]
        if not item.isdigit():
            raise ClusterError(f"--devices: expected cpu, auto or GPU indices like 0,1; got {devices!r}")
        out.append(f"cuda:{int(item)}")
    if len(set(out)) != len(out) and not shared_gpus:
        raise ClusterError(f"--devices lists a GPU twice ({devices!r}); each worker needs its own GPU")
    if len(out) < n_workers:
        raise ClusterError(f"--devices gives {len(out)} GPU(s) ({devices}) for {n_workers} workers; "
                           "each worker needs its own GPU")
    return out[:n_workers]


def require_devices(devices: Sequence[str]) -> None:
    """ClusterError, before anything starts, when a listed GPU is not on this machine."""
    count = cuda_device_count()
    missing = sorted({d for d in devices if d.startswith("cuda:") and int(d[5:]) >= count})
    if missing:
        raise ClusterError(f"this machine has {count} visible CUDA device(s), so "
                           f"{', '.join(missing)} cannot be used; use --devices "
                           f"{'cpu' if count == 0 else 'auto'}")


def cuda_device_count() -> int:
    """Visible CUDA devices; skips importing torch on a Linux machine with no NVIDIA device."""
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def role_counts(prefill: int, decode: int, both: int) -> str:
    """`1 prefill, 1 decode` (roles with no worker left out)."""
    parts = [f"{n} {r}" for r, n in zip(ROLES, (prefill, decode, both), strict=True) if n]
    return ", ".join(parts) or "no workers"


def default_coordinator_cmd(cluster: LocalCluster) -> list[str]:
    argv = [sys.executable, "-m", "pdserve.cli", "coordinator", "--host", cluster.host,
            "--port", str(cluster.port)]
    if cluster.routing:
        argv += ["--routing", cluster.routing]
    if cluster.http_port is not None:
        argv += ["--http-port", str(cluster.http_port)]
    argv += cluster.tls.argv() if cluster.tls is not None else []
    return argv + list(cluster.coordinator_args)


def default_worker_cmd(cluster: LocalCluster, spec: WorkerSpec) -> list[str]:
    argv = [sys.executable, "-m", "pdserve.cli", "worker", "--role", spec.role,
            "--model", cluster.model, "--device", spec.device, "--coordinator", cluster.address,
            "--transfer", cluster.transfer, "--host", "127.0.0.1", "--port", "0"]
    if cluster.dtype:
        argv += ["--dtype", cluster.dtype]
    argv += cluster.tls.argv() if cluster.tls is not None else []
    return argv + list(cluster.worker_args)


class LocalCluster:
    """A coordinator plus `prefill`/`decode`/`both` workers, each its own process.

    `devices`: see `parse_devices` (prefill workers take the first devices, then decode,
    then both). `port`: the coordinator's gRPC port (0: any free one, learnt from its log).
    Workers always pick free ports. `transfer`: None = nccl on GPUs, ucx on CPU.
    `coordinator_cmd(cluster)` / `worker_cmd(cluster, spec)` build each child's argv
    (override them to run fake workers); `env` adds to / overrides the children's environment.
    `tls`: every child gets its files as --tls-* flags, and this process dials with it.
    """

    def __init__(self, model: str = "tiny", prefill: int = 1, decode: int = 1, both: int = 0, *,
                 devices: str | Sequence[str] = "cpu", host: str = "127.0.0.1", port: int = 0,
                 transfer: str | None = None, routing: str | None = None,
                 dtype: str | None = None, http_port: int | None = None,
                 log_dir: str | os.PathLike | None = None,
                 worker_args: Sequence[str] = (), coordinator_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None,
                 coordinator_cmd: Callable[[LocalCluster], list[str]] = default_coordinator_cmd,
                 worker_cmd: Callable[[LocalCluster, WorkerSpec], list[str]] = default_worker_cmd,
                 start_timeout_s: float = 30.0, stop_grace_s: float = 10.0,
                 cluster_secret: str | None = None, shared_gpus: bool = False,
                 tls: TLSConfig | None = None) -> None:
        counts = {"prefill": prefill, "decode": decode, "both": both}
        if any(n < 0 for n in counts.values()):
            raise ClusterError(f"worker counts must be >= 0, got {counts}")
        if not both and (prefill == 0) != (decode == 0):
            missing = "decode" if decode == 0 else "prefill"
            raise ClusterError(f"disaggregated serving needs at least one {missing} worker "
                               "(or use --both for colocated workers)")
        if prefill + decode + both == 0:
            raise ClusterError("no workers requested: give --prefill/--decode and/or --both")
        self.model, self.host, self.port = model, host, port
        self.counts = counts
        self.routing, self.dtype, self.http_port = routing, dtype, http_port
        devs = parse_devices(devices, prefill + decode + both, shared_gpus)
        roles = [(r, i) for r in ROLES for i in range(counts[r])]
        self.specs = [WorkerSpec(r, i, d) for (r, i), d in zip(roles, devs, strict=True)]
        on_gpu = any(d != "cpu" for d in devs)
        self.transfer = transfer or ("nccl" if on_gpu else "ucx")
        if self.transfer not in ("nccl", "ucx"):
            raise ClusterError(f"transfer must be nccl or ucx, got {self.transfer!r}")
        if self.transfer == "nccl" and not on_gpu:
            raise ClusterError("--transfer nccl needs CUDA devices; use --transfer ucx on CPU")
        self.worker_args, self.coordinator_args = list(worker_args), list(coordinator_args)
        self.extra_env = dict(env or {})
        # the cluster plane's credential, new for every cluster unless given; the children
        # get it in their environment (the CLI reads it there, never a file left behind)
        self.cluster_secret = cluster_secret or new_secret()
        self.tls = tls
        self.coordinator_cmd, self.worker_cmd = coordinator_cmd, worker_cmd
        self.start_timeout_s, self.stop_grace_s = start_timeout_s, stop_grace_s
        self._log_dir_arg = log_dir
        self.log_dir: Path | None = None
        self.coordinator: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self._coord_address: str | None = None
        self._libc = libc()

    # -- addresses and processes ----------------------------------------------------------
    @property
    def address(self) -> str:
        """host:port clients (and workers) use to reach the coordinator."""
        if self._coord_address is None:
            raise ClusterError("the coordinator has not started yet")
        return self._coord_address

    @property
    def procs(self) -> list[Proc]:
        return ([self.coordinator] if self.coordinator else []) + list(self.workers.values())

    @property
    def worker_pids(self) -> dict[str, int]:
        """{"prefill-0": pid, "decode-0": pid, ...}"""
        return {name: p.pid for name, p in self.workers.items()}

    @property
    def pids(self) -> list[int]:
        """Every child's pid, coordinator first."""
        return [p.pid for p in self.procs]

    def worker(self, role: str, idx: int = 0) -> Proc:
        name = f"{role}-{idx}"
        if name not in self.workers:
            raise KeyError(f"no worker {name}; have {', '.join(self.workers) or 'none'}")
        return self.workers[name]

    def kill_worker(self, role: str, idx: int = 0, sig: int = signal.SIGKILL) -> int:
        """Send `sig` (default SIGKILL: a crash) to one worker's process group; returns its pid."""
        proc = self.worker(role, idx)
        signal_group(proc, sig)
        return proc.pid

    def exited(self) -> list[Proc]:
        """Children that have exited (the cluster is broken if this is non-empty)."""
        return [p for p in self.procs if p.poll() is not None]

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in GPU_ENV.items():
            env.setdefault(k, v)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[SECRET_ENV] = self.cluster_secret
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str], append: bool = False) -> Proc:
        assert self.log_dir is not None
        log_path = self.log_dir / f"{name}.log"
        blocked = {signal.SIGINT, signal.SIGTERM}
        # Block INT/TERM while forking so a signal cannot land between the fork and our
        # bookkeeping (that child would escape stop()); the child unblocks them itself.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            with open(log_path, "ab" if append else "wb") as log:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env(), start_new_session=True, close_fds=True,
                    preexec_fn=child_preexec(os.getpid(), self._libc))
            proc = Proc(name, argv, log_path, popen)
            if name == "coordinator":
                self.coordinator = proc
            else:
                self.workers[name] = proc
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc

    def start(self) -> LocalCluster:
        """Start the coordinator, wait until it listens, then start every worker (returns
        without waiting for them: see `wait_ready`). On failure everything is stopped."""
        if self.coordinator is not None:
            raise ClusterError("this LocalCluster was already started")
        self.log_dir = Path(self._log_dir_arg) if self._log_dir_arg else Path(
            tempfile.mkdtemp(prefix="pdserve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn("coordinator", self.coordinator_cmd(self))
            self._coord_address = self._wait_listening(self.start_timeout_s)
            for spec in self.specs:
                self._spawn(spec.name, self.worker_cmd(self, spec))
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str) -> Proc:
        """Start child `name` ("coordinator" or a worker name) again with the same command
        (the coordinator on the port it had, so workers find it); its log is appended to."""
        if name == "coordinator":
            self.port = int(self.address.rpartition(":")[2])
            return self._spawn(name, self.coordinator_cmd(self), append=True)
        spec = next(s for s in self.specs if s.name == name)
        return self._spawn(name, self.worker_cmd(self, spec), append=True)

    def _wait_listening(self, timeout_s: float) -> str:
        coord = self.coordinator
        assert coord is not None
        end = time.monotonic() + timeout_s
        while True:
            try:
                text = coord.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            m = _LISTENING.search(text)
            if m:
                host, _, port = m.group(1).rpartition(":")
                if host in ("0.0.0.0", "::", "[::]"):
                    host = "127.0.0.1"
                return f"{host}:{port}"
            if coord.poll() is not None:
                raise ClusterError("the coordinator failed to start: " + coord.describe_exit())
            if time.monotonic() > end:
                raise ClusterError(f"the coordinator did not report 'coordinator listening on' "
                                   f"within {timeout_s:g} s; log {coord.log_path}:\n{coord.tail()}")
            time.sleep(0.02)

    def wait_ready(self, timeout_s: float = 120.0) -> list[dict]:
        """Wait until every worker is registered with the coordinator and answers its health
        check as SERVING; returns the coordinator's worker list. Raises ClusterError naming
        the child that exited (with its log tail), or listing the missing roles on timeout."""
        from pdserve.coordinator.client import Client

        end = time.monotonic() + timeout_s
        msg = "not checked yet"
        with Client(self.address, tls=self.tls) as client:
            while True:
                dead = self.exited()
                if dead:
                    raise ClusterError("\n".join(p.describe_exit() for p in dead))
                try:
                    workers = client.wait_ready(self.counts["prefill"], self.counts["decode"],
                                                self.counts["both"], timeout_s=0.25)
                    unhealthy = [w["info"]["address"] for w in workers
                                 if not _serving(w["info"]["address"], self.tls)]
                    if not unhealthy:
                        return workers
                    msg = f"registered but not SERVING: {', '.join(unhealthy)}"
                except TimeoutError as e:
                    msg = str(e)
                if time.monotonic() > end:
                    tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(10)}"
                                      for p in self.workers.values())
                    raise ClusterError(f"cluster not ready after {timeout_s:g} s ({msg}); "
                                       f"logs in {self.log_dir}\n{tails}")
                time.sleep(0.05)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child's process group, wait up to `grace_s` (default stop_grace_s),
        SIGKILL what is left, and reap. Idempotent; a second Ctrl-C skips the grace period."""
        grace = self.stop_grace_s if grace_s is None else grace_s
        procs = self.procs
        for p in procs:
            if p.poll() is None:
                signal_group(p, signal.SIGTERM)
        try:
            end = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < end:
                time.sleep(0.02)
        except KeyboardInterrupt:
            pass
        finally:
            for p in procs:
                signal_group(p, signal.SIGKILL)  # stragglers, and any grandchildren
            for p in procs:
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:  # unkillable (D state): report, move on
                    print(f"pdserve: {p.name} (pid {p.pid}) did not exit after SIGKILL",
                          file=sys.stderr)


def _serving(address: str, tls: TLSConfig | None = None, timeout_s: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdserve.proto.grpc_util import new_sync_channel

    with new_sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING

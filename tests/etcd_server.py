"""A throwaway etcd for tests: its own data dir and free loopback ports.

    with EtcdServer(tmp_path) as etcd:   # etcd.url = "http://127.0.0.1:PORT"
        ...

`ETCD_MISSING` says why the tests that need it skip (no `etcd` binary: Debian's
etcd-server package provides it; `.ci/run` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from pdserve.proto.etcd import Etcd, EtcdError

ETCD = shutil.which("etcd")
ETCD_MISSING = None if ETCD else "no `etcd` binary (apt-get install etcd-server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> EtcdServer:
        assert ETCD is not None, ETCD_MISSING
        log = open(self.workdir / "etcd.log", "wb")  # noqa: SIM115  (owned by the process)
        self.proc = subprocess.Popen(
            [ETCD, "--name", "test", "--data-dir", str(self.workdir / "etcd-data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        client, end = Etcd(self.url), time.monotonic() + timeout_s
        while True:
            try:
                client.get_prefix("/")
                return self
            except EtcdError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError("etcd did not start: "
                                       + (self.workdir / "etcd.log").read_text()[-2000:]) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

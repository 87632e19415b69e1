"""Linux network namespaces as simulated hosts, for the multi-host tests.

    lab = NetnsLab(["coord", "p0", "d0"])   # one namespace per host, on 10.200.N.0/24
    lab.up()
    proc = lab.popen("p0", argv, log_path)  # `ip netns exec` the process on that host
    lab.down()

Each host namespace has `eth0` (one end of a veth pair) with one address; the other ends
sit on a bridge in a hub namespace. Nothing is created in the caller's namespace: no
address, route or interface of the machine changes, and traffic stays inside the lab.
`unavailable()` says why the machine cannot host a lab (not root, no `ip`, no netns).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"pdsv-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Delete labs left by test processes that died without cleaning up (SIGKILL)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"pdsv(\d+)-.+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)


class NetnsLab:
    def __init__(self, hosts: Sequence[str], subnet: int | None = None) -> None:
        self.tag = f"pdsv{os.getpid()}"
        self.subnet = subnet if subnet is not None else 1 + os.getpid() % 250
        self.hosts = list(hosts)
        self.hub = f"{self.tag}-hub"
        self.addresses = {h: f"10.200.{self.subnet}.{i + 1}" for i, h in enumerate(hosts)}
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def up(self) -> NetnsLab:
        sweep_stale()
        try:
            self._add_ns(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ns = self.ns(host)
                self._add_ns(ns)
                # created inside the hub, the far end moved straight into the host namespace
                _ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name",
                    "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def down(self) -> None:
        """Delete every namespace this lab made (their interfaces go with them)."""
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], log_path: Path,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
        with open(log_path, "wb") as log:
            return subprocess.Popen(self.argv(host, argv), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)

    def run(self, host: str, argv: Sequence[str], timeout_s: float,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, **(env or {})})

    def rx_bytes(self, host: str) -> int:
        """Bytes received on the host's eth0 so far."""
        path = "/sys/class/net/eth0/statistics/rx_bytes"
        return int(self.run(host, ["cat", path], timeout_s=10).stdout)

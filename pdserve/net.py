"""Which address a process advertises to peers on other hosts.

A process listens on `--host` (an address of this host, or 0.0.0.0 for every interface)
and tells peers `--advertise-host`. When it listens everywhere and no advertise host is
given, `detect_host()` picks one: the address this host's name resolves to when that is
not a loopback address, else the first IPv4 address of an interface that is up and not
loopback. Give `--advertise-host` whenever the host has several networks (Kubernetes
passes the pod IP; a multi-homed node names the interface its peers share).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
_SIOCGIFADDR = 0x8915


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def interface_addresses() -> dict[str, str]:
    """{interface name: IPv4 address} of every interface with one (Linux ioctl; {} elsewhere)."""
    try:
        import fcntl
    except ImportError:
        return {}
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)
            except OSError:  # down, or no IPv4 address
                continue
            out[name] = socket.inet_ntoa(reply[20:24])
    return out


def detect_host() -> str:
    """An address of this host that peers elsewhere can reach (see the module docstring)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not is_loopback(addr):
            return addr
    except OSError:
        pass
    for name, addr in interface_addresses().items():
        if name != "lo" and not is_loopback(addr):
            return addr
    raise OSError("no non-loopback IPv4 address found on this host: pass --advertise-host")


def advertise_host(host: str, advertise: str | None) -> str | None:
    """The host to advertise: `advertise` if given; detected when `host` is a wildcard;
    else None (the listen address itself is advertised)."""
    if advertise:
        return advertise
    if host in WILDCARD_HOSTS:
        return detect_host()
    return None

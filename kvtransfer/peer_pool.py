"""Peer copy: on one host, the sender writes a request's blocks straight into the receiver's
pool. No staging buffer, no backend message, one copy per group of ready layers.

The receiver shares its pool's memory in the handshake (`offer`): a CUDA IPC handle on GPU
(the copy then runs over NVLink or PCIe, as UCX's cuda_ipc transport and Mooncake's NVLink
transport do), a shared-memory file on CPU. The sender maps it (`open_pool`) when both run
on the same host (`host_id`: host name and kernel boot id) and it can; otherwise it keeps
the backend path. Both are torch's own sharing primitives (those of torch.multiprocessing),
called directly: nothing is unpickled from a peer.

Trust: a sender that maps the pool can write anywhere in it, so only a peer that passed the
handshake gets an offer (with a cluster secret, the challenge-response of auth.py).
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from typing import Any

import torch

MAX_OFFER_BYTES = 4096

log = logging.getLogger("pdserve.kvtransfer")


@lru_cache(maxsize=1)
def host_id() -> str:
    """Same value in every process of one running host and network namespace; different
    across hosts, reboots and network namespaces (containers, or the simulated hosts of
    tests/netns.py: they share a kernel, but their KV is meant to cross the network)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        boot, netns = "no-boot-id", ""
    return f"{socket.gethostname()}/{boot}/{netns}"


def _uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_cpu_pool(flat: torch.Tensor) -> bool:
    """Move a CPU pool into a named shared-memory file in place (every view follows),
    before it serves: moved at a sender's first handshake, it would race with a step
    writing into it. False (and a warning) when it cannot be, e.g. /dev/shm is too small.

    Only ever `_share_filename_cpu_`, never `share_memory_()`: the latter moves a
    file-shared storage again (to a descriptor-shared one), and every peer that mapped the
    old file would write where the pool no longer is."""
    try:
        flat.untyped_storage()._share_filename_cpu_()
        return True
    except RuntimeError as e:
        log.warning("kv receiver: no peer copy, the pool cannot be shared: %s", e)
        return False


def offer(flat: torch.Tensor) -> dict[str, Any]:
    """What a peer on this host needs to map `flat` (a contiguous [rows, W] pool view).

    Call once per peer: on CUDA each offer carries its own IPC reference count."""
    if not flat.is_contiguous():
        raise ValueError("only a contiguous pool can be shared")
    storage = flat.untyped_storage()
    o: dict[str, Any] = {"host": host_id(), "offset": flat.data_ptr() - storage.data_ptr(),
                         "rows": int(flat.shape[0]), "row_bytes": int(flat.shape[1] * flat.element_size())}
    if flat.is_cuda:
        _dev, handle, size, soff, rc, rc_off, ev, ev_sync = storage._share_cuda_()
        o.update(kind="cuda", uuid=_uuid(flat.device), handle=handle, size=size, soff=soff,
                 rc=rc, rc_off=rc_off, ev=ev or b"", ev_sync=bool(ev_sync))
    else:
        # the same file every time once share_cpu_pool() moved the pool (see there)
        manager, name, size = storage._share_filename_cpu_()
        o.update(kind="shm", manager=manager, name=name, size=size)
    return o


def _check_peer_access(local: torch.device, uuid: str) -> None:
    for i in range(torch.cuda.device_count()):
        if _uuid(torch.device("cuda", i)) == uuid and i != local.index \
                and not torch.cuda.can_device_access_peer(local.index, i):
            raise RuntimeError(f"{local} cannot access the receiver's GPU (cuda:{i}) as a peer")


def open_pool(o: dict[str, Any], word: torch.dtype, row_words: int,
              device: torch.device) -> torch.Tensor:
    """Map a peer's offer as a [rows, row_words] tensor of `word` that kernels on `device`
    (this process's pool device) can write; raises with the reason when this process cannot
    (another host, no peer access, a bad offer).

    On CUDA the handle is opened in `device`'s context, as NCCL opens its peers' buffers:
    the mapping then belongs to the device whose kernels write it, with peer access enabled
    on first use. The tensor says `device` although the memory lies on the receiver's GPU."""
    if o.get("host") != host_id():
        raise RuntimeError("the receiver runs on another host")
    elem = torch.empty((), dtype=word).element_size()
    rows, offset = int(o["rows"]), int(o["offset"])
    if int(o["row_bytes"]) != row_words * elem or offset % elem or rows <= 0 or offset < 0:
        raise RuntimeError(f"the receiver's pool layout differs: {o['row_bytes']} bytes a row "
                           f"(here {row_words * elem}), offset {offset}")
    if o["kind"] == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("the receiver's pool is on a GPU and this process has no CUDA")
        _check_peer_access(device, o["uuid"])
        storage = torch.UntypedStorage._new_shared_cuda(
            device.index, o["handle"], o["size"], o["soff"], o["rc"], o["rc_off"],
            o["ev"], o["ev_sync"])
    elif o["kind"] == "shm":
        storage = torch.UntypedStorage._new_shared_filename_cpu(o["manager"], o["name"], o["size"])
    else:
        raise RuntimeError(f"unknown pool kind {o['kind']!r}")
    if offset + rows * row_words * elem > storage.nbytes():
        raise RuntimeError("the receiver's pool offer is larger than the memory it shares")
    return torch.empty(0, dtype=word, device=storage.device).set_(
        storage, offset // elem, (rows, row_words), (row_words, 1))


def check(o: Any) -> bool:
    """Schema check of an offer as it arrives from a peer (types and sizes only)."""
    if type(o) is not dict or o.get("kind") not in ("cuda", "shm"):
        return False
    ints = ("offset", "rows", "row_bytes", "size") + (("soff", "rc_off") if o["kind"] == "cuda" else ())
    if not all(type(o.get(k)) is int and 0 <= o[k] < 1 << 62 for k in ints):
        return False
    strs = ("host", "uuid") if o["kind"] == "cuda" else ("host",)
    byts = ("handle", "rc", "ev") if o["kind"] == "cuda" else ("manager", "name")
    return (all(type(o.get(k)) is str and len(o[k]) <= MAX_OFFER_BYTES for k in strs)
            and all(type(o.get(k)) is bytes and len(o[k]) <= MAX_OFFER_BYTES for k in byts)
            and (o["kind"] != "cuda" or type(o.get("ev_sync")) is bool))


EVENTS = 32  # interprocess events a pair shares: requests whose copy may run after its `end`
MAX_EVENT_HANDLE = 128  # bytes (a CUDA IPC event handle is 64)


class EventRing:
    """The sender's interprocess CUDA events, shared with the receiver in the handshake.

    A request's last copy is followed by one of them, and its `end` names it and leaves at
    once: the receiver polls that event on its side rather than wait for the sender to see
    the copy end and say so (one hop less on every request's tail). A slot is taken from
    that `end` until the request's result; should a slot be recorded again while a receiver
    still polls it, the new record lies later on the same stream, so that receiver waits
    longer, never too little. With every slot taken, `end` waits for the copy (as on CPU)."""

    def __init__(self, device: torch.device, n: int = EVENTS) -> None:
        with torch.cuda.device(device):
            self.events = [torch.cuda.Event(interprocess=True) for _ in range(n)]
            self.handles = [e.ipc_handle() for e in self.events]
        self.free = list(range(n))


def open_events(handles: list[bytes], device: torch.device) -> list[torch.cuda.Event]:
    """The receiver's view of a sender's EventRing; raises if this process cannot use them."""
    with torch.cuda.device(device):
        events = [torch.cuda.Event.from_ipc_handle(device, h) for h in handles]
        for e in events:
            e.query()
    return events

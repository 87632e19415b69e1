"""Pin a process to the CPU cores next to its GPU (the GPU's NUMA node).

A worker's Python threads (engine loop, KV transfer progress, gRPC) launch kernels and poll
the GPU all the time; on a host of several NUMA nodes, cores of another node add memory
latency to every one of those calls and change from run to run with the scheduler's
placement. Linux publishes each PCI device's local cores in
/sys/bus/pci/devices/<bus id>/local_cpulist; we keep the process on those (intersected
with the cores it may use now). Nothing happens without CUDA, on a host where the GPU is
local to every core, or when PDSERVE_CPU_AFFINITY=off.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("pdserve.engine")


def parse_cpulist(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def gpu_local_cores(device: torch.device) -> set[int] | None:
    """The cores local to `device`'s PCI slot, or None when unknown."""
    try:
        p = torch.cuda.get_device_properties(device)
        addr = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None
    path = f"/sys/bus/pci/devices/{addr}/local_cpulist"
    try:
        with open(path) as f:
            return parse_cpulist(f.read()) or None
    except OSError:
        return None


def pin_to_gpu(device: torch.device | str) -> set[int] | None:
    """Keep this process on the cores local to `device`; the cores, or None if unchanged."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("PDSERVE_CPU_AFFINITY", "") == "off" \
            or not hasattr(os, "sched_setaffinity"):
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    local = gpu_local_cores(device)
    allowed = os.sched_getaffinity(0)
    if not local or not (local & allowed) or local >= allowed:
        return None
    cores = local & allowed
    for tid in _thread_ids():  # every thread (CUDA's and NCCL's too); later ones inherit
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass  # a thread that just ended
    log.info("pinned to the %d cores local to %s", len(cores), device)
    return cores


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]

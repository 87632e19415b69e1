"""CPU time of processes and of the whole machine, from /proc (Linux), for benchmarks that
report how busy the CPUs were."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def system_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return (sum(vals[:8]) - vals[3] - vals[4]) / CLK_TCK


@dataclass
class CpuSample:
    t: float
    system: float
    procs: dict[str, float]  # group name -> CPU seconds

    @staticmethod
    def take(groups: dict[str, Sequence[int]]) -> CpuSample:
        return CpuSample(time.monotonic(), system_busy_s(),
                         {g: sum(proc_cpu_s(p) for p in pids) for g, pids in groups.items()})


def cpu_usage(a: CpuSample, b: CpuSample) -> dict[str, float]:
    """Cores used per group between two samples, plus 'other' (the rest of the machine)."""
    dt = max(b.t - a.t, 1e-9)
    out = {g: (b.procs[g] - a.procs[g]) / dt for g in a.procs}
    out["other"] = max(0.0, (b.system - a.system) / dt - sum(out.values()))
    return out


# -- the summary of one cell -----------------------------------------------------------------

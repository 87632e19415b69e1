"""When the coordinator received each worker's heartbeat, recorded by `pdserve bench
capstone` for every run (docs/capstone.md, "Heartbeat records").

Why: the coordinator routes a colocated (or conditional, locally prefilled) request to the
worker with the most free KV blocks as of that worker's last heartbeat
(coordinator/registry.py, router.py); nothing is reserved for it, so the choice changes
only when a heartbeat lands, and which worker takes a second's requests depends on the
workers' heartbeat phases. The planner's validation replays these times
(benchmarks/planner_sim.py `heartbeats`) instead of assuming evenly spread phases.

How, with no coordinator change: `HeartbeatRecorder` polls the coordinator's ListWorkers
every `period_s` on a thread. Each worker's `last_seen_s` there is the time since the
coordinator received its latest heartbeat, as of the moment the coordinator answered; that
moment lies between the poll's send and its reply (`time.perf_counter`, the clock of the
per-request records), so the heartbeat arrived in [sent - last_seen_s, replied -
last_seen_s]. Polls that see the same heartbeat narrow that interval (intersection); a poll
whose interval starts after the current one ends, or whose load snapshot differs, saw a
new one. A poll period under the heartbeat period (1 s) misses none. The first "heartbeat"
of a worker may be its registration (the registry sets last_seen there too).

Stored in requests.json.gz under "heartbeats", per run (key as the run's requests):
{"poll_s": P, "workers": {worker_id: {"role": R, "beats": [[t, half_width, free_blocks,
running, waiting, queued_prefill_tokens], ...]}}}, t in seconds from the run's first send
(the per-request records' clock), from `MARGIN_BEFORE_S` before it to `MARGIN_AFTER_S`
after the run's last chunk.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from pdserve.benchmarks.capstone_client import BackgroundPoller

MARGIN_BEFORE_S = 2.0  # the snapshot the first requests were routed on, and the phase
MARGIN_AFTER_S = 1.0
LOAD_KEYS = ("free_blocks", "running", "waiting", "queued_prefill_tokens")


class HeartbeatRecorder(BackgroundPoller):
    """Polls a pdserve coordinator's ListWorkers; `beats`: {worker_id: [[lo, hi, *load]]}
    (perf_counter seconds: when the coordinator received the heartbeat, at the earliest and
    at the latest), `roles`: {worker_id: role}. `note` says why nothing was recorded."""

    def __init__(self, address: str | None, period_s: float = 0.1) -> None:
        self.address, self.period_s = address, period_s
        self.beats: dict[str, list[list[float]]] = {}
        self.roles: dict[str, str] = {}
        self.polls, self.note = 0, "" if address else "not a pdserve coordinator"
        super().__init__()

    def observe(self, sent: float, replied: float, workers: Sequence[dict]) -> None:
        """One ListWorkers reply (coordinator/client.py `list_workers` dicts)."""
        self.polls += 1
        for w in workers:
            info, load = w.get("info", {}), w.get("load", {})
            wid = info.get("worker_id", "")
            if not wid:
                continue
            self.roles[wid] = info.get("role", "")
            ago = float(w.get("last_seen_s", 0.0))
            lo, hi = sent - ago, replied - ago
            snap = [float(load.get(k, 0)) for k in LOAD_KEYS]
            beats = self.beats.setdefault(wid, [])
            if beats and lo <= beats[-1][1] and snap == beats[-1][2:]:  # the same heartbeat
                beats[-1][0], beats[-1][1] = max(beats[-1][0], lo), min(beats[-1][1], hi)
            else:
                beats.append([lo, hi, *snap])

    def _loop(self) -> None:
        from pdserve.coordinator.client import Client

        try:
            with Client(self.address, timeout_s=5) as c:
                while not self._stop.is_set():
                    sent = time.perf_counter()
                    try:
                        workers = c.list_workers()
                    except Exception as e:  # noqa: BLE001 - a missed poll, not a failed run
                        self.note = f"a poll failed: {type(e).__name__}"
                    else:
                        self.observe(sent, time.perf_counter(), workers)
                    self._stop.wait(self.period_s)
        except Exception as e:  # noqa: BLE001 - recording is best effort
            self.note = f"not recorded ({type(e).__name__}: {e})"[:200]

    join_s, thread_name = 10.0, "heartbeats"

    def _active(self) -> bool:
        return bool(self.address)


def run_record(beats: dict[str, list[list[float]]], roles: dict[str, str], poll_s: float,
               t0: float, t_end: float) -> dict:
    """The heartbeats of one run: those received from MARGIN_BEFORE_S before its first send
    (`t0`) to MARGIN_AFTER_S after its last chunk (`t_end`), in seconds from `t0`."""
    workers = {}
    for wid, bs in sorted(beats.items()):
        rows = [[round((lo + hi) / 2 - t0, 5), round(max(0.0, hi - lo) / 2, 5), *map(int, s)]
                for lo, hi, *s in bs if t0 - MARGIN_BEFORE_S <= hi and lo <= t_end + MARGIN_AFTER_S]
        workers[wid] = {"role": roles.get(wid, ""), "beats": rows}
    return {"poll_s": poll_s, "workers": workers}


def load_records(run_dir: str) -> dict[str, dict]:
    """{run key (capstone_rerender.run_key): run_record} from a run directory's
    requests.json.gz; {} for runs that did not record heartbeats."""
    from pdserve.benchmarks.capstone_records import read_records

    return (read_records(run_dir) or {}).get("heartbeats") or {}


def _natural(wid: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", wid)]


def routed_times(record: dict | None, role: str, n: int) -> list[list[float]] | None:
    """Per routed worker of `role` ('both' for Nboth, 'decode' for xPyD), in worker-id order,
    the times (s from the run's first send) at which the coordinator received its
    heartbeats: what planner_sim `simulate(heartbeats=...)` takes. None when the record is
    missing or does not hold exactly `n` such workers with heartbeats (then the simulator
    keeps its evenly spread phases)."""
    if not record:
        return None
    ws = [w for wid, w in sorted(record.get("workers", {}).items(), key=lambda kv: _natural(kv[0]))
          if w.get("role") == role]
    times = [sorted(b[0] for b in w.get("beats", [])) for w in ws]
    if len(times) != n or not all(times):
        return None
    return times


def pool_blocks(records: list[dict | None]) -> int:
    """The most free KV blocks any worker reported in these runs' heartbeats: a worker's
    whole pool, as reported while it was idle (0 when nothing was recorded). Its prefix
    cache can hold no more (planner_cache.PrefixCaches.capacity_tokens)."""
    return max((int(b[2]) for rec in records if rec for w in rec.get("workers", {}).values()
                for b in w.get("beats", []) if len(b) > 2), default=0)

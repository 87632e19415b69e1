"""Read the timelines written with PDSERVE_KV_TRACE=PREFIX (kvtransfer/trace.py) and print,
per request size, the median time of each step from the sender's start() call and, as a
second column, from its finish() call (`bench transfer --start ahead` calls start() 2 ms
before finish(): the clock starts at finish()):

    PDSERVE_KV_TRACE=/tmp/kv pdserve bench transfer ...   # both processes write PREFIX.<pid>.jsonl
    python -m pdserve.benchmarks.transfer_trace /tmp/kv
    python -m pdserve.benchmarks.transfer_trace /tmp/kv --window 32   # two requests of 32
        blocks, every event of both processes in order, with each thread's CPU time between
        its events (CPU ~ wall: the thread computed; CPU << wall: it waited)

Steps keep their order of first appearance; a step seen k times per request (one per
message) is listed as step#k. gpu_* rows are the CUDA-event durations of gathers and
scatters (ms), not offsets.
"""

from __future__ import annotations

import glob
import json
import sys
from collections import defaultdict

import numpy as np


def load(prefix: str) -> list[dict]:
    events = []
    for path in sorted(glob.glob(f"{prefix}.*.jsonl")):
        with open(path) as f:
            events += [json.loads(line) for line in f]
    return events


def timelines(events: list[dict], anchor: str = "start") -> dict[int, dict[str, list[float]]]:
    """{blocks: {step: [offset ms per request]}} for requests with a sender start(); offsets
    from the request's `anchor` event (start, or finish_call: the finish() call)."""
    by_req: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e["req"] is not None:
            by_req[str(e["req"])].append(e)
    out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for evs in by_req.values():
        start = next((e for e in evs if e["role"] == "tx" and e["ev"] == "start"), None)
        zero = next((e for e in evs if e["role"] == "tx" and e["ev"] == anchor), None)
        if start is None or zero is None:
            continue
        seen: dict[str, int] = defaultdict(int)
        for e in sorted(evs, key=lambda e: (e["t"] == 0.0, e["t"])):
            key = f"{e['role']}.{e['ev']}"
            seen[key] += 1
            name = key if seen[key] == 1 else f"{key}#{seen[key]}"
            if e["ev"].startswith("gpu_"):
                if isinstance(e["d"], (int, float)):
                    out[start["d"]][name].append(float(e["d"]))
            elif e["t"]:
                out[start["d"]][name].append((e["t"] - zero["t"]) * 1e3)
    return out


def baseline(events: list[dict]) -> dict[int, list[float]]:
    """{bytes: [post -> receiver's recv_done, ms]} of the raw sends."""
    post = {e["req"]: e for e in events if e["role"] == "base" and e["ev"] == "post"}
    out: dict[int, list[float]] = defaultdict(list)
    for e in events:
        if e["role"] == "base" and e["ev"] == "recv_done" and e["req"] in post:
            p = post[e["req"]]
            out[p["d"]].append((e["t"] - p["t"]) * 1e3)
    return out


def window(events: list[dict], nblocks: int, count: int = 2) -> None:
    timed = sorted((e for e in events if e["t"]), key=lambda e: e["t"])
    starts = [e for e in timed if e["ev"] == "start" and e["d"] == nblocks]
    for s in starts[len(starts) // 2:len(starts) // 2 + count]:
        print(f"---- request {s['req']}")
        last: dict[str, tuple[float, float]] = {}
        for e in timed:
            if s["t"] <= e["t"] <= s["t"] + 0.003:
                prev = last.get(e["role"])
                delta = "" if prev is None else \
                    f"cpu+{(e['cpu'] - prev[1]) * 1e3:6.3f} wall+{(e['t'] - prev[0]) * 1e3:6.3f}"
                print(f"{(e['t'] - s['t']) * 1e3:8.3f} {e['role']:5s} {e['ev']:18s} "
                      f"{str(e['req']):6s} {str(e['d']):6s} {delta}")
                last[e["role"]] = (e["t"], e["cpu"])


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--window":
        window(load(argv[0]), int(argv[2]))
        return 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    events = load(argv[0])
    from_finish = timelines(events, "finish_call")
    for nb, steps in sorted(timelines(events).items()):
        n = max(len(v) for v in steps.values())
        fin = from_finish.get(nb, {})
        print(f"\n== {nb} blocks ({n} requests): median ms from tx.start, from tx.finish_call")
        for name, vals in steps.items():
            if len(vals) >= n // 2:
                f = f"{np.median(fin[name]):9.3f}" if fin.get(name) else " " * 9
                print(f"  {name:28s} {np.median(vals):9.3f} {f}   (n={len(vals)})")
    ops: dict[tuple, list[float]] = defaultdict(list)
    for e in events:
        if e["role"] in ("nccl", "base") and e["ev"].startswith("gpu_") and \
                isinstance(e["d"], (int, float)):
            ops[(e["role"], e["ev"], e["req"])].append(e["d"])
    for (role, ev, nbytes), vals in sorted(ops.items()):
        print(f"{role} {ev} {nbytes / 2**20:8.1f} MiB: GPU {np.median(vals):.3f} ms "
              f"(median of {len(vals)}, from enqueue on its stream to its end)")
    for nbytes, vals in sorted(baseline(events).items()):
        print(f"raw send {nbytes / 2**20:8.1f} MiB: post -> recv done {np.median(vals):.3f} ms "
              f"(n={len(vals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

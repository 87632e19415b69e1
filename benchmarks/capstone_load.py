"""The capstone's load generator in several processes (`--load-procs`), so that the client's
end of the streams is not what limits a run.

Why: every token reaches the client as one gRPC message, and one Python process receives
them all on one event loop. On 4 x H100 (session 14) the load generator used 1.22-1.39
cores in the decode-heavy runs that fell over, about what the relay probe's client used at
its saturation (1.3-1.5), while the coordinator stayed under its own (1.56-1.74 against
1.8-2.0). On the 2-core CPU machine the capstone's client spent ~20% more CPU a message
than the probe's leaner client (`bench coordinator`'s). So the runs could meet the client's
limit before the coordinator's, which the probe measures and the planner simulates.

How: `procs` processes (spawned once, reused by every run and setup) each hold their own
target (`capstone_client.make_target` from the target's `spec`) and event loop. A run's
requests are dealt round robin (request i to process i % procs, so each gets a thinned
copy of the same arrival process; a fixed concurrency is split between them), every
process starts at one shared `time.perf_counter()` instant (CLOCK_MONOTONIC on Linux, the
same in every process of the host), and the results come back in send order with the
times on that one clock. With `procs` = 1 the run stays in this process (`run_load`).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from pdserve.benchmarks.capstone_client import make_target, run_load
from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_workloads import Request

START_LEAD_S = 0.2  # the shared start: this long after the parent hands the requests out
READY_S = 60.0  # a load process's start (imports), at most
PROCS_PER_CORES = 16  # --load-procs auto: one process per this many host cores, 1 to 4


def auto_procs(cores: int | None = None) -> int:
    """--load-procs auto: 1 on a small machine (the processes would compete with the server
    for its cores), up to 4 on a GPU host (64 cores: 4)."""
    return max(1, min(4, (cores or os.cpu_count() or 1) // PROCS_PER_CORES))


def parse_procs(value: str) -> int:
    """--load-procs: an integer >= 1, or auto (`auto_procs`)."""
    from pdserve.worker_cli import positive_int

    return auto_procs() if value == "auto" else positive_int(value)


def split(n: int, parts: int) -> list[int]:
    """`n` (a concurrency) over `parts` processes, as evenly as it goes."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _serve(conn: Connection, done) -> None:
    """One load process: runs what the parent sends, (spec, requests, timeout_s,
    concurrency, start_at, time_limit_s), until it sends None; replies with the results
    (or the exception)."""
    from pdserve.proto.grpc_util import install_uvloop

    install_uvloop()
    loop = asyncio.new_event_loop()
    targets: dict[tuple, object] = {}
    conn.send("ready")  # imports done: a run's shared start is not spent on them

    def count() -> None:
        with done.get_lock():
            done.value += 1
    try:
        while (job := conn.recv()) is not None:
            spec, reqs, timeout_s, conc, start_at, limit = job
            try:
                if spec not in targets:
                    targets[spec] = make_target(spec)
                conn.send(loop.run_until_complete(run_load(
                    targets[spec], reqs, timeout_s, conc, time_limit_s=limit,
                    start_at=start_at, on_done=count)))
            except Exception as e:  # noqa: BLE001 - the parent raises it
                conn.send(e)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for t in targets.values():
            loop.run_until_complete(t.close())
        loop.close()


def _results(reply: object) -> list[RequestResult]:
    """A load process's reply: its results, or the exception it raised (raised here)."""
    if isinstance(reply, BaseException):
        raise RuntimeError(f"a load process failed: {type(reply).__name__}: {reply}")
    return reply  # type: ignore[return-value]


class LoadProcs:
    """`procs` load processes (module docstring); a context manager."""

    def __init__(self, procs: int) -> None:
        if procs < 1:
            raise ValueError(f"--load-procs must be >= 1, got {procs}")
        self.procs = procs
        self._conns: list[Connection] = []
        self._children: list[mp.process.BaseProcess] = []
        if procs == 1:
            return
        ctx = mp.get_context("spawn")  # no fork: the parent holds gRPC and CUDA state
        self._done = ctx.Value("q", 0)
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, self._done), daemon=True,
                            name="pdserve-load")
            p.start()
            child.close()
            self._conns.append(parent)
            self._children.append(p)
        for c in self._conns:
            if not c.poll(READY_S) or c.recv() != "ready":
                self.close()
                raise RuntimeError(f"a load process did not start in {READY_S:g} s")

    def pids(self) -> list[int]:
        """The load processes' pids (none with one process: this one sends)."""
        return [p.pid for p in self._children if p.pid is not None]

    def __enter__(self) -> LoadProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._children:
            p.join(10)
            if p.is_alive():
                p.kill()
        self._conns, self._children = [], []

    async def warm(self, target, requests: Sequence[Request], timeout_s: float) -> None:
        """`requests` sent by this process and, in turn, by every load process: each
        connects its target before the measured runs."""
        await run_load(target, requests, timeout_s)
        for c in self._conns:
            await asyncio.get_running_loop().run_in_executor(
                None, self._one, c, (target.spec, list(requests), timeout_s, 0, None, math.inf))

    @staticmethod
    def _one(c: Connection, job: tuple) -> list[RequestResult]:
        c.send(job)
        return _results(c.recv())

    async def run(self, target, requests: Sequence[Request], timeout_s: float,
                  concurrency: int = 0, desc: str = "",
                  time_limit_s: float = math.inf) -> list[RequestResult]:
        """`run_load` over the processes: the results in send order (requests in `at_s`
        order; in concurrency mode, by request index)."""
        n = min(self.procs, len(requests), concurrency or len(requests))
        if self.procs == 1 or n <= 1:
            return await run_load(target, requests, timeout_s, concurrency, desc,
                                  time_limit_s=time_limit_s)
        return await asyncio.get_running_loop().run_in_executor(
            None, self._run, target.spec, requests, timeout_s, concurrency, desc, time_limit_s,
            n)

    def _run(self, spec: tuple, requests: Sequence[Request], timeout_s: float,
             concurrency: int, desc: str, time_limit_s: float, n: int) -> list[RequestResult]:
        from tqdm import tqdm

        parts = [list(range(i, len(requests), n)) for i in range(n)]
        concs = split(concurrency, n) if concurrency else [0] * n
        with self._done.get_lock():
            self._done.value = 0
        start_at = time.perf_counter() + START_LEAD_S
        conns = self._conns[:n]
        for c, idx, conc in zip(conns, parts, concs):
            c.send((spec, [requests[i] for i in idx], timeout_s, conc, start_at, time_limit_s))
        got: dict[Connection, object] = {}
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
            while len(got) < n:
                for c in wait([c for c in conns if c not in got], timeout=0.25):
                    got[c] = c.recv()
                bar.update(self._done.value - bar.n)
        merged: list[tuple[int, RequestResult]] = []
        for c, idx in zip(conns, parts):  # a process's results: its requests sent, in order
            merged += zip(idx, _results(got[c]))
        return [r for _, r in sorted(merged, key=lambda m: m[0])]

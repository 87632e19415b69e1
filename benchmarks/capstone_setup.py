"""One setup of `pdserve bench capstone`, running: `open_setup` starts it (LocalCluster on
the run's devices; or names the server of --coordinator / --base-url) and yields the load
target with what the report says of it (label, workers, vocab, max_len, pools)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pdserve.benchmarks.capstone_client import GrpcTarget, OpenAITarget
from pdserve.benchmarks.planner_setups import parse_setup, setup_name


@contextmanager
def open_setup(name: str, args: argparse.Namespace,
               start_timeout_s: float | None = None) -> Iterator[tuple[object, dict]]:
    """(target, info) for one setup; info: label, workers, vocab, max_len, pools, and for a
    setup launched here coordinator (its address) and coordinator_pid.
    `start_timeout_s`: at most this long for the workers (default --start-timeout)."""
    if args.base_url:
        target = OpenAITarget(args.base_url, args.served_model_name)
        yield target, {"label": args.label or "external", "workers": target.name,
                       "vocab": args.vocab, "max_len": 0, "pools": {}}
        return
    if args.coordinator:
        yield from _pdserve_setup(args.coordinator, "", args)
        return
    from pdserve.cluster import LocalCluster

    s = parse_setup(name)
    print(f"starting {name} on {args.devices} ({args.model})", flush=True)
    t0 = time.monotonic()
    coordinator_args = ["--pd-threshold-tokens", str(s.cond_tokens)] if s.cond_tokens else []
    with LocalCluster(args.model, prefill=s.prefill, decode=s.decode, both=s.both,
                      devices=args.devices, transfer=args.transfer, worker_args=args.worker_arg,
                      coordinator_args=coordinator_args,
                      start_timeout_s=start_timeout_s or args.start_timeout) as c:
        c.wait_ready(start_timeout_s or args.start_timeout)
        print(f"{name} ready after {time.monotonic() - t0:.1f} s", flush=True)
        coordinator = c.coordinator.pid if c.coordinator else 0
        yield from _pdserve_setup(c.address, name, args, coordinator)


@contextmanager
def _infos(address: str) -> Iterator[list[dict]]:
    from pdserve.coordinator.client import Client

    with Client(address, timeout_s=30) as c:
        yield [w["info"] for w in c.list_workers()]


def _pdserve_setup(address: str, name: str, args: argparse.Namespace, pid: int = 0):
    with _infos(address) as infos:
        info = _describe(infos, name)
    info["coordinator"] = address  # for the heartbeat records
    info["coordinator_pid"] = pid  # launched here: its CPU per run (0: not ours)
    yield GrpcTarget(address), info


def _describe(infos: list[dict], name: str) -> dict:
    pools: dict[str, list[int]] = {}
    for i in infos:
        if i["device"].startswith("cuda:"):
            pools.setdefault(i["role"], []).append(int(i["device"].split(":")[1]))
    roles = [i["role"] for i in infos]
    label = name or setup_name(roles.count("prefill"), roles.count("decode"), roles.count("both"))
    return {
        "label": label, "workers": ", ".join(f"{i['role']}@{i['device']}" for i in infos),
        "vocab": min((i["vocab_size"] for i in infos if i["vocab_size"]), default=256),
        "max_len": min((i["max_model_len"] for i in infos if i["max_model_len"]), default=0),
        "pools": pools}

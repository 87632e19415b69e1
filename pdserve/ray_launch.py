"""`pdserve up --ray ADDRESS`: the coordinator(s) and the workers as Ray actors.

    pdserve up --ray HEAD:6379 --model tiny --devices cpu --prefill 1 --decode 1 \
        --prefill-resource pool_p --decode-resource pool_d

Each actor runs one `pdserve coordinator` or `pdserve worker` process (the same CLI as on
one node) and lives exactly as long as it: the process dies with the actor (its parent
thread dies: PR_SET_PDEATHSIG), and the actor exits when the process does, so Ray restarts
either failure (`max_restarts`). A restarted worker registers again under the same worker
id, at the new address. Workers take one GPU each (`num_gpus=1`; Ray sets
CUDA_VISIBLE_DEVICES, so the device is cuda:0) or, with `--devices cpu`, one CPU.

Placement: `--prefill-resource NAME` / `--decode-resource NAME` ask for one unit of a
custom resource per worker (give nodes those with `ray start --resources`);
`--prefill-nodes` / `--decode-nodes` pin workers to nodes (IP addresses or Ray node ids,
round robin). Coordinators go on the head node unless `--coordinator-nodes` says otherwise.
With `--etcd`, `--coordinators N` places N coordinators and the workers register in etcd.
Each worker advertises its node's IP address.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pdserve.cluster import ROLES, role_counts

READY_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray (with --ray)")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="place the coordinator and workers as actors on this Ray cluster "
                        "(HEAD:6379, or 'auto')")
    for role in ROLES:
        g.add_argument(f"--{role}-nodes", default=None, metavar="NODES",
                       help=f"{role} workers on these nodes (IPs or Ray node ids, comma-separated)")
        g.add_argument(f"--{role}-resource", default=None, metavar="NAME",
                       help=f"each {role} worker takes one unit of this custom resource")
    g.add_argument("--coordinator-nodes", default=None, metavar="NODES",
                   help="coordinators on these nodes (default: the head node)")
    g.add_argument("--coordinators", type=int, default=1,
                   help="coordinators to place (more than one needs --etcd)")
    g.add_argument("--etcd", default=None, metavar="URL",
                   help="registry in etcd: coordinators read it, workers register there")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="Ray restarts of a dead actor (default 3)")


def _process_actor_class(ray: Any) -> Any:
    import os
    import subprocess
    import threading

    from pdserve.child_process import child_preexec, libc

    class ProcessActor:
        """One pdserve process. In its argv, `{node_ip}` becomes this node's address and
        `{python}` this actor's interpreter (each node's own Python environment)."""

        def __init__(self, name: str, argv: list[str]) -> None:
            self.name = name
            self.node_ip = ray.util.get_node_ip_address()
            self.node_id = ray.get_runtime_context().get_node_id()
            fields = {"{node_ip}": self.node_ip, "{python}": sys.executable}
            self.argv = [fields.get(a, a) for a in argv]
            self.log_path = f"/tmp/pdserve-ray-{name}-{os.getpid()}.log"
            started = threading.Event()
            self.child: subprocess.Popen | None = None
            # the thread that forks must outlive the child (PR_SET_PDEATHSIG follows it)
            threading.Thread(target=self._run, args=(started,), daemon=True).start()
            started.wait()

        def _run(self, started: threading.Event) -> None:
            with open(self.log_path, "wb") as log:
                self.child = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=child_preexec(os.getpid(), libc()), close_fds=True)
            started.set()
            code = self.child.wait()
            print(f"pdserve ray: {self.name} exited with {code}; ending the actor", flush=True)
            os._exit(1)  # the actor dies with its process: Ray restarts both

        def describe(self) -> dict[str, Any]:
            return {"name": self.name, "node_ip": self.node_ip, "node_id": self.node_id,
                    "pid": os.getpid(), "child_pid": self.child.pid if self.child else None}

        def log_tail(self, max_bytes: int = 4000) -> str:
            with open(self.log_path, "rb") as f:
                return f.read()[-max_bytes:].decode(errors="replace")

    return ray.remote(ProcessActor)


def _node_ids(ray: Any, spec: str | None) -> list[str]:
    """Ray node ids for "ip,ip" or "id,id" (alive nodes only)."""
    if not spec:
        return []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        match = [n["NodeID"] for n in nodes if item in (n["NodeID"], n["NodeManagerAddress"])]
        if not match:
            raise SystemExit(f"pdserve up: no alive Ray node {item!r}")
        out += match
    return out


def _options(ray: Any, nodes: list[str], index: int, resource: str | None, num_gpus: float,
             max_restarts: int) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus, "max_restarts": max_restarts,
                            "max_concurrency": 4}
    if resource:
        opts["resources"] = {resource: 1}
    if nodes:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[index % len(nodes)],
                                                                     soft=False)
    return opts


def run_ray(args: argparse.Namespace) -> int:
    try:
        import ray
    except ImportError:
        print("pdserve up: --ray needs Ray: pip install 'pdserve[ray]'", file=sys.stderr)
        return 2
    if args.coordinators > 1 and not args.etcd:
        print("pdserve up: --coordinators > 1 needs --etcd (a registry they share)", file=sys.stderr)
        return 2
    ray.init(address=args.ray, log_to_driver=False)
    actor_cls = _process_actor_class(ray)
    py = ["{python}", "-m", "pdserve.cli"]
    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(
        "node:__internal_head__")]
    coord_nodes = _node_ids(ray, args.coordinator_nodes) or head
    actors: dict[str, Any] = {}
    try:
        coords = []
        for i in range(args.coordinators):
            argv = py + ["coordinator", "--host", "0.0.0.0", "--port", str(args.port + i)]
            argv += ["--etcd", args.etcd] if args.etcd else []
            argv += ["--routing", args.routing] if args.routing else []
            actors[f"coordinator-{i}"] = actor_cls.options(**_options(
                ray, coord_nodes, i, None, 0, args.max_restarts)).remote(f"coordinator-{i}", argv)
            coords.append(f"{ray.get(actors[f'coordinator-{i}'].describe.remote())['node_ip']}:"
                          f"{args.port + i}")
        address = ",".join(coords)
        on_gpu = args.devices != "cpu" and (args.devices != "auto"
                                            or ray.cluster_resources().get("GPU", 0) > 0)
        transfer = args.transfer or ("nccl" if on_gpu else "ucx")
        counts = {"prefill": args.prefill, "decode": args.decode, "both": args.both}
        for role in ROLES:
            nodes = _node_ids(ray, getattr(args, f"{role}_nodes"))
            for i in range(counts[role]):
                name = f"{role}-{i}"
                argv = py + ["worker", "--role", role, "--model", args.model, "--device",
                             "cuda:0" if on_gpu else "cpu", "--transfer", transfer,
                             "--host", "0.0.0.0", "--advertise-host", "{node_ip}",
                             "--worker-id", name]
                argv += ["--etcd", args.etcd] if args.etcd else ["--coordinator", coords[0]]
                argv += (["--dtype", args.dtype] if args.dtype else []) + list(args.worker_arg)
                actors[name] = actor_cls.options(**_options(
                    ray, nodes, i, getattr(args, f"{role}_resource"), 1 if on_gpu else 0,
                    args.max_restarts)).remote(name, argv)
        for name, actor in actors.items():
            d = ray.get(actor.describe.remote())
            print(f"pdserve up: {name} on node {d['node_id']} ({d['node_ip']}) actor pid "
                  f"{d['pid']}", flush=True)
        _wait_ready(address, counts, args.ready_timeout)
        print(f"pdserve up: ready at {address} ({role_counts(*counts.values())})", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("pdserve up: interrupted, shutting down", flush=True)
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        ray.shutdown()
    return 0


def _wait_ready(address: str, counts: dict[str, int], timeout_s: float) -> None:
    from pdserve.coordinator.client import Client

    with Client(address) as client:
        client.wait_ready(counts["prefill"], counts["decode"], counts["both"], timeout_s=timeout_s)



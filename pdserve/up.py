"""`pdserve up`: a coordinator and prefill/decode workers on this node, one process each.

    pdserve up --model tiny --prefill 1 --decode 1 --devices cpu
    pdserve up --model llama-3.1-8b --prefill 1 --decode 1 --devices 0,1 --port 50051

Waits until every worker is registered and healthy, prints
`pdserve up: ready at HOST:PORT (1 prefill, 1 decode)` and stays up. Ctrl-C or SIGTERM stops
every child (SIGTERM, then SIGKILL after --grace seconds); an `up` started with SIGINT
ignored (a script's background job, `pdserve up &`) keeps ignoring it, as Python does: stop
that one with SIGTERM. A child that exits once the cluster is ready is restarted with backoff
while the others keep serving (pdserve/supervisor.py); more than --restart-limit restarts of
one child within --restart-window seconds is a crash loop: `up` says so, stops the rest and
exits 1 (a child that exits before the cluster is ready fails `up` at once). Children log to
files under --log-dir.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import time
from types import FrameType

from pdserve.cluster import ClusterError, LocalCluster, WorkerSpec, require_devices, role_counts
from pdserve.supervisor import Supervisor

DEFAULT_PORT = 50051


def stop_signals() -> list[signal.Signals]:
    """The signals that stop `pdserve up`: SIGTERM, and SIGHUP (its terminal closed) unless
    it was started ignoring SIGHUP (`nohup pdserve up &`): then it keeps running."""
    sigs = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs.append(signal.SIGHUP)
    return sigs


class _Terminate(Exception):
    """Raised by the SIGTERM/SIGHUP handler to unwind into the shutdown path."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.coordinator.cli import ROUTING

    parser.add_argument("--model", default="tiny",
                        help="preset name, built-in model (smollm2-135m) or HF directory "
                             "(default tiny)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--both", type=int, default=0,
                        help="colocated (prefill+decode) workers (default 0)")
    parser.add_argument("--devices", default="auto",
                        help="cpu | auto | GPU indices like 0,1 (one worker per GPU: prefill "
                             "workers first, then decode, then both). auto: one GPU per worker "
                             "when CUDA is present, else cpu (default auto)")
    parser.add_argument("--host", default="127.0.0.1", help="coordinator bind address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"coordinator gRPC port, 0 = any free port (default {DEFAULT_PORT}); "
                             "workers always take free ports")
    parser.add_argument("--transfer", choices=("nccl", "ucx"), default=None,
                        help="KV transfer backend (default: nccl on GPUs, ucx on cpu)")
    parser.add_argument("--routing", choices=ROUTING, default=None,
                        help="coordinator routing policy (default: the coordinator's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: the worker's: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API on this port")
    parser.add_argument("--log-dir", default=None,
                        help="directory for the children's logs (default: a new temp dir)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for all workers to register (default 600)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL at shutdown (default 10)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every `pdserve worker` (repeatable), e.g. "
                             "--worker-arg=--num-blocks=1024")
    parser.add_argument("--coordinator-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `pdserve coordinator` (repeatable), e.g. "
                             "--coordinator-arg=--stall-timeout=5")
    parser.add_argument("--restart-limit", type=int, default=5,
                        help="restarts of one child within --restart-window before `up` gives "
                             "up (crash loop); 0 = never restart (default 5)")
    parser.add_argument("--restart-window", type=float, default=60.0,
                        help="seconds (default 60)")
    parser.add_argument("--restart-backoff", type=float, default=0.5,
                        help="delay before the first restart, doubling up to 10 s (default 0.5)")
    # For tests: run another program as each worker. A shell-like template whose words may
    # use {python} {role} {index} {name} {device} {coordinator} {model} {transfer}.
    parser.add_argument("--worker-cmd", default=None, help=argparse.SUPPRESS)
    from pdserve import ray_launch
    from pdserve.proto import tls

    tls.add_arguments(parser)
    ray_launch.add_arguments(parser)


def template_worker_cmd(template: str):
    """A LocalCluster worker_cmd from a --worker-cmd template."""
    words = shlex.split(template)
    names = "python|role|index|name|device|coordinator|model|transfer"

    def cmd(cluster: LocalCluster, spec: WorkerSpec) -> list[str]:
        fields = {"python": sys.executable, "role": spec.role, "index": str(spec.index),
                  "name": spec.name, "device": spec.device, "coordinator": cluster.address,
                  "model": cluster.model, "transfer": cluster.transfer}
        return [re.sub(r"\{(" + names + r")\}", lambda m: fields[m.group(1)], w) for w in words]
    return cmd


def cluster_from_args(args: argparse.Namespace) -> LocalCluster:
    from pdserve.proto import tls

    extra = {"worker_cmd": template_worker_cmd(args.worker_cmd)} if args.worker_cmd else {}
    return LocalCluster(
        model=args.model, prefill=args.prefill, decode=args.decode, both=args.both,
        devices=args.devices, host=args.host, port=args.port, transfer=args.transfer,
        routing=args.routing, dtype=args.dtype, http_port=args.http_port, log_dir=args.log_dir,
        worker_args=args.worker_arg, coordinator_args=args.coordinator_arg,
        stop_grace_s=args.grace, tls=tls.from_args(args), **extra)


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate(signal.Signals(signum).name)


def _say(msg: str, err: bool = False) -> None:
    print(f"pdserve up: {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None):
        from pdserve.ray_launch import run_ray

        if any(getattr(args, f, None) for f in ("tls_cert", "tls_key", "tls_ca", "tls_client_ca")):
            _say("error: --tls-* is not implemented with --ray; start the roles with "
                 "`pdserve coordinator|worker --tls-*` on each node", err=True)
            return 2
        return run_ray(args)
    try:
        cluster = cluster_from_args(args)
        if not args.worker_cmd:
            require_devices([spec.device for spec in cluster.specs])
    except ClusterError as e:
        _say(f"error: {e}", err=True)
        return 2
    try:  # a built-in model is fetched and converted once, here, before the workers start
        import os

        from pdserve.engine.model_cache import default_cache_dir, is_builtin, resolve_model
        if is_builtin(args.model):
            resolve_model(args.model, default_cache_dir(os.environ))
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        _say(f"error: model {args.model}: {e}", err=True)
        return 1
    old = {s: signal.signal(s, _raise_terminate) for s in stop_signals()}
    roles = role_counts(args.prefill, args.decode, args.both)
    devices = ", ".join(f"{s.name}={s.device}" for s in cluster.specs)
    rc = 0
    try:
        cluster.start()
        _say(f"starting {roles} for model {args.model} ({devices}; transfer {cluster.transfer}); "
             f"coordinator at {cluster.address}; logs in {cluster.log_dir}")
        cluster.wait_ready(args.ready_timeout)
        _say(f"ready at {cluster.address} ({roles})")
        if args.http_port is not None:
            scheme = "https" if cluster.tls is not None and cluster.tls.serves_tls else "http"
            _say(f"http gateway on {scheme}://{args.host}:{args.http_port}")
        sup = Supervisor(cluster, max_restarts=args.restart_limit, window_s=args.restart_window,
                         backoff_s=args.restart_backoff, say=lambda m: _say(m, err=True))
        while True:
            time.sleep(0.2)
            reason = sup.poll()
            if reason is not None:
                _say(f"error: {reason}; shutting down", err=True)
                rc = 1
                break
    except ClusterError as e:
        _say(f"error: {e}", err=True)
        rc = 1
    except KeyboardInterrupt:
        _say("interrupted, shutting down")
        rc = 0
    except _Terminate as e:
        _say(f"{e}, shutting down")
        rc = 0
    finally:
        # A second Ctrl-C during shutdown skips the grace period (LocalCluster.stop);
        # further SIGTERMs are ignored so the cleanup itself is never cut short.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0:
        _say("stopped")
    return rc

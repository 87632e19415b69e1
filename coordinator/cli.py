"""`pdserve coordinator`: run the gRPC coordinator (and optionally the HTTP gateway).

    pdserve coordinator --port 50051 --routing least_loaded --http-port 8000

Prints `coordinator listening on HOST:PORT` (and `http gateway on http://HOST:PORT`) once
serving, so scripts can wait for that line. SIGINT/SIGTERM stop it gracefully, within
--shutdown-grace seconds: should anything still hold the process then (a server stop that
hangs, or a thread that asyncio.run or interpreter exit would wait for, such as a stuck
executor call), it logs which threads are left and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from pdserve.coordinator.config import CoordinatorConfig, FailureConfig
from pdserve.proto import cluster_secret, tls

ROUTING = ("least_loaded", "round_robin", "prefix_aware")
SHUTDOWN_GRACE_S = 10.0
log = logging.getLogger("pdserve.coordinator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CoordinatorConfig()
    parser.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port,
                        help=f"gRPC port, 0 = any free port (default {d.port})")
    parser.add_argument("--routing", choices=ROUTING, default=d.routing,
                        help=f"routing policy (default {d.routing})")
    parser.add_argument("--pd-threshold-tokens", type=int, default=d.pd_threshold_tokens,
                        metavar="N",
                        help="conditional disaggregation: a prompt of fewer than N tokens is "
                             "prefilled on its decode worker itself (no prefill worker, no KV "
                             "transfer); longer ones are disaggregated. Counts prompt tokens "
                             "(prefix-cache hits are not known to the coordinator). 0 = always "
                             f"disaggregate (default {d.pd_threshold_tokens})")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests that may wait for decode KV blocks before new ones get "
                             f"RESOURCE_EXHAUSTED (default {d.max_queue})")
    parser.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s,
                        help=f"drop a worker silent this many seconds (default {d.worker_timeout_s:g})")
    parser.add_argument("--warm-up", type=float, default=10.0, metavar="SECONDS",
                        help="before a prefill or decode worker is registered, run one "
                             "throw-away request through each P/D pair it forms, so its KV "
                             "transfer path exists before clients see it (at most this long; "
                             "0 = off; default 10)")
    parser.add_argument("--heartbeat", type=float, default=d.heartbeat_s,
                        help=f"heartbeat period asked of workers, seconds (default {d.heartbeat_s:g})")
    parser.add_argument("--api-key", "--auth-token", dest="auth_token",
                        default=os.environ.get("PDSERVE_AUTH_TOKEN"),
                        help="clients' API key: Generate, Abort, ListWorkers and Stats require "
                             "metadata 'authorization: Bearer KEY' (default: $PDSERVE_AUTH_TOKEN, "
                             "unset = open); it never opens the cluster plane when a cluster "
                             "secret is set")
    cluster_secret.add_argument(parser)
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API on this port")
    parser.add_argument("--http-host", default=None, help="HTTP bind address (default: --host)")
    parser.add_argument("--model-cache-dir", default=None,
                        help="where built-in models (smollm2-135m) are converted on first use "
                             "(default $XDG_CACHE_HOME/pdserve/models or ~/.cache/pdserve/models)")
    parser.add_argument("--etcd", default=None, metavar="URL[,URL]",
                        help="read the worker registry from etcd (workers register there with "
                             "--etcd); several coordinators may serve one cluster")
    parser.add_argument("--etcd-prefix", default=d.etcd_prefix,
                        help=f"the cluster's key prefix in etcd (default {d.etcd_prefix})")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S,
                        metavar="SECONDS",
                        help="after SIGINT/SIGTERM, exit (status 1, with a log line) if the "
                             "graceful stop has not ended the process within this long "
                             f"(default {SHUTDOWN_GRACE_S:g})")
    tls.add_arguments(parser)
    add_failure_arguments(parser)


def add_failure_arguments(parser: argparse.ArgumentParser) -> None:
    """Detection, retry/migration and circuit breaking (FailureConfig)."""
    f = FailureConfig()
    g = parser.add_argument_group("failure handling")
    g.add_argument("--rpc-timeout", type=float, default=f.rpc_timeout_s,
                   help=f"deadline of a unary worker RPC, s (default {f.rpc_timeout_s:g})")
    g.add_argument("--prefill-timeout", type=float, default=f.prefill_timeout_s,
                   help=f"deadline of a Prefill without client deadline, s (default {f.prefill_timeout_s:g})")
    g.add_argument("--stall-timeout", type=float, default=f.stall_timeout_s,
                   help="migrate a request whose token stream is silent this long, s "
                        f"(default {f.stall_timeout_s:g})")
    g.add_argument("--suspect-heartbeats", type=float, default=f.suspect_heartbeats,
                   help="missed heartbeat periods before a worker gets no new work "
                        f"(default {f.suspect_heartbeats:g})")
    g.add_argument("--max-attempts", type=int, default=f.max_attempts,
                   help=f"worker pairs tried per request, retries and migrations included "
                        f"(default {f.max_attempts})")
    g.add_argument("--retry-backoff", type=float, default=f.retry_backoff_s,
                   help=f"pause before the 2nd attempt, doubling, s (default {f.retry_backoff_s:g})")
    g.add_argument("--rejoin-wait", type=float, default=f.rejoin_wait_s,
                   help="after a failure, wait this long for a worker of a role with none left "
                        f"to register again, s (default {f.rejoin_wait_s:g})")
    g.add_argument("--breaker-failures", type=int, default=f.breaker_failures,
                   help=f"failures within --breaker-window that open a worker's circuit "
                        f"(default {f.breaker_failures})")
    g.add_argument("--breaker-window", type=float, default=f.breaker_window_s,
                   help=f"s (default {f.breaker_window_s:g})")
    g.add_argument("--breaker-open", type=float, default=f.breaker_open_s,
                   help=f"how long an open circuit keeps work away, s (default {f.breaker_open_s:g})")


def failure_config_from_args(args: argparse.Namespace) -> FailureConfig:
    try:
        return FailureConfig(
            rpc_timeout_s=args.rpc_timeout, prefill_timeout_s=args.prefill_timeout,
            stall_timeout_s=args.stall_timeout, suspect_heartbeats=args.suspect_heartbeats,
            max_attempts=args.max_attempts, retry_backoff_s=args.retry_backoff,
            rejoin_wait_s=args.rejoin_wait,
            breaker_failures=args.breaker_failures, breaker_window_s=args.breaker_window,
            breaker_open_s=args.breaker_open)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    if args.worker_timeout <= 0 or args.heartbeat <= 0:
        raise SystemExit("error: --worker-timeout and --heartbeat must be positive")
    if args.max_queue < 0:
        raise SystemExit("error: --max-queue must be >= 0")
    if args.pd_threshold_tokens < 0:
        raise SystemExit("error: --pd-threshold-tokens must be >= 0 (0 = always disaggregate)")
    from pdserve.engine.model_cache import default_cache_dir

    cache_dir = getattr(args, "model_cache_dir", None) or str(default_cache_dir(os.environ))
    return CoordinatorConfig(host=args.host, port=args.port, heartbeat_s=args.heartbeat,
                        worker_timeout_s=args.worker_timeout, max_queue=args.max_queue,
                        routing=args.routing, auth_token=args.auth_token or None,
                        pd_threshold_tokens=args.pd_threshold_tokens,
                        model_cache_dir=cache_dir, warm_up_s=max(0.0, args.warm_up),
                        cluster_secret=cluster_secret.from_args(args),
                        etcd=args.etcd, etcd_prefix=args.etcd_prefix,
                        failure=failure_config_from_args(args), tls=tls.from_args(args))


def arm_exit_watchdog(grace_s: float) -> threading.Timer:
    """From a stop signal on: if this process still runs grace_s later, log what is left
    and exit at once (os._exit: no thread is waited for). A daemon timer: it never holds
    the process up itself."""
    def expire() -> None:
        left = sorted(t.name for t in threading.enumerate()
                      if t is not threading.current_thread() and t is not threading.main_thread()
                      and not t.daemon)
        log.warning("shutdown did not finish within %g s (non-daemon threads left: %s); "
                    "exiting now", grace_s, ", ".join(left) or "none")
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
        os._exit(1)
    timer = threading.Timer(grace_s, expire)
    timer.name, timer.daemon = "shutdown-watchdog", True
    timer.start()
    return timer


async def serve(config: CoordinatorConfig, http_port: int | None = None,
                http_host: str | None = None, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
    from pdserve.coordinator.server import CoordinatorServer

    server = CoordinatorServer(config, http_port=http_port, http_host=http_host)
    await server.start()
    print(f"coordinator listening on {server.address}", flush=True)
    if server.http_address:
        scheme = "https" if config.tls is not None and config.tls.serves_tls else "http"
        print(f"http gateway on {scheme}://{server.http_address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    arm_exit_watchdog(shutdown_grace_s)
    await server.stop(grace_s=min(2.0, shutdown_grace_s / 2))


def run(args: argparse.Namespace) -> int:
    from pdserve.proto.grpc_util import install_uvloop

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    grace = getattr(args, "shutdown_grace", SHUTDOWN_GRACE_S)
    if grace <= 0:
        raise SystemExit("error: --shutdown-grace must be positive")
    install_uvloop()
    asyncio.run(serve(config, args.http_port, args.http_host, grace))
    return 0

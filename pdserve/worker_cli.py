"""`pdserve worker --role prefill|decode|both ...`: one engine-backed worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pdserve import net
from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig, TransferConfig, WorkerConfig
from pdserve.proto import cluster_secret, tls
from pdserve.proto.convert import ROLES


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine."""
    p.add_argument("--model", default="tiny",
                   help="preset name (tiny, llama-3.1-8b, ...), built-in model (smollm2-135m) "
                        "or HF directory")
    p.add_argument("--model-cache-dir", default=None,
                   help="where built-in models are converted on first use "
                        "(default $XDG_CACHE_HOME/pdserve/models or ~/.cache/pdserve/models)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks in the pool (default: from --memory-fraction on cuda, 512 on cpu)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="fraction of GPU memory for weights + KV cache")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one step")
    p.add_argument("--max-num-seqs", type=int, default=256, help="running requests at once")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit in tokens")
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"],
                   help="attention backend (auto: triton on cuda, torch on cpu)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--no-overlap", action="store_true",
                   help="no overlap scheduling: plan each decode step after the previous one's "
                        "tokens are read (default: overlap on CUDA)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--seed", type=int, default=0, help="seed of random preset weights")


def model_cache_dir_from_args(args: argparse.Namespace) -> str:
    from pdserve.engine.model_cache import default_cache_dir

    return getattr(args, "model_cache_dir", None) or str(default_cache_dir(os.environ))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return EngineConfig(
        model=args.model, device=args.device, dtype=dtype, seed=args.seed,
        model_cache_dir=model_cache_dir_from_args(args),
        attention_backend=args.attention, enforce_eager=args.enforce_eager,
        overlap=False if args.no_overlap else None,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          memory_fraction=args.memory_fraction,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len),
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    secret = cluster_secret.from_args(args)
    return WorkerConfig(
        role=args.role, engine=engine_config_from_args(args),
        transfer=TransferConfig(backend=args.transfer, timeout_s=args.transfer_timeout,
                                layerwise=not args.no_layerwise,
                                layerwise_min_tokens=args.layerwise_min_tokens,
                                peer_copy=not args.no_peer_copy,
                                peer_copy_during_forward=args.peer_copy_during_forward,
                                landing_timeout_s=args.landing_timeout, secret=secret),
        host=args.host, advertise_host=net.advertise_host(args.host, args.advertise_host),
        port=args.port, worker_id=args.worker_id, coordinator=args.coordinator,
        heartbeat_s=args.heartbeat, auth_token=args.auth_token, cluster_secret=secret,
        etcd=args.etcd, etcd_prefix=args.etcd_prefix, lease_ttl_s=args.lease_ttl,
        tls=tls.from_args(args), stream_interval=args.stream_interval)


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, choices=ROLES,
                   help="prefill: run prompts and push KV; decode: receive KV and generate; "
                        "both: colocated engine")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="register with this coordinator (omit to serve standalone)")
    p.add_argument("--etcd", default=None, metavar="URL[,URL]",
                   help="register in this etcd under a lease instead of with --coordinator "
                        "(every coordinator started with the same --etcd serves this worker)")
    p.add_argument("--etcd-prefix", default="/pdserve", help="the cluster's key prefix in etcd")
    p.add_argument("--lease-ttl", type=int, default=3,
                   help="etcd lease seconds: a dead worker leaves the registry after this long")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (gRPC and KV control channel); 0.0.0.0: all")
    p.add_argument("--advertise-host", default=None,
                   help="address peers on other hosts use to reach this worker (default: "
                        "--host, or detected when --host is 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="Worker service port (0: pick a free one)")
    p.add_argument("--worker-id", default="", help="name in the registry (default: assigned)")
    p.add_argument("--transfer", default="ucx", choices=["ucx", "nccl"],
                   help="KV transfer backend between prefill and decode workers")
    p.add_argument("--stream-interval", type=positive_int, default=1, metavar="K",
                   help="tokens per streamed message after a request's first (default 1: "
                        "each token as it is sampled); K > 1 sends K times fewer messages "
                        "through the coordinator, each token up to K - 1 steps later")
    p.add_argument("--transfer-timeout", type=float, default=30.0,
                   help="seconds a request's KV transfer may take before both ends abort it")
    p.add_argument("--layerwise-min-tokens", type=int, default=1024,
                   help="prefill steps of fewer tokens push their KV after the forward, not "
                        "layer by layer (short forwards are launch-bound)")
    p.add_argument("--no-peer-copy", action="store_true",
                   help="always move KV through --transfer (default: a prefill worker on the "
                        "decode worker's host writes into its KV pool directly, CUDA IPC "
                        "between GPUs, and --transfer carries KV between hosts)")
    p.add_argument("--no-layerwise", action="store_true",
                   help="push KV after the whole prompt instead of layer by layer")
    p.add_argument("--peer-copy-during-forward", action="store_true",
                   help="let peer copies (one host) run layer by layer while the prompt "
                        "computes, as staged transfers do (default: after the forward, on "
                        "every SM; on NVLink that is faster than sharing SMs with the model)")
    p.add_argument("--landing-timeout", type=_positive, default=10.0,
                   help="decode side: seconds after a peer copy's `end` before a copy that has "
                        "not landed fails the request (its blocks stay fenced until the copy "
                        "lands or the prefill worker is gone)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--auth-token", default=None,
                   help="the coordinator's API key, for a coordinator without a cluster secret")
    cluster_secret.add_argument(p)
    p.add_argument("--log-level", default="INFO")
    tls.add_arguments(p)
    add_engine_arguments(p)


async def serve(args: argparse.Namespace) -> int:
    import pdserve.decode  # noqa: F401  (registers the decode and both roles)
    import pdserve.prefill  # noqa: F401  (registers the prefill role)
    from pdserve.worker.coordinator_link import RegistrationFailed, RegistrationRefused
    from pdserve.worker.server import WorkerServer

    if args.device.startswith("cuda"):
        from pdserve.engine.cpu_affinity import pin_to_gpu
        pin_to_gpu(args.device)  # before the engine's and the transfer's threads start
    try:
        server = WorkerServer(config_from_args(args))
        port = await server.start()
    except ValueError as exc:  # a setting the config (--transfer-timeout 0) or model refuses
        print(f"pdserve worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (RegistrationFailed, RegistrationRefused) as exc:
        print(f"pdserve worker: {exc}", file=sys.stderr, flush=True)
        await server.stop(grace_s=0)
        return 1
    print(f"pdserve worker: {args.role} {server.worker_id or ''} serving on {args.host}:{port}"
          f" (advertised as {server.cfg.advertised_host}:{port})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait())
    await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    await server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    from pdserve.proto.grpc_util import install_uvloop
    install_uvloop()
    return asyncio.run(serve(args))


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v

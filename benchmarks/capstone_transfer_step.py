"""The capstone's dedicated transfer step: `pdserve bench transfer` on the run's own GPUs
and KV geometry, before the serving setups start, so the report's transfer question is
answered from numbers of the same run.

Where: the first setup with prefill and decode workers, its first prefill GPU sending to
its first decode GPU (the devices LocalCluster gives them), else the first two devices;
on CPU both ends on CPU. What: the run's model's KV geometry (layers, KV heads, head
dimension, the workers' dtype and block size), the run's transfer backend, the lengths of
`--transfer-lens`. How: `python -m pdserve.cli bench transfer --json` in a subprocess
(its own session, killed with its receiver when it overruns), with CUDA_VISIBLE_DEVICES
naming the two GPUs, so the step's CUDA memory is freed before any worker starts. Its
rows (p50_ms, rx_p50_ms, baseline_p50_ms, ratio, rx_ratio, via, verified, phys_ms, ...)
go to results.json under "transfer_step"; capstone_transfer.py fits them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

GPU_LENS = "512,2048,8192,32768"  # 64 MiB to 4 GiB of llama-3.1-8b KV
CPU_LENS = "64,256,1024"
WARMUP = 2  # untimed iterations per length (first NCCL/IPC use, allocator)
MIN_S = 10.0  # a time limit under this would stop the step before its first row


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--transfer-lens", default="auto", metavar="LENS",
                   help="the dedicated transfer step before the setups start: `pdserve bench "
                        "transfer` between the first P/D setup's prefill and decode devices, "
                        "with the model's KV geometry, at these prompt lengths (comma-"
                        f"separated tokens; auto: {GPU_LENS} on GPUs, {CPU_LENS} on CPU; "
                        "none: skip the step)")
    g.add_argument("--transfer-iters", type=int, default=5,
                   help=f"timed iterations per length of the transfer step (default 5, after "
                        f"{WARMUP} untimed)")
    g.add_argument("--transfer-max-s", type=float, default=40.0, metavar="S",
                   help="the transfer step's time limit: it is stopped after S seconds (with "
                        "--budget-s also at most 15%% of the budget), and the report says so "
                        "(default 40)")


def check(args: argparse.Namespace) -> str | None:
    if args.transfer_iters < 1 or args.transfer_max_s <= 0:
        return "--transfer-iters must be >= 1 and --transfer-max-s > 0"
    if args.transfer_lens.strip().lower() not in ("auto", "none"):
        try:
            lens = [int(x) for x in args.transfer_lens.split(",") if x.strip()]
        except ValueError:
            lens = []
        if not lens or min(lens) < 1:
            return f"--transfer-lens: give auto, none or lengths like 512,2048, got " \
                   f"{args.transfer_lens!r}"
    return None


def devices(args: argparse.Namespace, setups: list[str]) -> tuple[str, str] | None:
    """(sender, receiver) devices, "cpu" or "cuda:N" as LocalCluster numbers them: the first
    setup with both prefill and decode workers, else the first two devices; None for a
    server this run did not launch."""
    from pdserve.benchmarks.planner_setups import parse_setup
    from pdserve.cluster import parse_devices

    if args.coordinator or args.base_url:
        return None
    for name in setups:
        s = parse_setup(name)
        if s.prefill and s.decode:
            devs = parse_devices(args.devices, s.prefill + s.decode + s.both)
            return devs[0], devs[s.prefill]
    devs = parse_devices(args.devices, 2)
    return devs[0], devs[1]


def worker_flag(args: argparse.Namespace, flag: str) -> str | None:
    """The value of a worker flag given through --worker-arg ('--x=v' or '--x', 'v')."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(flag)
    known, _ = p.parse_known_args(list(args.worker_arg))
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def kv_geometry(args: argparse.Namespace, on_gpu: bool) -> str:
    """`bench transfer --geometry` of the workers' KV: the model's layers, KV heads and head
    dimension; their dtype (--worker-arg --dtype, else bfloat16 on GPUs, float32 on CPU)."""
    from pdserve.benchmarks.transfer_peer import geometry_spec
    from pdserve.engine.loader import load_model_config
    from pdserve.engine.model_cache import default_cache_dir

    cfg = load_model_config(args.model, default_cache_dir(os.environ))
    dtype = worker_flag(args, "--dtype") or ("bfloat16" if on_gpu else "float32")
    return geometry_spec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)


def time_limit_s(args: argparse.Namespace, budget_total_s: float) -> float:
    limit = args.transfer_max_s
    return min(limit, 0.15 * budget_total_s) if budget_total_s > 0 else limit


def run_step(args: argparse.Namespace, setups: list[str], budget: Any) -> dict:
    """The step's record for results.json ("transfer_step"): its rows, or none and a "note"
    saying why (skipped, a server this run did not launch, a failure: never raised, the
    serving setups still run)."""
    spec = args.transfer_lens.strip().lower()
    rec: dict[str, Any] = {"rows": [], "note": ""}
    try:
        pair = devices(args, setups)
    except Exception as e:  # noqa: BLE001 - LocalCluster will say the same, louder
        return {**rec, "note": f"no transfer step: devices: {e}"}
    if pair is None:
        return {**rec, "note": "the run measured a server it did not launch (--coordinator "
                               "or --base-url): its devices are not known here"}
    if spec == "none":
        return {**rec, "note": "skipped (--transfer-lens none)"}
    on_gpu = pair[0] != "cpu"
    try:
        geo = kv_geometry(args, on_gpu)
    except Exception as e:  # noqa: BLE001 - an unknown model: the setups say more
        return {**rec, "note": f"no transfer step: the model's KV geometry: {e}"}
    lens = GPU_LENS if spec == "auto" and on_gpu else CPU_LENS if spec == "auto" else spec
    backend = args.transfer or ("nccl" if on_gpu else "ucx")
    block = worker_flag(args, "--block-size") or "16"
    if not block.isdigit():
        return {**rec, "note": f"no transfer step: --worker-arg --block-size {block!r}"}
    limit = time_limit_s(args, budget.total_s)
    if limit < MIN_S:
        return {**rec, "note": f"skipped: the budget leaves it {limit:.0f} s (< {MIN_S:g} s)"}
    cmd = ["bench", "transfer", "--backend", backend, "--device", "cuda" if on_gpu else "cpu",
           "--geometry", geo, "--input-lens", lens, "--iters", str(args.transfer_iters),
           "--warmup", str(WARMUP), "--block-size", block, "--start", "ahead", "--json"]
    rec.update(sender=pair[0], receiver=pair[1], backend=backend, geometry=geo, start="ahead",
               block_size=int(block), iters=args.transfer_iters, warmup=WARMUP,
               time_limit_s=limit, command="pdserve " + " ".join(cmd))
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if on_gpu:
        from pdserve.cluster import GPU_ENV

        for k, v in GPU_ENV.items():
            env.setdefault(k, v)
        ids = [d.split(":")[1] for d in pair]
        visible = [x for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[int(i)] if visible else i for i in ids)
    print(f"transfer step: {pair[0]} -> {pair[1]}, {backend}, {geo}, lengths {lens} "
          f"(at most {limit:.0f} s)", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pdserve-xfer-") as tmp:
        rc, out, err = _run([sys.executable, "-m", "pdserve.cli", *cmd, "--out", tmp], env,
                            limit)
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    rec["rows"] = [_clean(json.loads(line)) for line in out.splitlines()
                   if line.startswith("{")]
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    if rc is None:
        rec["note"] = f"stopped at its time limit ({limit:.0f} s) before it wrote its rows"
        budget.cut(f"the transfer step: stopped after {limit:.0f} s")
    elif not rec["rows"]:
        rec["note"] = f"failed (exit {rc}): {tail or 'no output'}"
    elif rc != 0:
        rec["note"] = f"exit {rc}: not every transfer verified"
    print(f"transfer step: {len(rec['rows'])} lengths in {rec['wall_s']} s"
          + (f"; {rec['note']}" if rec["note"] else ""), flush=True)
    return rec


def _run(argv: list[str], env: dict[str, str], limit_s: float) -> tuple[int | None, str, str]:
    """(exit code or None when stopped at the limit, stdout, stderr); the subprocess and its
    receiver process share a new session, ended together."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def _clean(row: dict) -> dict:
    """NaN (no physical line, no rx time) as null, as the rest of results.json."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}

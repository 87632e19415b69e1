"""`pdserve bench transfer`: whole-request KV transfer time vs input length.

The sender (this process, cuda:0 or cpu) pushes a request's blocks, scattered at random in
its pool, to a receiver in a second process (cuda:1 or cpu) whose reserved blocks are also
scattered at random. All times are taken on the sender's clock:

- transfer: from the sender's start() call to the sender's progress thread receiving the
  receiver's "done" (every block scattered in place), minus the median of the same round
  trip for an empty request (begin/end header and done ack, no data): what is left is the
  data movement, including gather, every message, scatter and the receiver's detection.
- baseline: ONE contiguous send of the same byte count on a separate connection of the same
  backend, receive pre-posted: from post_send to the receiver process seeing its receive
  complete and telling us over a pipe, minus half the pipe's median round trip.
- verified: a position-weighted checksum of every sent block equals that of the blocks
  received (all layers).
Bytes are whole blocks: ceil(input_len / block_size) blocks x layers x block bytes.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from pdserve.benchmarks import plotting
from pdserve.kvtransfer import (
    Backend,
    KVGeometry,
    KVReceiver,
    KVSender,
    TransferOptions,
    create_backend,
)

GEOMETRIES: dict[str, dict[str, Any]] = {  # llama-3.1-8b: 128 KiB of KV per token
    "tiny": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"},
    "llama-3.1-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
}
KEYS = ["input_len", "bytes", "p50_ms", "p90_ms", "gbps", "baseline_gbps", "ratio", "verified"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["ucx", "nccl"], default="ucx")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--geometry", choices=list(GEOMETRIES), default="tiny")
    p.add_argument("--input-lens", default="128,512,2048,8192,32768",
                   help="comma-separated prompt lengths in tokens")
    p.add_argument("--layerwise", action="store_true",
                   help="mark layers ready one by one (default: all ready at once, coalesced)")
    p.add_argument("--json", action="store_true", help="one JSON object per input length on stdout")
    p.add_argument("--out", default="benchmarks/results/transfer", help="directory for csv/md/png")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per length")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per length")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--staging-mib", type=float, default=64.0, help="staging buffer = largest message")
    p.add_argument("--num-staging", type=int, default=4, help="staging buffers per side")
    p.add_argument("--min-message-mib", type=float, default=16.0,
                   help="first/last message size of a coalesced run")
    p.add_argument("--copy-ctas", type=int, default=None,
                   help="CUDA gather/scatter thread blocks (0: torch index ops; default: "
                        "TransferOptions.copy_ctas)")
    p.add_argument("--poll-us", type=float, default=None,
                   help="progress-loop poll interval while busy (default 0 = spin on cuda, 100 on cpu)")
    p.add_argument("--ucx-progress", choices=["blocking", "polling"], default=None,
                   help="ucx progress thread mode (default: polling on cuda, blocking on cpu)")
    p.add_argument("--seed", type=int, default=0)


def new_backend(name: str, device: torch.device, ucx_polling: bool) -> Backend:
    if name == "ucx":
        return create_backend(name, device=device, polling=ucx_polling)
    return create_backend(name, device=device)


def make_pool(geo: dict[str, Any], block_size: int, num_blocks: int, device: torch.device,
              seed: int) -> list[torch.Tensor]:
    """Random pool, all layers in one allocation (per layer [N, 2, bs, heads, dim])."""
    dtype = KVGeometry(geo["num_layers"], block_size, geo["num_kv_heads"], geo["head_dim"],
                       geo["dtype"]).torch_dtype
    full = torch.empty((geo["num_layers"], num_blocks, 2, block_size, geo["num_kv_heads"],
                        geo["head_dim"]), dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in full:
        layer.normal_(generator=gen)
    return list(full.unbind(0))


def checksum(pool: list[torch.Tensor], block_ids: list[int]) -> int:
    """Position-weighted sum of the blocks' 32-bit words, over all layers (wraps at 2^64)."""
    if not block_ids:
        return 0
    idx = torch.tensor(block_ids, dtype=torch.int64, device=pool[0].device)
    pos = torch.arange(1, len(block_ids) + 1, dtype=torch.int64, device=pool[0].device)
    total = 0
    for i, layer in enumerate(pool):
        rows = layer.reshape(layer.shape[0], -1).view(torch.int32).index_select(0, idx)
        s = int((rows.to(torch.int64).sum(dim=1) * pos).sum().item())
        total = (total * 1000003 + s + i) & ((1 << 64) - 1)
    return total


def _receiver_main(conn: Any, cfg: dict[str, Any]) -> None:
    dev = torch.device(cfg["rx_device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pool = make_pool(cfg["geo"], cfg["block_size"], cfg["rx_blocks"], dev, seed=cfg["seed"] + 1)
    rx = KVReceiver(pool, new_backend(cfg["backend"], dev, cfg["ucx_polling"]),
                    TransferOptions(**cfg["options"]))
    base = new_backend(cfg["backend"], dev, cfg["ucx_polling"])
    rbuf = torch.empty(max(cfg["max_bytes"], 1), dtype=torch.uint8, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    conn.send((rx.address, base.address()))
    bpeer = None
    while True:
        cmd, *a = conn.recv()
        try:
            if cmd == "expect":
                rx.expect(a[0], a[1], deadline_s=120.0)
                conn.send("ok")
            elif cmd == "drain":
                conn.send([(r.req_id, r.ok, r.error) for r in rx.wait(120.0, a[0])])
            elif cmd == "bconnect":
                bpeer = base.connect(a[1], a[0], False)
                conn.send("ok")
            elif cmd == "brecv":
                op = base.post_recv(bpeer, rbuf[:a[0]], a[1])
                conn.send("posted")
                while not base.poll(op):
                    pass
                conn.send("bdone")
            elif cmd == "ping":
                conn.send("pong")
            elif cmd == "checksum":
                conn.send(checksum(pool, a[0]))
            elif cmd == "quit":
                rx.close()
                base.close()
                conn.send("bye")
                return
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.geo = GEOMETRIES[args.geometry]
        self.lens = [int(x) for x in args.input_lens.split(",") if x.strip()]
        self.bs = args.block_size
        g = KVGeometry(self.geo["num_layers"], self.bs, self.geo["num_kv_heads"],
                       self.geo["head_dim"], self.geo["dtype"])
        self.block_nbytes, self.nl = g.block_nbytes, g.num_layers
        max_blocks = max(math.ceil(n / self.bs) for n in self.lens)
        self.num_blocks = 2 * max_blocks + 8  # room to scatter at random
        self.max_bytes = max_blocks * self.nl * self.block_nbytes
        cuda = args.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        ngpu = torch.cuda.device_count() if cuda else 0
        if cuda and ngpu < 2 and args.backend == "nccl":
            raise SystemExit("the nccl backend needs two GPUs (sender cuda:0, receiver cuda:1)")
        self.dev = torch.device("cuda:0" if cuda else "cpu")
        rx_dev = ("cuda:1" if ngpu >= 2 else "cuda:0") if cuda else "cpu"
        poll_us = args.poll_us if args.poll_us is not None else (0.0 if cuda else 100.0)
        self.options = {"staging_bytes": int(args.staging_mib * (1 << 20)),
                        "num_staging_buffers": args.num_staging,
                        "min_message_bytes": int(args.min_message_mib * (1 << 20)),
                        "poll_interval_s": poll_us * 1e-6, "deadline_s": 120.0,
                        "layerwise": args.layerwise}
        if args.copy_ctas is not None:
            self.options["copy_ctas"] = args.copy_ctas
        self.cfg = {"rx_device": rx_dev, "geo": self.geo, "block_size": self.bs, "seed": args.seed,
                    "rx_blocks": self.num_blocks, "backend": args.backend,
                    "options": self.options, "max_bytes": self.max_bytes,
                    "ucx_polling": (args.ucx_progress or ("polling" if cuda else "blocking")) == "polling"}
        self.rng = random.Random(args.seed)
        self.seq = 0

    def rpc(self, *msg: Any, timeout_s: float = 300.0) -> Any:
        self.conn.send(msg)
        return self._recv(timeout_s)

    def _recv(self, timeout_s: float = 300.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"receiver process did not answer in {timeout_s} s")
        reply = self.conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise RuntimeError(f"receiver: {reply[1]}")
        return reply

    def transfer(self, src: list[int], dst: list[int]) -> float:
        """Sender-clock seconds from start() to the receiver's done, for one request."""
        self.seq += 1
        rid = f"b{self.seq}"
        assert self.rpc("expect", rid, dst) == "ok"
        ev = None
        if self.dev.type == "cuda":  # "the layers were written by now", as a model would say
            ev = torch.cuda.Event()
            ev.record()
        t0 = time.perf_counter()
        self.tx.start(rid, self.rx_addr, src, layerwise=self.args.layerwise)
        if self.args.layerwise:
            for layer in range(self.nl):
                self.tx.layer_ready(rid, layer, ev)
        self.tx.finish(rid, {"first_token": 1}, ev)
        (res,) = self.tx.wait(120.0, [rid])
        if not res.ok:
            raise RuntimeError(f"transfer {rid} failed: {res.error}")
        self.rids.append(rid)
        self.num_messages = res.num_messages
        return res.done_at - t0

    def baseline(self, nbytes: int) -> float:
        """Seconds for one contiguous send of nbytes, receiver pre-posted (incl. pipe hop)."""
        self.seq += 1
        assert self.rpc("brecv", nbytes, self.seq) == "posted"
        t0 = time.perf_counter()
        op = self.base.post_send(self.bpeer, self.sbuf[:nbytes], self.seq)
        while not self.base.poll(op):
            pass
        assert self._recv() == "bdone"
        return time.perf_counter() - t0

    def median(self, fn: Any, n: int) -> float:
        return float(np.median([fn() for _ in range(n)]))

    def run(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        a = self.args
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        pool = make_pool(self.geo, self.bs, self.num_blocks, self.dev, seed=a.seed)
        polling = self.cfg["ucx_polling"]
        self.tx = KVSender(pool, new_backend(a.backend, self.dev, polling),
                           TransferOptions(**self.options))
        self.base = new_backend(a.backend, self.dev, polling)
        self.sbuf = torch.ones(max(self.max_bytes, 1), dtype=torch.uint8, device=self.dev)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        self.rx_addr, rx_base_addr = self._recv()
        token = self.base.new_token()
        self.conn.send(("bconnect", token, self.base.address()))
        self.bpeer = self.base.connect(rx_base_addr, token, True)
        assert self._recv() == "ok"
        self.rids: list[str] = []
        self.baseline(1)  # connection setup off the clock
        self.pipe_rtt = self.median(lambda: self._ping(), 50)
        self.empty_rtt = self.median(lambda: self.transfer([], []), 20)
        rows = []
        n_per = a.warmup + a.iters
        with tqdm(total=2 * n_per * len(self.lens), desc=f"transfer {a.backend}/{a.device}",
                  file=sys.stderr, leave=False) as bar:
            for n in self.lens:
                nb = math.ceil(n / self.bs)
                nbytes = nb * self.nl * self.block_nbytes
                src = self.rng.sample(range(self.num_blocks), nb)
                dst = self.rng.sample(range(self.num_blocks), nb)
                raw, base = [], []
                for i in range(n_per):
                    t = self.transfer(src, dst)
                    raw += [t] if i >= a.warmup else []
                    bar.update()
                for i in range(n_per):
                    t = self.baseline(nbytes)
                    base += [t] if i >= a.warmup else []
                    bar.update()
                drained = self.rpc("drain", self.rids)
                bad = [d for d in drained if not d[1]]
                if bad or len(drained) != len(self.rids):
                    raise RuntimeError(f"receiver reported failures: {bad[:3]}")
                self.rids = []
                verified = checksum(pool, src) == self.rpc("checksum", dst)
                rows.append(self.row(n, nbytes, raw, base, verified))
        return rows

    def _ping(self) -> float:
        t0 = time.perf_counter()
        assert self.rpc("ping") == "pong"
        return time.perf_counter() - t0

    def row(self, n: int, nbytes: int, raw: list[float], base: list[float],
            verified: bool) -> dict[str, Any]:
        t = np.maximum(np.array(raw) - self.empty_rtt, 1e-7)
        b = np.maximum(np.array(base) - self.pipe_rtt / 2, 1e-7)
        p50, p90, b50 = (float(np.percentile(t, 50)), float(np.percentile(t, 90)),
                         float(np.percentile(b, 50)))
        return {"input_len": n, "bytes": nbytes, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
                "gbps": nbytes / p50 / 1e9, "baseline_gbps": nbytes / b50 / 1e9, "ratio": b50 / p50,
                "verified": verified, "baseline_p50_ms": b50 * 1e3,
                "raw_p50_ms": float(np.median(raw)) * 1e3, "empty_rtt_ms": self.empty_rtt * 1e3,
                "pipe_rtt_ms": self.pipe_rtt * 1e3, "messages": self.num_messages}


def fit_latency_bandwidth(nbytes: list[int], times_ms: list[float]) -> tuple[float, float]:
    """Least squares time = latency + bytes / bandwidth -> (latency_us, bandwidth_GBps)."""
    if len(nbytes) < 2:
        return float("nan"), float("nan")
    x = np.array(nbytes, dtype=np.float64)
    a = np.stack([np.ones_like(x), x], axis=1)
    (lat_s, s_per_b), *_ = np.linalg.lstsq(a, np.array(times_ms) / 1e3, rcond=None)
    return lat_s * 1e6, (1.0 / s_per_b / 1e9) if s_per_b > 0 else float("inf")


def run(args: argparse.Namespace) -> int:
    bench = _Bench(args)
    ctx = mp.get_context("spawn")
    bench.conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(child, bench.cfg), daemon=True)
    proc.start()
    try:
        rows = bench.run()
    finally:
        try:
            bench.conn.send(("quit",))
            bench.conn.poll(10)
        except OSError:
            pass
        for obj in ("tx", "base"):
            if hasattr(bench, obj):
                getattr(bench, obj).close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    fits = {name: fit_latency_bandwidth([r["bytes"] for r in rows], [r[key] for r in rows])
            for name, key in (("kvtransfer", "p50_ms"), ("baseline", "baseline_p50_ms"))}
    fit_lines = [f"fit {name}: time = {lat:.1f} us + bytes / ({bw:.2f} GB/s)"
                 for name, (lat, bw) in fits.items()]
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        for r in rows:
            print(plotting.json_line({k: r[k] for k in KEYS} | {k: v for k, v in r.items() if k not in KEYS}))
    else:
        print(plotting.markdown_table(rows, KEYS + ["baseline_p50_ms", "raw_p50_ms", "messages"]),
              file=out)
    for line in fit_lines:
        print(line, file=out)
    _write_outputs(args, bench, rows, fit_lines)
    return 0 if all(r["verified"] for r in rows) else 1


def _write_outputs(args: argparse.Namespace, bench: _Bench, rows: list[dict[str, Any]],
                   fit_lines: list[str]) -> None:
    stem = f"transfer_{args.backend}_{args.device}_{args.geometry}" + ("_layerwise" if args.layerwise else "")
    out = plotting.ensure_dir(args.out)
    meta = {**plotting.run_metadata(args.device), "backend": args.backend,
            "geometry": args.geometry, "block_size": args.block_size, "layerwise": args.layerwise,
            "iters": args.iters, "options": bench.options}
    notes = [f"- {line}" for line in fit_lines] + [
        "- transfer: sender start() -> receiver's done ack, minus an empty request's round trip",
        "- baseline: one contiguous send of the same bytes, same backend, receive pre-posted"]
    plotting.write_csv(f"{out}/{stem}.csv", rows)
    plotting.write_markdown(f"{out}/{stem}.md", rows, KEYS + ["baseline_p50_ms", "messages"],
                            title=f"KV transfer: {args.backend} on {args.device}, {args.geometry}",
                            notes=notes, meta=meta)
    xs = [r["input_len"] for r in rows]
    plotting.plot_lines(f"{out}/{stem}.png",
                        {"kvtransfer p50": (xs, [r["p50_ms"] for r in rows]),
                         "kvtransfer p90": (xs, [r["p90_ms"] for r in rows]),
                         "baseline (one send) p50": (xs, [r["baseline_p50_ms"] for r in rows])},
                        "input length (tokens)", "transfer time (ms)",
                        title=f"{args.backend}/{args.device}/{args.geometry}", logx=True, logy=True,
                        styles={"kvtransfer p90": "o--", "baseline (one send) p50": "s-"})
    print(f"wrote {out}/{stem}.csv, .md, .png", file=sys.stderr)

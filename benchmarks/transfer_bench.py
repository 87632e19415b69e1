"""The sender side of `bench transfer`: KV transfers of one or N concurrent requests, and
the raw one-send baseline of the same bytes on the same backend (see transfer.py)."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from pdserve.benchmarks.transfer_peer import (
    checksum,
    geometry,
    make_pool,
    new_backend,
    p2p_copy_gbps,
)
from pdserve.engine.cpu_affinity import pin_to_gpu
from pdserve.kvtransfer import KVGeometry, KVSender, TransferOptions
from pdserve.kvtransfer.trace import mark

Blocks = tuple[list[int], list[int]]  # (src block ids, dst block ids) of one request


class TransferBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.geo = geometry(args.geometry)
        self.lens = [int(x) for x in args.input_lens.split(",") if x.strip()]
        self.conc = max(1, args.concurrency)
        self.bs = args.block_size
        g = KVGeometry(self.geo["num_layers"], self.bs, self.geo["num_kv_heads"],
                       self.geo["head_dim"], self.geo["dtype"])
        self.block_nbytes, self.nl = g.block_nbytes, g.num_layers
        max_blocks = max(math.ceil(n / self.bs) for n in self.lens)
        self.num_blocks = (self.conc + 1) * max_blocks + 8  # room to scatter at random
        self.max_bytes = self.conc * max_blocks * self.nl * self.block_nbytes
        cuda = args.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        ngpu = torch.cuda.device_count() if cuda else 0
        if cuda and ngpu < 2 and args.backend == "nccl":
            raise SystemExit("the nccl backend needs two GPUs (sender cuda:0, receiver cuda:1)")
        self.dev = torch.device("cuda:0" if cuda else "cpu")
        self.rx_dev = torch.device(("cuda:1" if ngpu >= 2 else "cuda:0") if cuda else "cpu")
        poll_us = args.poll_us if args.poll_us is not None else (0.0 if cuda else 100.0)
        self.options = {"staging_bytes": int(args.staging_mib * (1 << 20)),
                        "num_staging_buffers": args.num_staging,
                        "min_message_bytes": int(args.min_message_mib * (1 << 20)),
                        "poll_interval_s": poll_us * 1e-6, "deadline_s": 120.0,
                        "layerwise": args.layerwise, "peer_copy": not args.no_peer_copy}
        if args.copy_ctas is not None:
            self.options["copy_ctas"] = args.copy_ctas
        if args.solo_copy_ctas is not None:
            self.options["solo_copy_ctas"] = args.solo_copy_ctas
        self.cfg = {"rx_device": str(self.rx_dev), "geo": self.geo, "block_size": self.bs,
                    "seed": args.seed, "rx_blocks": self.num_blocks, "backend": args.backend,
                    "options": self.options, "max_bytes": self.max_bytes,
                    "ucx_polling": (args.ucx_progress or ("polling" if cuda else "blocking")) == "polling"}
        self.rng = random.Random(args.seed)
        self.seq = 0
        self.rids: list[str] = []
        self.starts: list[tuple[float, list[str]]] = []  # (t0, request ids) per transfer()
        self.rx_times: list[float] = []  # per transfer() of the last length: t0 -> receiver
        self.phys_gbps: float | None = None
        self.phys_note = "no physical line on cpu: no NVLink (UCX over loopback)"

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

    def transfer(self, reqs: list[Blocks]) -> float:
        """Sender-clock seconds from the clock's start (the first finish() with --start
        ahead, the first start() with --start with-finish) to the last request's done ack."""
        rids = []
        for _, dst in reqs:  # off the clock: the decode side reserved its blocks before
            self.seq += 1
            rids.append(f"b{self.seq}")
            assert self.rpc("expect", rids[-1], dst) == "ok"
        ahead = self.args.start == "ahead"
        if ahead:  # as the prefill worker does when the prompt's last step begins
            for rid, (src, dst) in zip(rids, reqs):
                self.tx.start(rid, self.rx_addr, src, dst, layerwise=self.args.layerwise)
        # ... and its grants (peer copy) reached us, as during a prefill (Reserve and the
        # prompt's forward run at once; a forward takes milliseconds, a grant ~0.1 ms)
        time.sleep(0.002)
        ev = None
        if self.dev.type == "cuda":  # "the layers were written by now", as a model would say
            ev = torch.cuda.Event()
            ev.record()
        t0 = time.perf_counter()
        for rid, (src, dst) in zip(rids, reqs):
            if not ahead:
                self.tx.start(rid, self.rx_addr, src, dst, layerwise=self.args.layerwise)
            if self.args.layerwise:
                for layer in range(self.nl):
                    self.tx.layer_ready(rid, layer, ev)
            self.tx.finish(rid, {"first_token": 1}, ev)
        results = self.tx.wait(120.0, rids)
        bad = [r for r in results if not r.ok]
        if bad or len(results) != len(rids):
            why = bad[0].error if bad else f"{len(rids) - len(results)} without a result in 120 s"
            raise RuntimeError(f"transfer failed: {why}")
        self.rids += rids
        self.starts.append((t0, rids))
        self.num_messages = sum(r.num_messages for r in results)
        self.via = "+".join(sorted({r.via for r in results}))
        return max(r.done_at for r in results) - t0

    def baseline(self, nbytes: int) -> float:
        """Seconds for one contiguous send of nbytes, receiver pre-posted (incl. pipe hop)."""
        self.seq += 1
        assert self.rpc("brecv", nbytes, self.seq) == "posted"
        t0 = time.perf_counter()
        mark("base", "post", self.seq, nbytes)
        op = self.base.post_send(self.bpeer, self.sbuf[:nbytes], self.seq)
        while not self.base.poll(op):
            pass
        mark("base", "send_done", self.seq)
        assert self._recv() == "bdone"
        mark("base", "bdone", self.seq)
        return time.perf_counter() - t0

    def median(self, fn: Any, n: int) -> float:
        return float(np.median([fn() for _ in range(n)]))

    def setup(self) -> None:
        a = self.args
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
            cores = pin_to_gpu(self.dev)  # as a worker does (engine/cpu_affinity.py)
            print(f"cpu affinity: {len(cores)} cores local to {self.dev}" if cores else
                  "cpu affinity: unchanged", file=sys.stderr)
        self.pool = make_pool(self.geo, self.bs, self.num_blocks, self.dev, seed=a.seed)
        polling = self.cfg["ucx_polling"]
        self.tx = KVSender(self.pool, new_backend(a.backend, self.dev, polling),
                           TransferOptions(**self.options))
        self.base = new_backend(a.backend, self.dev, polling)
        self.base.trace_role = "base"
        self.sbuf = torch.ones(max(self.max_bytes, 1), dtype=torch.uint8, device=self.dev)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        self.rx_addr, rx_base_addr = self._recv()  # the receiver is set up and idle now
        if self.dev.type == "cuda" and self.rx_dev != self.dev:
            self.phys_gbps = p2p_copy_gbps(self.dev, self.rx_dev)
            self.phys_note = (f"physical line: {self.phys_gbps:.1f} GB/s, one copy_ "
                              f"{self.dev} -> {self.rx_dev} (copy engines, one direction)")
        elif self.dev.type == "cuda":
            self.phys_note = "no physical line: sender and receiver share one GPU"
        token = self.base.new_token()
        self.conn.send(("bconnect", token, self.base.address()))
        self.bpeer = self.base.connect(rx_base_addr, token, True)
        assert self._recv() == "ok"
        self.baseline(1)  # connection setup off the clock
        self.pipe_rtt = self.median(self._ping, 50)
        self.empty_rtt = self.median(lambda: self.transfer([([], [])]), 20)

    def run(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        self.setup()
        a = self.args
        n_per = a.warmup + a.iters
        rounds = 2 if self.conc == 1 else 3
        with tqdm(total=rounds * n_per * len(self.lens), desc=f"transfer {a.backend}/{a.device}",
                  file=sys.stderr, leave=False) as bar:
            def timed(fn: Any, arg: Any) -> list[float]:
                out = []
                for i in range(n_per):
                    t = fn(arg)
                    out += [t] if i >= a.warmup else []
                    bar.update()
                return out

            rows = []
            for n in self.lens:
                nb = math.ceil(n / self.bs)
                one = nb * self.nl * self.block_nbytes
                src = self.rng.sample(range(self.num_blocks), nb * self.conc)
                dst = self.rng.sample(range(self.num_blocks), nb * self.conc)
                reqs = [(src[i * nb:(i + 1) * nb], dst[i * nb:(i + 1) * nb]) for i in range(self.conc)]
                times = timed(self.transfer, reqs)
                base = timed(self.baseline, one * self.conc)
                base1 = timed(self.baseline, one) if self.conc > 1 else base
                rows.append(self.row(n, one, times, base, base1, self.verify(reqs)))
        return rows

    def verify(self, reqs: list[Blocks]) -> bool:
        """Every receiver result ok, and each request's blocks arrived byte for byte."""
        drained = self.rpc("drain", self.rids)
        bad = [d for d in drained if not d[1]]
        if bad or len(drained) != len(self.rids):
            raise RuntimeError(f"receiver reported failures: {bad[:3]}")
        # the receiver's results carry perf_counter() (CLOCK_MONOTONIC: one axis per host)
        done_at = {d[0]: d[3] for d in drained}
        self.rx_times = [max(done_at[r] for r in rids) - t0 for t0, rids in self.starts]
        self.rids, self.starts = [], []
        return all(checksum(self.pool, src) == self.rpc("checksum", dst) for src, dst in reqs)

    def _ping(self) -> float:
        t0 = time.perf_counter()
        assert self.rpc("ping") == "pong"
        return time.perf_counter() - t0

    def row(self, n: int, one: int, raw: list[float], base: list[float], base1: list[float],
            verified: bool) -> dict[str, Any]:
        nbytes = one * self.conc
        t = np.maximum(np.array(raw) - self.empty_rtt, 1e-7)
        p50, p90 = float(np.percentile(t, 50)), float(np.percentile(t, 90))
        b50 = float(np.percentile(np.maximum(np.array(base) - self.pipe_rtt / 2, 1e-7), 50))
        b1 = float(np.percentile(np.maximum(np.array(base1) - self.pipe_rtt / 2, 1e-7), 50))
        rx = np.array(self.rx_times[self.args.warmup:])  # the timed ones, as `raw`
        rx50 = float(np.median(rx)) if rx.size else float("nan")
        row = {"input_len": n, "bytes": nbytes, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
               "gbps": nbytes / p50 / 1e9, "baseline_gbps": nbytes / b50 / 1e9, "ratio": b50 / p50,
               "verified": verified, "baseline_p50_ms": b50 * 1e3,
               "raw_p50_ms": float(np.median(raw)) * 1e3, "empty_rtt_ms": self.empty_rtt * 1e3,
               "pipe_rtt_ms": self.pipe_rtt * 1e3, "messages": self.num_messages,
               "via": self.via, "rx_p50_ms": rx50 * 1e3, "rx_ratio": b50 / rx50}
        if self.conc > 1:
            row |= {"concurrency": self.conc, "baseline1_p50_ms": b1 * 1e3,
                    "baseline1_gbps": one / b1 / 1e9, "ratio1": (nbytes / p50) / (one / b1)}
        return row

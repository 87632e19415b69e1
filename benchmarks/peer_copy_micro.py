"""Peer copy kernel against the wire, on two GPUs of one host:

    python -m pdserve.benchmarks.peer_copy_micro [--tokens 512,32768]

A child process owns a Llama-3.1-8B-shaped pool on cuda:1 and offers it (peer_pool.py);
this process maps it as the KV sender does and times, with CUDA events:
- the row copy (row_copy.copy_pairs) of a request's scattered blocks into scattered blocks
  of the peer pool, over a grid of thread blocks x warps x words a step;
- one contiguous copy_ of the same bytes to cuda:1 (copy engines: the physical line).
Prints one table row per configuration: GB/s, and the share of the copy_ line.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
from functools import partial

import torch

from pdserve.benchmarks.transfer_micro import gpu_ms
from pdserve.kvtransfer import peer_pool, row_copy

LAYERS, ROW_WORDS = 32, 8192  # llama-3.1-8b: one block of 16 tokens, K and V, 64 KiB a row


def _owner(conn, num_blocks: int) -> None:
    torch.cuda.set_device(1)
    pool = torch.zeros((LAYERS * num_blocks, ROW_WORDS), dtype=torch.int64, device="cuda:1")
    conn.send(peer_pool.offer(pool))
    conn.recv()  # keep the pool alive until the parent is done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="512,32768")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    lens = [int(x) for x in args.tokens.split(",")]
    nb = max(lens) // 16
    num_blocks = 2 * nb
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(child, num_blocks), daemon=True)
    proc.start()
    torch.cuda.set_device(0)
    local = torch.randint(0, 1 << 30, (LAYERS * num_blocks, ROW_WORDS), dtype=torch.int64,
                          device="cuda:0")
    remote = peer_pool.open_pool(conn.recv(), torch.int64, ROW_WORDS, torch.device("cuda:0"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| tokens | MiB | ctas | warps | block | GB/s | of copy_ |")
    print("|---|---|---|---|---|---|---|")
    for n in lens:
        k = n // 16
        rng = random.Random(n)
        s_ids = torch.tensor(rng.sample(range(num_blocks), k), device="cuda:0")
        d_ids = torch.tensor(rng.sample(range(num_blocks), k), device="cuda:0")
        base = torch.arange(LAYERS, device="cuda:0")[:, None] * num_blocks
        nbytes = LAYERS * k * ROW_WORDS * 8
        rows = LAYERS * k
        flat_src = local[:rows]
        flat_dst = torch.empty_like(flat_src, device="cuda:1")
        ce = nbytes / (gpu_ms(partial(flat_dst.copy_, flat_src, non_blocking=True),
                               args.iters) * 1e6)
        print(f"| {n} | {nbytes >> 20} | copy_ | - | - | {ce:.0f} | 1.00 |")
        for ctas in (sms, 2 * sms, 4 * sms):
            for warps in (4, 8, 16):
                for block in (1024, 2048, 4096):
                    ms = gpu_ms(partial(row_copy.copy_pairs, local, remote, s_ids, d_ids, 0,
                                         LAYERS, num_blocks, num_blocks, ctas, block, warps),
                                 args.iters)
                    gbps = nbytes / (ms * 1e6)
                    print(f"| {n} | {nbytes >> 20} | {ctas} | {warps} | {block} | {gbps:.0f} "
                          f"| {gbps / ce:.2f} |", flush=True)
        ok = torch.equal(remote[(base + d_ids).view(-1)].to("cuda:0"),
                         local[(base + s_ids).view(-1)])
        print(f"rows landed byte for byte ({n} tokens): {ok}")
    conn.send("done")
    proc.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

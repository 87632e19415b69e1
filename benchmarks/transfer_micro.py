"""GPU micro-measurements behind the transfer path's per-message cost (one GPU):

    python -m pdserve.benchmarks.transfer_micro

- host time to launch one gather of a 64 MiB message (Triton row copy, torch index_select),
  and the event record/query calls the progress loop makes per message;
- GPU time of that gather against the number of thread blocks, and of a plain copy_ of the
  same bytes (the HBM line).
"""

from __future__ import annotations

import time

import torch

from pdserve.kvtransfer import row_copy


def gpu_ms(fn, iters: int = 20) -> float:
    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def _host_us(fn, iters: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return dt


def _index_host(dev: torch.device) -> None:
    """Host time of a request's index (KVLayout.index / index_pair) and of a peer copy's
    launch, for a Llama-3.1-8B pool of 4096 blocks."""
    from pdserve.kvtransfer.pack import KVLayout

    pool = torch.empty(32, 4096, 2, 16, 8, 128, dtype=torch.bfloat16, device=dev).unbind(0)
    lay = KVLayout(pool, copy_ctas=32)
    stream = torch.cuda.Stream(dev)
    parts = []
    for nb in (0, 32, 2048):
        ids = list(range(nb))
        parts.append(f"index {nb} blocks {_host_us(lambda i=ids: lay.index(i, stream)):.1f} us")
        parts.append(f"index_pair {_host_us(lambda i=ids: lay.index_pair(i, i, stream)):.1f} us")
    si, di = lay.index_pair(list(range(32)), list(range(64, 96)), stream)
    parts.append("peer_copy launch "
                 f"{_host_us(lambda: lay.peer_copy(si, di, lay.flat, 4096, 0, 32)):.1f} us")
    print("host: " + ", ".join(parts))


def main() -> None:
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    row_words = 64 * 1024 // 8
    pool = torch.empty(32 * 1024, row_words, dtype=torch.int64, device=dev)  # 2 GiB
    for rows in (128, 1024, 4096):  # 8, 64, 256 MiB
        idx = torch.randperm(pool.shape[0], device=dev)[:rows].contiguous()
        out = torch.empty(rows, row_words, dtype=torch.int64, device=dev)
        mib = rows * 64 // 1024
        line = [f"{mib:4d} MiB"]
        for ctas in (16, 32, 64, 132, 264):
            ms = gpu_ms(lambda i=idx, o=out, c=ctas: row_copy.gather(pool, i, o, c))
            line.append(f"ctas {ctas}: {ms * 1e3:7.1f} us")
        ms = gpu_ms(lambda i=idx, o=out: torch.index_select(pool, 0, i, out=o))
        line.append(f"index_select: {ms * 1e3:7.1f} us")
        ms = gpu_ms(lambda o=out, r=rows: o.copy_(pool[:r]))
        line.append(f"copy_: {ms * 1e3:7.1f} us")
        print("gather GPU time", " | ".join(line))
    idx = torch.randperm(pool.shape[0], device=dev)[:1024].contiguous()
    out = torch.empty(1024, row_words, dtype=torch.int64, device=dev)
    print(f"host launch: row_copy.gather {_host_us(lambda: row_copy.gather(pool, idx, out, 32)):.1f} us, "
          f"index_select {_host_us(lambda: torch.index_select(pool, 0, idx, out=out)):.1f} us, "
          f"slice+reshape {_host_us(lambda: idx[0:512].reshape(-1)):.1f} us")
    _index_host(dev)
    ev = torch.cuda.Event()
    print(f"host: Event()+record {_host_us(lambda: torch.cuda.Event().record()):.1f} us, "
          f"query {_host_us(ev.query):.1f} us, "
          f"wait_event {_host_us(lambda: torch.cuda.current_stream().wait_event(ev)):.1f} us")


if __name__ == "__main__":
    main()

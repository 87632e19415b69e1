"""`bench transfer`'s pieces shared by both processes: KV geometries, random pools, the
block checksum, the receiver process, and the physical copy-engine bandwidth."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from pdserve.engine.cpu_affinity import pin_to_gpu
from pdserve.kvtransfer import Backend, KVGeometry, KVReceiver, TransferOptions, create_backend
from pdserve.kvtransfer.trace import dump, mark

GEOMETRIES: dict[str, dict[str, Any]] = {  # llama-3.1-8b: 128 KiB of KV per token
    "tiny": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"},
    "llama-3.1-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
}
DTYPES = ("float32", "bfloat16", "float16")


def geometry(spec: str) -> dict[str, Any]:
    """A named geometry (GEOMETRIES), or any model's as LAYERSxKV_HEADSxHEAD_DIM:DTYPE
    (e.g. 32x8x128:bfloat16, what `geometry_spec` writes)."""
    if spec in GEOMETRIES:
        return GEOMETRIES[spec]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+):(\w+)", spec.strip())
    if not m or m.group(4) not in DTYPES or 0 in (int(m.group(i)) for i in (1, 2, 3)):
        raise ValueError(f"geometry {spec!r}: give {' or '.join(GEOMETRIES)}, or "
                         f"LAYERSxKV_HEADSxHEAD_DIM:DTYPE with DTYPE one of {', '.join(DTYPES)} "
                         "(e.g. 32x8x128:bfloat16)")
    return {"num_layers": int(m.group(1)), "num_kv_heads": int(m.group(2)),
            "head_dim": int(m.group(3)), "dtype": m.group(4)}


def geometry_spec(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> str:
    """The --geometry string of a model's KV: '32x8x128:bfloat16'."""
    return f"{num_layers}x{num_kv_heads}x{head_dim}:{dtype}"


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


def p2p_copy_gbps(src: torch.device, dst: torch.device, nbytes: int = 512 << 20,
                  iters: int = 10) -> float:
    """GB/s of one large copy_ from a tensor on `src` to one on `dst` (one direction: the
    copy engines over NVLink), median of `iters`, timed with CUDA events on the source
    device's stream (where torch runs a peer-to-peer copy)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=src)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    times_ms = []
    with torch.cuda.device(src):
        for i in range(iters + 2):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            b.copy_(a, non_blocking=True)
            t1.record()
            t1.synchronize()
            if i >= 2:  # two untimed: peer access set-up
                times_ms.append(t0.elapsed_time(t1))
    torch.cuda.synchronize(dst)
    return nbytes / (float(np.median(times_ms)) * 1e-3) / 1e9


def receiver_main(conn: Any, cfg: dict[str, Any]) -> None:
    """The decode side: a KVReceiver plus a raw backend endpoint, driven over `conn`."""
    dev = torch.device(cfg["rx_device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        pin_to_gpu(dev)  # as a worker does (engine/cpu_affinity.py)
    pool = make_pool(cfg["geo"], cfg["block_size"], cfg["rx_blocks"], dev, seed=cfg["seed"] + 1)
    rx = KVReceiver(pool, new_backend(cfg["backend"], dev, cfg["ucx_polling"]),
                    TransferOptions(**cfg["options"]))
    base = new_backend(cfg["backend"], dev, cfg["ucx_polling"])
    base.trace_role = "base"
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
                conn.send([(r.req_id, r.ok, r.error, r.done_at) for r in rx.wait(120.0, a[0])])
            elif cmd == "bconnect":
                bpeer = base.connect(a[1], a[0], False)
                conn.send("ok")
            elif cmd == "brecv":
                op = base.post_recv(bpeer, rbuf[:a[0]], a[1])
                conn.send("posted")
                while not base.poll(op):
                    pass
                mark("base", "recv_done", a[1])
                conn.send("bdone")
            elif cmd == "ping":
                conn.send("pong")
            elif cmd == "checksum":
                conn.send(checksum(pool, a[0]))
            elif cmd == "quit":
                rx.close()
                base.close()
                dump()
                conn.send("bye")
                return
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))

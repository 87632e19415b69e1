"""Helper for the kvtransfer multi-process tests: a child process hosting KV engines.

The test process drives it through a pipe: `PeerProc.start()` spawns one, `call(...)`
runs a command there and returns its reply (or raises the child's error).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import asdict
from typing import Any

import torch

from pdserve.kvtransfer import KVReceiver, KVSender, TransferOptions, TransferResult

TINY = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 16}


def make_pool(num_blocks: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
              stacked: bool = False, **geometry: int) -> list[torch.Tensor]:
    """Random KV pool, one [num_blocks, 2, bs, heads, dim] tensor per layer."""
    g = {**TINY, **geometry}
    shape = (num_blocks, 2, g["block_size"], g["num_kv_heads"], g["head_dim"])
    gen = torch.Generator().manual_seed(seed)
    if stacked:
        full = torch.randn((g["num_layers"], *shape), generator=gen).to(dtype).to(device)
        return list(full.unbind(0))
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(g["num_layers"])]


def block_bytes(pool: list[torch.Tensor], block_ids: list[int]) -> bytes:
    """Raw bytes of blocks block_ids (in that order) of every layer."""
    if not block_ids:
        return b""
    idx = torch.tensor(block_ids, dtype=torch.int64, device=pool[0].device)
    rows = torch.stack([layer.index_select(0, idx) for layer in pool]).cpu().contiguous()
    return rows.view(torch.uint8).numpy().tobytes()


def result_dict(r: TransferResult) -> dict[str, Any]:
    return asdict(r)


def _serve(conn: Any) -> None:
    engines: dict[str, Any] = {}
    pools: dict[str, list[torch.Tensor]] = {}
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "exit":
                for e in engines.values():
                    e.close()
                conn.send(("ok", None))
                conn.close()
                os._exit(0)  # skip interpreter teardown (UCX/torch): the test is waiting
            if cmd == "die":
                os._exit(3)
            reply: Any = None
            if cmd in ("receiver", "sender"):
                name, pool_kw, backend, opts = args
                device = pool_kw.get("device", "cpu")
                if device.startswith("cuda"):
                    torch.cuda.set_device(torch.device(device))
                pools[name] = make_pool(**pool_kw)
                cls = KVReceiver if cmd == "receiver" else KVSender
                engines[name] = cls(pools[name], backend, TransferOptions(**opts))
                reply = engines[name].address if cmd == "receiver" else None
            elif cmd == "call":
                name, method, a, kw = args
                reply = getattr(engines[name], method)(*a, **kw)
                if isinstance(reply, list):
                    reply = [result_dict(r) if isinstance(r, TransferResult) else r for r in reply]
            elif cmd == "counters":
                e = engines[args[0]]
                reply = {"num_inflight": e.num_inflight, "staging_free": e.staging_free,
                         "staging_total": e.staging_total}
            elif cmd == "blocks":
                name, ids = args
                reply = block_bytes(pools[name], ids)
            elif cmd == "close":
                engines.pop(args[0]).close()
                pools.pop(args[0], None)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", reply))
        except BaseException as e:
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class PeerError(RuntimeError):
    pass


class PeerProc:
    """Parent-side handle of one helper process."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()

    def call(self, cmd: str, *args: Any, timeout_s: float = 30.0) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer did not answer {cmd!r} within {timeout_s} s")
        status, reply = self.conn.recv()
        if status != "ok":
            raise PeerError(reply)
        return reply

    def engine(self, name: str, method: str, *a: Any, timeout_s: float = 30.0, **kw: Any) -> Any:
        return self.call("call", name, method, a, kw, timeout_s=timeout_s)

    def kill(self) -> None:
        self.conn.send(("die", ()))
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout_s=10)
            except (OSError, EOFError, TimeoutError, PeerError):
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()

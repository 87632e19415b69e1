"""pynccl binding and the GPU paths of the transfer layer.

On a CPU box only the library lookup runs (found, or a clear error); `-m gpu` tests need
CUDA, and the two-GPU ones (gpu2) move KV between cuda:0 and cuda:1 in two processes.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from kvtransfer_peer import PeerProc, block_bytes, make_pool

from pdserve.kvtransfer import KVSender, TransferOptions
from pdserve.kvtransfer.pynccl import (
    NCCL_IN_PROGRESS,
    NCCL_SUCCESS,
    NcclLibrary,
    NcclNotFoundError,
    find_nccl_library,
)


def test_find_nccl_library_or_clear_error():
    try:
        path = find_nccl_library()
    except NcclNotFoundError as e:
        msg = str(e)
        assert "libnccl.so.2 not found" in msg and "nvidia-nccl-cu12" in msg
        return
    lib = NcclLibrary(path)
    assert lib.version >= 21400, lib.version  # non-blocking communicators need 2.14+
    text = lib.error_string(NCCL_SUCCESS)  # "no error" on recent NCCL, "success" on older
    assert isinstance(text, str) and text.strip()


def _wait_ready(lib: NcclLibrary, comm: int, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while (state := lib.comm_get_async_error(comm)) == NCCL_IN_PROGRESS:
        assert time.monotonic() < end, "NCCL communicator did not become ready"
        time.sleep(0.001)
    assert state == NCCL_SUCCESS, lib.error_string(state)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_pynccl_self_send_recv_nonblocking():
    lib = NcclLibrary()
    torch.cuda.set_device(0)
    comm, _ = lib.comm_init_rank(1, lib.get_unique_id(), 0, blocking=False)
    _wait_ready(lib, comm)
    stream = torch.cuda.Stream()
    x = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
    y = torch.zeros_like(x)
    nbytes = x.numel() * x.element_size()
    lib.check(lib.group_start(), "ncclGroupStart")
    lib.check(lib.send(x.data_ptr(), nbytes, 0, comm, stream.cuda_stream), "ncclSend",
              allow_in_progress=True)
    lib.check(lib.recv(y.data_ptr(), nbytes, 0, comm, stream.cuda_stream), "ncclRecv",
              allow_in_progress=True)
    lib.check(lib.group_end(), "ncclGroupEnd", allow_in_progress=True)
    _wait_ready(lib, comm)
    stream.synchronize()
    assert torch.equal(x, y)
    assert lib.comm_abort(comm) in (NCCL_SUCCESS, NCCL_IN_PROGRESS)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_pynccl_abort_of_a_never_joined_comm_returns():
    """Rank 1 never joins: non-blocking init stays pending, and abort still returns."""
    code = textwrap.dedent("""
        import time, torch
        from pdserve.kvtransfer.pynccl import NcclLibrary, NCCL_IN_PROGRESS
        lib = NcclLibrary(); torch.cuda.set_device(0)
        comm, res = lib.comm_init_rank(2, lib.get_unique_id(), 0, blocking=False)
        time.sleep(1.0)
        assert lib.comm_get_async_error(comm) == NCCL_IN_PROGRESS
        t = time.monotonic(); lib.comm_abort(comm); print("abort_s", time.monotonic() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "abort_s" in out.stdout


def _disjoint_requests(rng: random.Random, sizes: list[int], n_src: int,
                       n_dst: int) -> dict[str, tuple[list[int], list[int]]]:
    """{rid: (src, dst)}; destination blocks never shared between requests in flight (two
    requests writing one block leave only the later one's bytes there)."""
    dst_all = rng.sample(range(n_dst), sum(sizes))
    out, pos = {}, 0
    for i, n in enumerate(sizes):
        out[f"g{i}"] = (rng.sample(range(n_src), n), dst_all[pos:pos + n])
        pos += n
    return out


def test_disjoint_requests_helper():
    reqs = _disjoint_requests(random.Random(3), [1, 7, 20, 40], 64, 80)
    dst = [b for _, d in reqs.values() for b in d]
    assert len(dst) == len(set(dst)) == 68 and all(0 <= b < 80 for b in dst)
    assert [len(s) for s, _ in reqs.values()] == [1, 7, 20, 40]


def _two_gpu_transfer(backend: str, stacked: bool, peer_copy: bool = False) -> None:
    """peer_copy: the sender knows the destination blocks and may write them itself."""
    opts = {"staging_bytes": 1 << 20, "min_message_bytes": 256 << 10, "deadline_s": 30.0,
            "peer_copy": peer_copy}
    geo = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128}
    rx_proc = PeerProc()
    torch.cuda.set_device(0)
    pool = make_pool(64, seed=1, device="cuda:0", dtype=torch.bfloat16, stacked=stacked, **geo)
    tx = KVSender(pool, backend, TransferOptions(**opts))
    try:
        addr = rx_proc.call("receiver", "rx", {"num_blocks": 80, "seed": 2, "device": "cuda:1",
                                               "dtype": torch.bfloat16, "stacked": stacked, **geo},
                            backend, opts, timeout_s=120)
        reqs = _disjoint_requests(random.Random(3), [1, 7, 20, 40], 64, 80)
        for rid, (src, dst) in reqs.items():
            rx_proc.engine("rx", "expect", rid, dst)
            tx.start(rid, addr, src, dst if peer_copy else None)
        for layer in range(geo["num_layers"]):
            ev = torch.cuda.Event()
            ev.record()
            for rid in reqs:
                tx.layer_ready(rid, layer, ev)
        for rid in reqs:
            tx.finish(rid, {"rid": rid})
        res = tx.wait(60, list(reqs))
        assert len(res) == len(reqs) and all(r.ok for r in res), res
        via = "peer_copy" if peer_copy and stacked else backend
        assert all(r.via == via for r in res), res
        got = rx_proc.engine("rx", "wait", 60, list(reqs), timeout_s=90)
        assert all(r["ok"] and r["aux"] == {"rid": r["req_id"]} and r["via"] == via
                   for r in got), got
        for rid, (src, dst) in reqs.items():
            assert rx_proc.call("blocks", "rx", dst) == block_bytes(pool, src), rid
        c = rx_proc.call("counters", "rx")
        assert c["num_inflight"] == 0 and c["staging_free"] == c["staging_total"]
        assert tx.num_inflight == 0 and tx.staging_free == tx.staging_total
    finally:
        tx.close()
        rx_proc.stop()


@pytest.mark.gpu
@pytest.mark.gpu2
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stacked", [True, False])
def test_nccl_kv_transfer_two_gpus(stacked):
    _two_gpu_transfer("nccl", stacked)


@pytest.mark.gpu
@pytest.mark.gpu2
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stacked", [True, False])
def test_peer_copy_two_gpus(stacked):
    """CUDA IPC into the other GPU's pool (a per-layer pool keeps the NCCL path)."""
    _two_gpu_transfer("nccl", stacked, peer_copy=True)


@pytest.mark.gpu
@pytest.mark.gpu2
@pytest.mark.timeout(300)
def test_peer_copy_end_before_the_copy_lands():
    """The sender's `end` leaves once its copy is launched, naming an interprocess event;
    the receiver reports the request only once that event fired. The copy is held back
    behind a long GPU sleep: a receiver that did not wait would read the old bytes."""
    opts = {"staging_bytes": 1 << 20, "deadline_s": 30.0}
    geo = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128}
    rx_proc = PeerProc()
    torch.cuda.set_device(0)
    pool = make_pool(64, seed=1, device="cuda:0", dtype=torch.bfloat16, stacked=True, **geo)
    tx = KVSender(pool, "nccl", TransferOptions(**opts))
    side = torch.cuda.Stream()
    try:
        addr = rx_proc.call("receiver", "rx", {"num_blocks": 64, "seed": 2, "device": "cuda:1",
                                               "dtype": torch.bfloat16, "stacked": True, **geo},
                            "nccl", opts, timeout_s=120)
        tx.connect(addr)
        assert all(p.ring is not None for p in tx._by_addr.values())  # events were accepted
        for k in range(3):
            src, dst = list(range(8 * k, 8 * k + 8)), list(range(40 - 8 * k, 48 - 8 * k))
            rid = f"late{k}"
            rx_proc.engine("rx", "expect", rid, dst)
            tx.start(rid, addr, src, dst)
            with torch.cuda.stream(side):
                torch.cuda._sleep(400_000_000)  # ~0.2-0.3 s of GPU time before the copy
                ev = torch.cuda.Event()
                ev.record(side)
            tx.finish(rid, {"k": k}, ev)
            (got,) = rx_proc.engine("rx", "wait", 30, [rid], timeout_s=60)
            assert got["ok"] and got["via"] == "peer_copy", got
            assert rx_proc.call("blocks", "rx", dst) == block_bytes(pool, src), rid
            (res,) = tx.wait(30, [rid])
            assert res.ok
    finally:
        tx.close()
        rx_proc.stop()


@pytest.mark.gpu
@pytest.mark.gpu2
@pytest.mark.timeout(300)
def test_ucx_kv_transfer_two_gpus():
    pytest.importorskip("ucxx", reason="the ucx extra (ucxx) is not installed")
    _two_gpu_transfer("ucx", stacked=True)


class _FakeLib:
    """Stands in for libnccl: scripted communicator states and op results."""

    def __init__(self) -> None:
        self.states: dict[int, list[int]] = {}
        self.results: list[int] = []  # results of the next send/recv calls (default success)
        self.calls: list[tuple] = []
        self.aborted: list[int] = []

    def get_unique_id(self) -> bytes:
        return b"u" * 128

    def comm_init_rank(self, nranks, uid, rank, blocking=True):
        comm = len(self.states) + 1
        self.states[comm] = [NCCL_IN_PROGRESS] * 3 + [NCCL_SUCCESS]
        return comm, NCCL_IN_PROGRESS

    def comm_get_async_error(self, comm):
        st = self.states[comm]
        return st.pop(0) if len(st) > 1 else st[0]

    def _op(self, kind, nbytes, peer, comm):
        self.calls.append((kind, nbytes, peer, comm))
        res = self.results.pop(0) if self.results else NCCL_SUCCESS
        if res == NCCL_IN_PROGRESS:
            self.states[comm] = [NCCL_IN_PROGRESS, NCCL_SUCCESS]
        return res

    def send(self, ptr, nbytes, peer, comm, stream):
        return self._op("send", nbytes, peer, comm)

    def recv(self, ptr, nbytes, peer, comm, stream):
        return self._op("recv", nbytes, peer, comm)

    def comm_abort(self, comm):
        self.aborted.append(comm)
        return NCCL_SUCCESS

    def error_string(self, result):
        return f"error {result}"


class _FakeEvent:
    def __init__(self, *a, **k) -> None:
        self.done = True
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.done


class _FakeStream:
    cuda_stream = 1234

    def __init__(self, *a, **k) -> None:
        self.waited: list = []

    def wait_event(self, ev) -> None:
        self.waited.append(ev)


class _FakeTensor:
    is_cuda = True

    def __init__(self, nbytes: int) -> None:
        self.n = nbytes

    def is_contiguous(self) -> bool:
        return True

    def numel(self) -> int:
        return self.n

    def element_size(self) -> int:
        return 1

    def data_ptr(self) -> int:
        return 4096


def test_nccl_backend_state_machine_with_a_fake_library(monkeypatch):
    """Non-blocking init and ops (ncclInProgress), ordering, errors and abort, on CPU."""
    from contextlib import nullcontext

    from pdserve.kvtransfer import TransferError
    from pdserve.kvtransfer.nccl import NcclBackend

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "device", lambda *a: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    lib = _FakeLib()
    be = NcclBackend(torch.device("cuda", 0), library=lib)
    assert be.address() == b"" and len(be.new_token()) == 128
    peer = be.connect(b"", be.new_token(), initiator=True)
    assert peer.rank == 0 and peer.other == 1 and peer.busy
    after = _FakeEvent()
    s1 = be.post_send(peer, _FakeTensor(100), 1, after=after)
    r1 = be.post_recv(peer, _FakeTensor(50), 2)
    assert not lib.calls and not be.poll(s1)  # init still in progress: nothing issued
    assert be.poll(s1) and be.poll(r1)  # ready: both issued in order, events fired
    assert lib.calls == [("send", 100, 1, 1), ("recv", 50, 1, 1)]
    assert peer.stream.waited == [after]  # the send waited for its producer on the GPU

    lib.results = [NCCL_IN_PROGRESS]  # enqueue completes asynchronously
    s2 = be.post_send(peer, _FakeTensor(10), 3)
    assert s2.event is None and not be.poll(s2)
    assert be.poll(s2) and s2.event is not None and s2.event.recorded

    ev_stuck = be.post_recv(peer, _FakeTensor(10), 4)
    ev_stuck.event.done = False  # kernel still running when the comm reports an error
    lib.states[peer.comm] = [6]
    assert not be.poll(ev_stuck) and lib.aborted == [peer.comm]
    ev_stuck.event.done = True
    with pytest.raises(TransferError, match="error 6"):
        be.poll(ev_stuck)
    late = be.post_send(peer, _FakeTensor(10), 5)  # after the failure: fails, never issued
    with pytest.raises(TransferError):
        be.poll(late)
    assert len(lib.calls) == 4

    peer2 = be.connect(b"", b"x" * 128, initiator=False)
    lib.states[peer2.comm] = [NCCL_SUCCESS]
    lib.results = [4]  # ncclInvalidArgument from the call itself
    bad = be.post_recv(peer2, _FakeTensor(8), 6)
    with pytest.raises(TransferError, match="ncclRecv failed"):
        be.poll(bad)
    be.close()
    assert sorted(lib.aborted) == [peer.comm, peer2.comm]  # each aborted exactly once

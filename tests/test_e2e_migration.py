"""Migration across processes on CPU over UCX: the decode worker serving a greedy or seeded
stream is SIGSTOPped past the coordinator's timeouts, or SIGKILLed, mid-stream; the stream
continues on the other decode worker with no missing or repeated token, and equals an
undisturbed run. Every block is free afterwards."""

from __future__ import annotations

import signal
import time

import pytest

from pdserve import LLM, SamplingParams
from pdserve.child_process import signal_group
from pdserve.cluster import LocalCluster
from pdserve.coordinator.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = [(11 * i + 2) % 250 for i in range(37)]
GREEDY = dict(max_tokens=160, temperature=0.0, ignore_eos=True)
SEEDED = dict(max_tokens=160, temperature=0.8, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)


def worker_proc(cluster: LocalCluster, worker_id: str):
    """The child process that registered as `worker_id` (from its log's serving line)."""
    for proc in cluster.workers.values():
        if f" {worker_id} serving on" in proc.log_path.read_text(errors="replace"):
            return proc
    raise KeyError(worker_id)


def serving_decode(cl: Client) -> str:
    busy = [w["info"]["worker_id"] for w in cl.list_workers()
            if w["info"]["role"] == "decode" and w["inflight"] > 0]
    assert len(busy) == 1, busy
    return busy[0]


def all_free(cl: Client, n_workers: int, timeout_s: float = 30.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ws = cl.stats(live=True)["workers"]
        if len(ws) == n_workers and all(
                w["load"]["free_blocks"] == w["load"]["total_blocks"] > 0 for w in ws):
            return True
        time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def want() -> dict[str, list[int]]:
    llm = LLM(model="tiny")
    return {name: llm.generate(PROMPT, SamplingParams(**s))[0].token_ids
            for name, s in (("greedy", GREEDY), ("seeded", SEEDED))}


def test_decode_sigstop_then_sigkill_mid_stream_migrates(want):
    with LocalCluster("tiny", prefill=1, decode=2, devices="cpu", transfer="ucx",
                      start_timeout_s=150, worker_args=["--transfer-timeout", "3"],
                      coordinator_args=["--worker-timeout", "3", "--stall-timeout", "4"]) as c:
        c.wait_ready(150)
        with Client(c.address, timeout_s=120) as cl:
            for name, sampling, sig in (("greedy", GREEDY, signal.SIGSTOP),
                                        ("seeded", SEEDED, signal.SIGKILL)):
                got: list[int] = []
                stream = cl.stream(PROMPT, **sampling)
                while len(got) < 8:
                    got += next(stream).token_ids
                victim = worker_proc(c, serving_decode(cl))
                signal_group(victim, sig)
                try:
                    for chunk in stream:
                        got += chunk.token_ids
                finally:
                    if sig == signal.SIGSTOP:
                        signal_group(victim, signal.SIGCONT)  # it registers again
                assert got == want[name], name
                stats = cl.stats()
                assert stats["requests_active"] == 0
                if sig == signal.SIGSTOP:  # back to 3 workers before the next round
                    end = time.monotonic() + 30
                    while len(cl.list_workers()) < 3 and time.monotonic() < end:
                        time.sleep(0.2)
            assert cl.stats()["requests_migrated"] == 2
            assert all_free(cl, n_workers=2)


@pytest.mark.gpu
def test_decode_kill_mid_stream_migrates_over_nccl():
    """Two GPUs, NCCL (prefill on cuda:0, two decode workers sharing cuda:1): the decode
    worker serving a greedy stream is SIGKILLed mid-stream.
    The prefill worker's communicator with the dead peer is dropped (its control connection
    closes) and a new 2-rank communicator is made with the other decode worker; the stream
    equals the undisturbed one, and the prefill worker keeps serving afterwards."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with LocalCluster("tiny", prefill=1, decode=2, devices="0,1,1", transfer="nccl",
                      shared_gpus=True, start_timeout_s=200,
                      worker_args=["--transfer-timeout", "5", "--num-blocks", "512"],
                      coordinator_args=["--worker-timeout", "3", "--stall-timeout", "4"]) as c:
        c.wait_ready(200)
        with Client(c.address, timeout_s=120) as cl:
            undisturbed = cl.generate(PROMPT, **GREEDY).token_ids
            got: list[int] = []
            stream = cl.stream(PROMPT, **GREEDY)
            while len(got) < 8:
                got += next(stream).token_ids
            signal_group(worker_proc(c, serving_decode(cl)), signal.SIGKILL)
            for chunk in stream:
                got += chunk.token_ids
            assert got == undisturbed
            assert cl.stats()["requests_migrated"] == 1
            again = cl.generate(PROMPT, **GREEDY).token_ids  # the prefill worker still serves
            assert again == undisturbed
            assert all_free(cl, n_workers=2)

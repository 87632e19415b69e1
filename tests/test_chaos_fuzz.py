"""The chaos fuzzer with the cluster secret (`pdserve bench chaos --scenarios fuzz-secret`,
here in-process): malformed and odd messages that pass the guard end with deliberate
statuses (never UNKNOWN/INTERNAL), leave no KV block held, and a request id too long for
the KV control channel is refused up front by the coordinator and by every worker."""

from __future__ import annotations

import grpc
import pytest
from fake_worker import assert_no_leaks

import pdserve.decode  # noqa: F401  (registers the both role)
from pdserve.benchmarks.chaos_load import BAD_STATUSES, fuzz
from pdserve.config import CacheConfig, EngineConfig, TransferConfig, WorkerConfig
from pdserve.coordinator.client import Client, ClientError
from pdserve.kvtransfer.schema import MAX_ID_CHARS
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import MAX_REQUEST_ID_CHARS
from pdserve.worker.server import WorkerServer

SECRET = "cluster-secret"


@pytest.mark.timeout(180)
def test_fuzz_with_the_secret(make_cluster, lt):
    c = make_cluster(cluster_secret=SECRET)
    c.add("prefill", cluster_secret=SECRET)
    c.add("decode", cluster_secret=SECRET)
    cfg = WorkerConfig(role="both", engine=EngineConfig(model="tiny", device="cpu",
                                                        cache=CacheConfig(num_blocks=64)),
                       transfer=TransferConfig(secret=SECRET), heartbeat_s=0.05,
                       cluster_secret=SECRET)  # standalone: fuzzed directly
    real = WorkerServer(cfg)
    lt.run(real.start(), timeout=90)
    real_address = f"127.0.0.1:{real.port}"
    try:
        # the fake workers validate nothing (they are load generators): not fuzzed
        targets = [("Coordinator", c.address), ("Worker", real_address)]
        seen = fuzz(targets, 200, seed=3, credential=SECRET)
        assert not BAD_STATUSES & set(seen), seen
        assert seen["INVALID_ARGUMENT"] and seen["OK"], seen  # the handlers were reached

        too_long = "r" * (MAX_REQUEST_ID_CHARS + 1)
        with grpc.insecure_channel(real_address) as ch, pytest.raises(grpc.RpcError) as ei:
            list(pb_grpc.WorkerStub(ch).Generate(
                pb.GenerateWorkerRequest(request_id=too_long, prompt_token_ids=[1, 2]),
                metadata=(("authorization", f"Bearer {SECRET}"),), timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in ei.value.details()
        with Client(c.address, timeout_s=10) as cl, pytest.raises(ClientError) as ei:
            cl.generate(prompt_token_ids=[1, 2], max_tokens=2, request_id=too_long)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT

        load = lt.run(real.core.on_engine(real.core.load))
        assert load.free_blocks == load.total_blocks
        assert_no_leaks(c)
    finally:
        lt.run(real.stop(grace_s=0), timeout=30)


def test_request_id_limit_is_the_kv_channels():
    assert MAX_REQUEST_ID_CHARS == MAX_ID_CHARS

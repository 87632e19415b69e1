"""A real decode worker (tiny model, CPU, UCX) whose KV transfer thread dies turns
NOT_SERVING, refuses new work with UNAVAILABLE, and the coordinator drops it."""

from __future__ import annotations

import grpc
import pytest
from fake_worker import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pdserve.decode  # noqa: F401  (registers the decode role)
from pdserve.config import CacheConfig, EngineConfig, TransferConfig, WorkerConfig
from pdserve.coordinator.client import Client
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.worker.server import WorkerServer

SECRET = "cluster-secret"


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=5).status


@pytest.mark.timeout(120)
def test_transfer_thread_death_takes_the_worker_out_of_service(make_cluster, lt):
    c = make_cluster(cluster_secret=SECRET, worker_timeout_s=1.0)
    cfg = WorkerConfig(role="decode", engine=EngineConfig(model="tiny", device="cpu",
                                                          cache=CacheConfig(num_blocks=64)),
                       transfer=TransferConfig(secret=SECRET), coordinator=c.address,
                       heartbeat_s=0.05, cluster_secret=SECRET)
    server = WorkerServer(cfg)
    lt.run(server.start(), timeout=90)
    address = f"127.0.0.1:{server.port}"
    try:
        with Client(c.address, timeout_s=5) as cl:
            assert [w["info"]["worker_id"] for w in cl.list_workers()] == [server.worker_id]
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING

        endpoint = server.role.receiver.receiver

        def boom() -> None:
            raise RuntimeError("injected bug in the progress thread")
        endpoint._progress = boom
        endpoint._wake()
        wait_until(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   what="NOT_SERVING")
        assert "injected bug" in (server.core.failure or "")
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                pb_grpc.WorkerStub(ch).Reserve(
                    pb.ReserveRequest(request_id="r1", prompt_token_ids=[1, 2]),
                    metadata=(("authorization", f"Bearer {SECRET}"),), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(c.address, timeout_s=5) as cl:
            wait_until(lambda: cl.list_workers() == [], timeout_s=5, what="worker dropped")
    finally:
        lt.run(server.stop(grace_s=0), timeout=30)

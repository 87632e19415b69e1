"""The cluster plane's credential, the API key, worker-id takeover, malformed request bytes,
and keepalive settings (coordinator + fake workers on one loop, loopback only)."""

from __future__ import annotations

import random

import grpc
import pytest
from fake_worker import fake_outputs, wait_until

from pdserve.coordinator.client import Client, ClientError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.grpc_util import CHANNEL_OPTIONS, SERVER_OPTIONS

C = grpc.StatusCode
KEY, SECRET = "client-key", "cluster-secret"


def _md(cred: str | None):
    return (("authorization", f"Bearer {cred}"),) if cred else None


def _call(address: str, service: str, method: str, request, cred: str | None,
          stream: bool = False):
    """One call with raw bytes or a message; returns the reply (or list of replies)."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(address) as ch:
        path = f"/pdserve.v1.{service}/{method}"
        if stream:
            return list(ch.unary_stream(path)(raw, metadata=_md(cred), timeout=5))
        return ch.unary_unary(path)(raw, metadata=_md(cred), timeout=5)


def _code(fn, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    return ei.value.code()


def _worker_ids(address: str) -> dict[str, str]:
    with Client(address, timeout_s=5, auth_token=KEY) as cl:
        return {w["info"]["worker_id"]: w["info"]["address"] for w in cl.list_workers()}


def test_two_credentials(make_cluster):
    c = make_cluster(auth_token=KEY, cluster_secret=SECRET)
    w = c.add("both", auth_token=None, cluster_secret=SECRET)
    with Client(c.address, timeout_s=5, auth_token=KEY) as cl:
        assert cl.generate(prompt_token_ids=[5], max_tokens=3, ignore_eos=True).token_ids \
            == fake_outputs([5], 3)[0]
    with Client(c.address, timeout_s=5, auth_token=SECRET) as cl:  # the secret opens it too
        assert len(cl.list_workers()) == 1
    with Client(c.address, timeout_s=5) as cl:
        with pytest.raises(ClientError) as ei:
            cl.list_workers()
        assert ei.value.code == C.UNAUTHENTICATED

    # Register / Heartbeat: the client key (or nothing) is not enough; nothing is added
    fake = pb.RegisterRequest(info=pb.WorkerInfo(role=pb.ROLE_BOTH, address="127.0.0.1:1",
                                                 model="fake-model", total_blocks=8))
    for cred in (None, KEY, "guess"):
        assert _code(_call, c.address, "Coordinator", "Register", fake, cred) == C.UNAUTHENTICATED
        hb = pb.HeartbeatRequest(worker_id=w.worker_id)
        assert _code(_call, c.address, "Coordinator", "Heartbeat", hb, cred) == C.UNAUTHENTICATED
    assert _worker_ids(c.address) == {w.worker_id: w.address}

    # every Worker RPC needs the secret; refused calls leave nothing behind
    reqs = {"Reserve": pb.ReserveRequest(request_id="r1", prompt_token_ids=[1]),
            "Prefill": pb.PrefillRequest(request_id="r2", prompt_token_ids=[1]),
            "SetKvTarget": pb.KvTarget(request_id="r2"),
            "DecodeStream": pb.DecodeRequest(request_id="r3"),
            "Generate": pb.GenerateWorkerRequest(request_id="r4", prompt_token_ids=[1]),
            "Abort": pb.AbortRequest(request_id="r5"), "Stats": pb.WorkerStatsRequest()}
    for cred in (None, KEY):
        for method, req in reqs.items():
            stream = method in ("DecodeStream", "Generate")
            assert _code(_call, w.address, "Worker", method, req, cred, stream) \
                == C.UNAUTHENTICATED, (method, cred)
    assert not w.reqs and w.free == w.total and not w.aborts
    reply = pb.WorkerStatsReply.FromString(
        _call(w.address, "Worker", "Stats", pb.WorkerStatsRequest(), SECRET))
    assert reply.load.free_blocks == w.total


def test_live_worker_id_cannot_be_taken_over(make_cluster):
    c = make_cluster(cluster_secret=SECRET)
    d = c.add("decode", worker_id="d1", cluster_secret=SECRET)
    c.add("prefill", cluster_secret=SECRET)
    thief = pb.RegisterRequest(info=pb.WorkerInfo(worker_id="d1", role=pb.ROLE_DECODE,
                                                  address="127.0.0.1:1", model="fake-model"))
    assert _code(_call, c.address, "Coordinator", "Register", thief, SECRET) == C.ALREADY_EXISTS
    assert _worker_ids(c.address)["d1"] == d.address

    # once the coordinator forgot it, the real worker registers again under its id
    registry = c.coord.orch.registry

    async def forget() -> None:
        registry.drop("d1", "test: forgotten")
    c.lt.run(forget())
    wait_until(lambda: _worker_ids(c.address).get("d1") == d.address, what="re-registration")
    with Client(c.address, timeout_s=5) as cl:
        assert cl.generate(prompt_token_ids=[3], max_tokens=2, ignore_eos=True).token_ids \
            == fake_outputs([3], 2)[0]


def _bad_bytes(cls, rng: random.Random) -> bytes:
    """Random bytes that do not parse as a `cls` message."""
    while True:
        raw = rng.randbytes(rng.randint(1, 64))
        try:
            cls.FromString(raw)
        except Exception:
            return raw


@pytest.mark.parametrize("secret", [None, SECRET])
def test_malformed_request_bytes_are_invalid_argument(make_cluster, secret):
    c = make_cluster(cluster_secret=secret, auth_token=KEY)
    w = c.add("both", auth_token=KEY, cluster_secret=secret)
    rng = random.Random(10)
    for service, address in (("Coordinator", c.address), ("Worker", w.address)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            cls = getattr(pb, m.input_type.name)
            cred = secret or KEY if m.name in ("Register", "Heartbeat") or service == "Worker" \
                else KEY
            for _ in range(8):
                raw = _bad_bytes(cls, rng)
                code = _code(_call, address, service, m.name, raw, cred, m.server_streaming)
                assert code == C.INVALID_ARGUMENT, (service, m.name, raw)
    assert not w.reqs and w.free == w.total


def test_keepalive_settings_agree():
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_permit_without_calls"] == 1
    # the client never pings more often than the server allows, with or without data
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0


_IDLE_CHANNEL = r"""
import asyncio, grpc
from pdserve.proto import pdserve_pb2 as pb, pdserve_pb2_grpc as pbg
from pdserve.proto.grpc_util import CHANNEL_OPTIONS, SERVER_OPTIONS
# the project's settings, every interval divided by 15
fast = lambda opts: [(k, v // 15 if k.endswith("_ms") else v) for k, v in opts]
class W(pbg.WorkerServicer):
    async def Abort(self, request, context):
        return pb.AbortReply()
async def main():
    server = grpc.aio.server(options=fast(SERVER_OPTIONS))
    pbg.add_WorkerServicer_to_server(W(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=fast(CHANNEL_OPTIONS)) as ch:
        await pbg.WorkerStub(ch).Abort(pb.AbortRequest())
        await asyncio.sleep(8)  # idle: four keepalive pings at the scaled 2 s
        await pbg.WorkerStub(ch).Abort(pb.AbortRequest())
    print("idle channel ok", flush=True)
asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_idle_channel_gets_no_goaway():
    """Keepalive pings on an idle channel (scaled down 15x) never draw GOAWAY too_many_pings."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _IDLE_CHANNEL], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0 and "idle channel ok" in out.stdout, out.stderr[-2000:]
    assert "too_many_pings" not in out.stderr and "GOAWAY" not in out.stderr, out.stderr[-2000:]

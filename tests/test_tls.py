"""TLS on gRPC and HTTP: a TLS coordinator + a real worker (tiny model, CPU) serve requests
to TLS clients; plaintext clients, and clients without a certificate under mutual TLS, are
refused with a status that names TLS; the HTTP gateway serves HTTPS with the same files;
wrong TLS files are one line at start-up."""

from __future__ import annotations

import argparse
import http.client
import json
import ssl

import grpc
import pytest
from tls_certs import Certs, make_certs

import pdserve.decode  # noqa: F401  (registers the both role)
from pdserve.cluster import LocalCluster, default_coordinator_cmd, default_worker_cmd
from pdserve.config import CacheConfig, EngineConfig, TransferConfig, WorkerConfig
from pdserve.coordinator.client import AsyncClient, Client, ClientError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import tls as tls_flags
from pdserve.proto.tls import TLSConfig, TLSError
from pdserve.worker.coordinator_link import CoordinatorLink, RegistrationFailed
from pdserve.worker.server import WorkerServer

SECRET = "cluster-secret"
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def _https(certs: Certs, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.ca)
    if with_cert:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return ctx


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
def tls_cluster(request, make_cluster, lt, certs):
    """A TLS coordinator (gRPC + HTTPS gateway) and one real `both` worker (tiny, CPU)."""
    mutual = request.param
    c = make_cluster(cluster_secret=SECRET, tls=certs.server(mutual), http_port=0)
    cfg = WorkerConfig(role="both", engine=EngineConfig(model="tiny", device="cpu",
                                                        cache=CacheConfig(num_blocks=64)),
                       transfer=TransferConfig(secret=SECRET), coordinator=c.address,
                       heartbeat_s=0.05, cluster_secret=SECRET, tls=certs.server(mutual))
    worker = WorkerServer(cfg)
    lt.run(worker.start(), timeout=90)
    try:
        yield c, mutual
    finally:
        lt.run(worker.stop(grace_s=0), timeout=30)


@pytest.mark.timeout(180)
def test_tls_cluster_serves_tls_clients_only(tls_cluster, certs, lt):
    c, mutual = tls_cluster
    with Client(c.address, timeout_s=10, tls=certs.client(with_cert=mutual)) as cl:
        r = cl.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
        assert len(r.token_ids) == 6 and r.finish_reason == "length"
        assert [w["info"]["role"] for w in cl.list_workers()] == ["both"]

    async def via_async() -> list[int]:
        async with AsyncClient(c.address, timeout_s=10,
                               tls=certs.client(with_cert=mutual)) as ac:
            return (await ac.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0,
                                      ignore_eos=True)).token_ids
    assert lt.run(via_async(), timeout=30) == r.token_ids  # greedy: the same tokens

    with Client(c.address, timeout_s=5) as plain, pytest.raises(ClientError) as ei:
        plain.generate(prompt_token_ids=PROMPT, max_tokens=2)
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    assert "TLS" in ei.value.details, ei.value.details

    if mutual:  # a TLS client without a certificate is refused, and told why it may be
        with Client(c.address, timeout_s=5, tls=certs.client()) as nocert, \
                pytest.raises(ClientError) as ei:
            nocert.list_workers()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert "--tls-cert" in ei.value.details, ei.value.details


def _get(conn: http.client.HTTPConnection, method: str, path: str,
         body: dict | None = None) -> tuple[int, dict]:
    conn.request(method, path, body=json.dumps(body) if body else None,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


@pytest.mark.timeout(180)
def test_http_gateway_serves_https(tls_cluster, certs):
    c, mutual = tls_cluster
    host, port = c.coord.http_address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), timeout=30,
                                       context=_https(certs, with_cert=mutual))
    assert _get(conn, "GET", "/health")[0] == 200
    status, body = _get(conn, "POST", "/v1/completions",
                        {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                         "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    conn.close()
    plain = http.client.HTTPConnection(host, int(port), timeout=5)  # plaintext to HTTPS
    with pytest.raises((http.client.HTTPException, OSError)):
        _get(plain, "GET", "/health")
    plain.close()
    if mutual:  # no client certificate: the handshake fails
        nocert = http.client.HTTPSConnection(host, int(port), timeout=5,
                                             context=_https(certs, with_cert=False))
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            _get(nocert, "GET", "/health")
        nocert.close()


def test_plaintext_worker_is_told_tls_may_be_why(make_cluster, lt, certs):
    c = make_cluster(tls=certs.server())
    link = CoordinatorLink(c.address, pb.WorkerInfo(role=pb.ROLE_BOTH, address="127.0.0.1:1"),
                           lambda: pb.WorkerLoad())
    with pytest.raises(RegistrationFailed) as ei:
        lt.run(link.start(timeout_s=0.5), timeout=30)
    assert "UNAVAILABLE" in str(ei.value) and "TLS" in str(ei.value), str(ei.value)
    lt.run(link.stop())


def test_config_errors_are_one_line(certs, tmp_path):
    with pytest.raises(TLSError, match="--tls-key needs --tls-cert"):
        TLSConfig(key_file=certs.key)
    with pytest.raises(TLSError, match="--tls-cert needs --tls-key"):
        TLSConfig(cert_file=certs.cert)
    with pytest.raises(TLSError, match="--tls-client-ca needs --tls-cert"):
        TLSConfig(client_ca_file=certs.ca)
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSError, match=f"cannot read --tls-cert {missing}"):
        TLSConfig(missing, certs.key).check()
    with pytest.raises(TLSError, match="the key does not match the certificate"):
        TLSConfig(certs.cert, certs.other_key).check()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSError, match="not a PEM certificate"):
        TLSConfig(str(garbage), certs.key).check()
    with pytest.raises(TLSError, match="--tls-ca .*not a PEM CA certificate"):
        TLSConfig(ca_file=str(garbage)).check()
    with pytest.raises(TLSError, match="cannot read --tls-ca"):  # Client checks before a call
        Client("127.0.0.1:1", tls=TLSConfig(ca_file=missing))
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_pem_private_key(open(certs.key, "rb").read(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                            ser.BestAvailableEncryption(b"pass")))
    with pytest.raises(TLSError, match="is encrypted"):  # refused, never a terminal prompt
        TLSConfig(certs.cert, str(encrypted)).check()
    TLSConfig(certs.cert, certs.key, certs.ca, certs.ca).check()  # the good files pass


def _parse(argv: list[str], server: bool = True) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    tls_flags.add_arguments(p, server=server)
    return p.parse_args(argv)


def test_flags(certs):
    assert tls_flags.from_args(_parse([])) is None
    got = tls_flags.from_args(_parse(["--tls-cert", certs.cert, "--tls-key", certs.key,
                                      "--tls-ca", certs.ca, "--tls-client-ca", certs.ca]))
    assert got == TLSConfig(certs.cert, certs.key, certs.ca, certs.ca)
    with pytest.raises(SystemExit, match="error: --tls-key needs --tls-cert"):
        tls_flags.from_args(_parse(["--tls-key", certs.key]))
    with pytest.raises(SystemExit, match="--tls-ca needs --tls-cert and --tls-key here"):
        tls_flags.from_args(_parse(["--tls-ca", certs.ca]))  # a cluster process must serve TLS
    assert tls_flags.from_args(_parse(["--tls-ca", certs.ca], server=False), server=False) \
        == TLSConfig(ca_file=certs.ca)  # a client only dials
    with pytest.raises(SystemExit):  # a client has no --tls-client-ca
        _parse(["--tls-client-ca", certs.ca], server=False)


def test_local_cluster_passes_tls_flags_to_children(certs):
    tls = certs.server(mutual=True)
    cluster = LocalCluster(prefill=1, decode=1, devices="cpu", tls=tls)
    cluster._coord_address = "127.0.0.1:5"
    want = ["--tls-cert", certs.cert, "--tls-key", certs.key, "--tls-ca", certs.ca,
            "--tls-client-ca", certs.ca]
    for argv in (default_coordinator_cmd(cluster), default_worker_cmd(cluster, cluster.specs[0])):
        i = argv.index("--tls-cert")
        assert argv[i:i + len(want)] == want


def test_server_refuses_bad_files_before_listening(make_cluster, certs):
    with pytest.raises(TLSError, match="does not match"):
        make_cluster(tls=TLSConfig(certs.cert, certs.other_key))


def test_tls_client_of_plaintext_server_is_told(make_cluster, certs):
    c = make_cluster()
    with Client(c.address, timeout_s=5, tls=certs.client()) as cl, \
            pytest.raises(ClientError) as ei:
        cl.list_workers()
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    assert "does not speak TLS" in ei.value.details, ei.value.details


def test_tls_hint_only_for_failed_connections():
    hint = tls_flags.unavailable_hint
    assert "TLS" in hint(None, "failed to connect to all addresses; last error: Socket closed")
    assert hint(None, "no workers registered with the coordinator") == ""
    assert hint(None, "failed to connect to all addresses; ... Connection refused") == ""

"""`pdserve up --tls-*` (tiny model, CPU workers as child processes): the children get the
files, the cluster serves TLS clients and the HTTPS gateway with mutual TLS, and
`pdserve generate` talks to it with --tls-*; a plaintext client is refused."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from tls_certs import make_certs

from pdserve.coordinator.client import Client, ClientError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_with_mutual_tls(tmp_path):
    certs = make_certs(tmp_path)
    http_port = free_port()
    flags = ["--tls-cert", certs.cert, "--tls-key", certs.key, "--tls-ca", certs.ca,
             "--tls-client-ca", certs.ca]
    up = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "up", "--model", "tiny", "--prefill", "1",
         "--decode", "1", "--devices", "cpu", "--port", "0", "--http-port", str(http_port),
         "--log-dir", str(tmp_path / "logs"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address, lines = None, []
        end = time.monotonic() + 240
        while address is None and time.monotonic() < end:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"ready at (\S+:\d+)", line)
            address = m.group(1) if m else None
        assert address, "".join(lines)
        assert f"http gateway on https://127.0.0.1:{http_port}" in up.stdout.readline()
        for name in ("coordinator", "prefill-0", "decode-0"):  # the children got the files
            head = (tmp_path / "logs" / f"{name}.log").read_text().splitlines()[0]
            assert " ".join(flags) in head, head

        with Client(address, timeout_s=30, tls=certs.client(with_cert=True)) as cl:
            r = cl.generate(prompt_token_ids=[3, 4, 5], max_tokens=5, temperature=0,
                            ignore_eos=True)
        assert len(r.token_ids) == 5
        with Client(address, timeout_s=5) as plain, pytest.raises(ClientError) as ei:
            plain.list_workers()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE and "TLS" in ei.value.details

        cli = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "generate", "--coordinator", address,
             "--prompt-ids", "3,4,5", "--max-tokens", "5", "--temperature", "0",
             "--ignore-eos", "--json", "--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
             "--tls-key", certs.client_key], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["token_ids"] == r.token_ids

        ctx = ssl.create_default_context(cafile=certs.ca)
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
        conn = http.client.HTTPSConnection("127.0.0.1", http_port, timeout=30, context=ctx)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()

"""Throwaway TLS files for the tests (trustme): one CA, a server certificate for 127.0.0.1
and localhost, and a client certificate, all written as PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from pdserve.proto.tls import TLSConfig


@dataclass(frozen=True)
class Certs:
    ca: str  # the CA certificate
    cert: str  # server certificate (SAN 127.0.0.1, localhost)
    key: str
    client_cert: str  # a client certificate from the same CA
    client_key: str
    other_key: str  # a key that belongs to no certificate here

    def server(self, mutual: bool = False) -> TLSConfig:
        """A cluster process: serves with `cert`, dials with `ca` (and `cert` as client cert)."""
        return TLSConfig(self.cert, self.key, self.ca, self.ca if mutual else None)

    def client(self, with_cert: bool = False) -> TLSConfig:
        if with_cert:
            return TLSConfig(self.client_cert, self.client_key, self.ca)
        return TLSConfig(ca_file=self.ca)


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@pdserve.test")
    other = trustme.CA().issue_cert("localhost")
    paths = {}
    for name, blob in (("ca", ca.cert_pem.bytes()),
                       ("cert", b"".join(b.bytes() for b in server.cert_chain_pems)),
                       ("key", server.private_key_pem.bytes()),
                       ("client_cert", b"".join(b.bytes() for b in client.cert_chain_pems)),
                       ("client_key", client.private_key_pem.bytes()),
                       ("other_key", other.private_key_pem.bytes())):
        path = directory / f"{name}.pem"
        path.write_bytes(blob)
        paths[name] = str(path)
    return Certs(**paths)

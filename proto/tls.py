"""TLS for every pdserve gRPC server and channel, and the flags that configure it.

One `TLSConfig` per process: the coordinator, a worker and a client each hold one and pass
it down explicitly (CoordinatorConfig.tls, WorkerConfig.tls, `Client(tls=...)`).
- `cert_file` + `key_file` (PEM): this process's certificate. A server presents it; with
  them, the process's own channels (worker -> coordinator, coordinator -> worker) present
  it as their client certificate too, so one cert per host serves both directions.
- `ca_file`: the CA bundle that verifies the servers this process dials (None: the
  system's roots).
- `client_ca_file`: servers require a client certificate signed by this CA (mutual TLS).

A process uses TLS for its server when it has a certificate, and for its channels when it
has a certificate or a CA; with none of the four files it speaks plaintext. Files are read
and checked (`check()`: readable, PEM, key matches certificate) before anything listens,
so a mistake is one line at start-up, not a handshake failure later.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

FLAGS = {"cert_file": "--tls-cert", "key_file": "--tls-key", "ca_file": "--tls-ca",
         "client_ca_file": "--tls-client-ca"}


class TLSError(ValueError):
    """A TLS file is missing, unreadable, not PEM, or does not match its pair."""


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    raise _Encrypted  # never prompt on the terminal for a key's passphrase


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str | None = None  # PEM certificate chain of this process
    key_file: str | None = None  # PEM private key of cert_file (unencrypted)
    ca_file: str | None = None  # PEM CA bundle verifying the servers this process dials
    client_ca_file: str | None = None  # servers: require client certs signed by this CA

    def __post_init__(self) -> None:
        if self.key_file and not self.cert_file:
            raise TLSError("--tls-key needs --tls-cert (the certificate of that key)")
        if self.cert_file and not self.key_file:
            raise TLSError("--tls-cert needs --tls-key (the certificate's private key)")
        if self.client_ca_file and not self.cert_file:
            raise TLSError("--tls-client-ca needs --tls-cert and --tls-key: a server can only "
                           "ask for client certificates over TLS")

    @property
    def serves_tls(self) -> bool:
        """Servers of this process listen with TLS."""
        return bool(self.cert_file)

    @property
    def dials_tls(self) -> bool:
        """Channels of this process use TLS."""
        return bool(self.cert_file or self.ca_file)

    def check(self) -> None:
        """TLSError (one line naming the flag and the file) unless every file given is
        readable PEM and the key belongs to the certificate."""
        for name in ("cert_file", "key_file", "ca_file", "client_ca_file"):
            if getattr(self, name):
                _read(name, getattr(self, name))
        if self.cert_file:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
            except _Encrypted:
                raise TLSError(f"--tls-key {self.key_file} is encrypted; give an unencrypted "
                               "PEM key (openssl pkey -in KEY -out PLAIN)") from None
            except ssl.SSLError as e:
                why = ("the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(e)
                       else f"not a PEM certificate and key ({e.reason or e})")
                raise TLSError(f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: "
                               f"{why}") from None
        for name in ("ca_file", "client_ca_file"):
            path = getattr(self, name)
            if path:
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
                except ssl.SSLError as e:
                    raise TLSError(f"{FLAGS[name]} {path}: not a PEM CA certificate "
                                   f"({e.reason or e})") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of a TLS server; mutual TLS when client_ca_file is set."""
        if not self.serves_tls:
            raise TLSError("a TLS server needs --tls-cert and --tls-key")
        self.check()
        pair = (_read("key_file", self.key_file), _read("cert_file", self.cert_file))
        client_ca = _read("client_ca_file", self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a TLS channel: the CA (or the system's roots), and this process's
        certificate as the client certificate when it has one."""
        self.check()
        ca = _read("ca_file", self.ca_file) if self.ca_file else None
        if self.cert_file:
            return grpc.ssl_channel_credentials(ca, _read("key_file", self.key_file),
                                                _read("cert_file", self.cert_file))
        return grpc.ssl_channel_credentials(ca)

    def argv(self) -> list[str]:
        """The flags that give another pdserve process this configuration."""
        out: list[str] = []
        for name, flag in FLAGS.items():
            if getattr(self, name):
                out += [flag, str(Path(getattr(self, name)).resolve())]
        return out


def _read(name: str, path: str | None) -> bytes:
    try:
        data = Path(str(path)).read_bytes()
    except OSError as e:
        raise TLSError(f"cannot read {FLAGS[name]} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise TLSError(f"{FLAGS[name]} {path} is empty")
    return data


# what gRPC's details say when a connection failed below the application
_TRANSPORT = ("failed to connect", "socket closed", "handshake", "ssl", "connection reset",
              "connection closed")


def unavailable_hint(tls: TLSConfig | None, details: str) -> str:
    """What to add to the details of an UNAVAILABLE status when TLS may be the reason the
    connection failed ("" when it cannot be: a refused connection, or the server's own
    answer)."""
    low = details.lower()
    if "connection refused" in low or not any(m in low for m in _TRANSPORT):
        return ""  # nobody listens there, or the server itself answered
    if "wrong_version_number" in low:
        return "; the server does not speak TLS: connect without --tls-* (or tls=None)"
    if tls is None or not tls.dials_tls:
        return "; if the server uses TLS, connect with TLS (--tls-ca, or tls=TLSConfig(...))"
    if not tls.cert_file:
        return ("; if the server requires client certificates (mutual TLS), give --tls-cert "
                "and --tls-key; check --tls-ca too")
    return ("; check that --tls-ca verifies the server's certificate, that the certificate "
            "names this address, and that the server accepts this client certificate")


# -- the command line -----------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, server: bool = True) -> None:
    """--tls-cert/--tls-key/--tls-ca (and --tls-client-ca for servers)."""
    g = parser.add_argument_group("TLS", (
        "Without these, gRPC (and HTTP) are plaintext. Every process of one cluster takes "
        "the same flags (`pdserve up` passes them to its children)." if server else
        "Without these, the connection to the coordinator is plaintext."))
    if server:
        g.add_argument("--tls-cert", metavar="PEM", default=None,
                       help="serve gRPC (and the HTTP gateway) over TLS with this certificate "
                            "chain; it must name the address peers dial (SAN: IP or DNS "
                            "name). Also presented as this process's client certificate on "
                            "its own channels. Needs --tls-key")
        g.add_argument("--tls-key", metavar="PEM", default=None,
                       help="the unencrypted private key of --tls-cert")
        g.add_argument("--tls-ca", metavar="PEM", default=None,
                       help="CA bundle that verifies the servers this process connects to "
                            "(worker <-> coordinator); default: the system's roots")
        g.add_argument("--tls-client-ca", metavar="PEM", default=None,
                       help="mutual TLS: require every client (Python client, workers, the "
                            "coordinator, HTTP clients) to present a certificate signed by "
                            "this CA")
    else:
        g.add_argument("--tls-ca", metavar="PEM", default=None,
                       help="connect over TLS, verifying the server with this CA bundle")
        g.add_argument("--tls-cert", metavar="PEM", default=None,
                       help="client certificate, for a server started with --tls-client-ca "
                            "(implies TLS; the server is verified with --tls-ca or the "
                            "system's roots). Needs --tls-key")
        g.add_argument("--tls-key", metavar="PEM", default=None,
                       help="the unencrypted private key of --tls-cert")


def from_args(args: argparse.Namespace, server: bool = True) -> TLSConfig | None:
    """The TLSConfig of the flags, checked (SystemExit with one line if wrong); None if no
    TLS flag was given. `server`: a cluster process (coordinator, worker, up), which both
    serves and dials, so TLS needs its certificate."""
    given = {name: getattr(args, flag[2:].replace("-", "_"), None)
             for name, flag in FLAGS.items()}
    if not any(given.values()):
        return None
    try:
        tls = TLSConfig(**given)
        if server and not tls.cert_file:
            raise TLSError("--tls-ca needs --tls-cert and --tls-key here: the coordinator and "
                           "the workers dial each other, so each serves TLS too")
        tls.check()
    except TLSError as e:
        raise SystemExit(f"error: {e}") from None
    return tls

"""TLS for both servers (gRPC and the Connect port) and for the trainer's calls to policy servers.

Server side: `--tls-cert` (PEM chain) and `--tls-key` (PEM key) turn TLS on for the gRPC port and
the Connect port alike; `--tls-client-ca` (PEM roots) additionally requires every client to present
a certificate signed by one of those roots (mutual TLS). The files are read and checked once at
start (Python's ssl module loads the pair, so a key that does not match its certificate is an error
naming both files, not a handshake failure later). Rotating a certificate means restarting the
server (the trainer's publisher and the clients reconnect on their own).
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc is imported where credentials are made, so that engines importing
    import grpc  # their config (TlsFiles) stay free of it (docs/design.md, "Servers")


@dataclass(frozen=True)
class TlsFiles:
    """Server TLS material (paths); all None: plaintext."""

    cert: Path | None = None  # PEM certificate chain the server presents
    key: Path | None = None  # PEM private key of that certificate
    client_ca: Path | None = None  # PEM roots client certificates must chain to; None: no client certificates

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def check(self) -> None:
        """Load the files once: unreadable files, non-PEM data or a key that does not match the
        certificate fail here with the file names."""
        if not self.enabled:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--tls-cert {self.cert} / --tls-key {self.key}: cannot load the pair: {exc}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=str(self.client_ca))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"--tls-client-ca {self.client_ca}: cannot load: {exc}") from None


def read_file(path: Path | str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: {path} is not a PEM file")
    return data


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """gRPC server credentials, or None for plaintext."""
    import grpc

    if not files.enabled:
        return None
    files.check()
    return grpc.ssl_server_credentials(
        [(read_file(files.key, "--tls-key"), read_file(files.cert, "--tls-cert"))],
        root_certificates=read_file(files.client_ca, "--tls-client-ca"),
        require_client_auth=files.client_ca is not None,
    )


def uvicorn_ssl(files: TlsFiles) -> dict:
    """Keyword arguments for uvicorn.Config that serve the Connect port over the same TLS."""
    if not files.enabled:
        return {}
    kwargs = {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)}
    if files.client_ca is not None:
        kwargs.update(ssl_ca_certs=str(files.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def channel_credentials(roots: Path | str | None = None, cert: Path | str | None = None,
                        key: Path | str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: roots (None: the system's), optional client certificate and key."""
    import grpc

    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and the other way round")
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(roots, "TLS roots"),
        private_key=read_file(key, "client key"),
        certificate_chain=read_file(cert, "client certificate"),
    )


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                        help="serve TLS (gRPC and Connect) with this certificate chain; needs --tls-key")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                        help="require client certificates signed by these roots (mutual TLS)")


def tls_from_args(args: argparse.Namespace) -> TlsFiles:
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)

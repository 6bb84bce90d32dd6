"""Throwaway certificates for the TLS tests, made with the system's `openssl` (no Python package
needed): a CA, a server certificate for 127.0.0.1 / localhost signed by it, a client certificate
signed by it (mutual TLS), and a second, unrelated CA that must not be trusted."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: Path  # roots that sign the server and client certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: a client trusting only it must fail the handshake
    other_client_cert: Path  # a client certificate signed by other_ca (mutual TLS must refuse it)
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=tokenfeedback test {name}", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    (folder / f"{name}.key").chmod(0o600)
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _leaf(folder, "stranger", other, "extendedKeyUsage=clientAuth\n")
    return Certs(ca[0], *server, *client, other[0], *stranger)

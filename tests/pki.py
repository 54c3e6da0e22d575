"""A throwaway PKI for TLS tests, made with the openssl command line (EC keys: quick to make)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The SAN of server certificates: what tests dial.
SERVER_NAMES = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def certificate_authority(directory: Path, name: str) -> KeyPair:
    """A self-signed CA certificate with subject CN `name`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return KeyPair(cert, key)


def signed(directory: Path, name: str, ca: KeyPair, extensions: str) -> KeyPair:
    """A certificate with subject CN `name` and the given openssl extension lines, signed by
    `ca`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext_file),
    )  # fmt: skip
    return KeyPair(cert, key)


def server_certificate(
    directory: Path, name: str, ca: KeyPair, names: str = SERVER_NAMES
) -> KeyPair:
    """A server certificate for `names` (openssl subjectAltName syntax) signed by `ca`."""
    return signed(directory, name, ca, f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")


def client_certificate(directory: Path, name: str, ca: KeyPair) -> KeyPair:
    """A client certificate with subject CN `name` signed by `ca`."""
    return signed(directory, name, ca, "extendedKeyUsage=clientAuth\n")


def mutual_tls(server: KeyPair, ca: KeyPair) -> dict[str, Path]:
    """A service's `server.tls` settings for mutual TLS: `server`'s key pair, and clients
    signed by `ca` required."""
    return {"cert_file": server.cert, "key_file": server.key, "client_ca_file": ca.cert}


def triton_pki(directory: Path) -> dict[str, KeyPair]:
    """A CA, a server certificate for a Triton dialled at 127.0.0.1 or localhost, and a client
    certificate, all of it; `stranger`: a client certificate of another CA."""
    ca = certificate_authority(directory, "ca")
    return {
        "ca": ca,
        "server": server_certificate(directory, "triton", ca),
        "client": client_certificate(directory, "client", ca),
        "stranger": client_certificate(
            directory, "stranger", certificate_authority(directory, "other")
        ),
    }

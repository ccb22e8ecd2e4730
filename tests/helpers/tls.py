"""Throwaway TLS certificates for the tests, laid out as QEMU's ``tls-creds-x509`` reads them.

Made with the ``openssl`` command (tools/install-qemu.sh installs it): a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate, and another CA with a client
certificate of its own. Without openssl a test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["OPENSSL", "Pki", "make_pki", "needs_openssl"]

LIMIT = 60.0

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl command: the test certificates are made with it")

SERVER_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
"""
CLIENT_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
"""


@dataclass(frozen=True)
class Pki:
    """Throwaway certificates in directories laid out as QEMU's ``tls-creds-x509`` reads them."""

    server: Path  # endpoint=server: ca-cert.pem, server-cert.pem, server-key.pem (IP:127.0.0.1, DNS:localhost)
    client: Path  # endpoint=client: ca-cert.pem, client-cert.pem, client-key.pem (0600)
    client_no_cert: Path  # ca-cert.pem only
    client_rogue: Path  # the right ca-cert.pem, but a client pair signed by another CA
    unknown_ca: Path  # ca-cert.pem of another CA: the server's certificate is not signed by it


def _openssl(*args: str | os.PathLike[str]) -> None:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *map(os.fspath, args)], capture_output=True, text=True, timeout=LIMIT, check=False)
    assert done.returncode == 0, f"openssl {args[0]} failed: {done.stderr}"


def _new_key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)
    return path


def _new_ca(work: Path, name: str) -> tuple[Path, Path]:
    key = _new_key(work / f"{name}-key.pem")
    cert = work / f"{name}-cert.pem"
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "2", "-subj", f"/CN=mappedram test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def _new_leaf(work: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key = _new_key(work / f"{name}-key.pem")
    csr, cert, extfile = work / f"{name}.csr", work / f"{name}-cert.pem", work / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN=mappedram test {name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
             "-days", "2", "-out", cert, "-extfile", extfile)  # fmt: skip
    return cert, key


def _creds_dir(path: Path, files: dict[str, Path]) -> Path:
    path.mkdir(mode=0o700)
    for name, src in files.items():
        shutil.copyfile(src, path / name)
        (path / name).chmod(0o600 if name.endswith("-key.pem") else 0o644)
    return path


def make_pki(root: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and
    another CA with a client certificate of its own (made with the ``openssl`` command)."""
    if OPENSSL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no openssl command: tools/install-qemu.sh installs it")
        pytest.skip("no openssl command: the test certificates are made with it")
    work = root / "work"
    work.mkdir(parents=True)
    ca = _new_ca(work, "ca")
    other = _new_ca(work, "other-ca")
    server = _new_leaf(work, "server", ca, SERVER_EXT)
    client = _new_leaf(work, "client", ca, CLIENT_EXT)
    rogue = _new_leaf(work, "rogue-client", other, CLIENT_EXT)
    return Pki(
        server=_creds_dir(root / "server", {"ca-cert.pem": ca[0], "server-cert.pem": server[0], "server-key.pem": server[1]}),
        client=_creds_dir(root / "client", {"ca-cert.pem": ca[0], "client-cert.pem": client[0], "client-key.pem": client[1]}),
        client_no_cert=_creds_dir(root / "client-no-cert", {"ca-cert.pem": ca[0]}),
        client_rogue=_creds_dir(root / "client-rogue", {"ca-cert.pem": ca[0], "client-cert.pem": rogue[0], "client-key.pem": rogue[1]}),
        unknown_ca=_creds_dir(root / "unknown-ca", {"ca-cert.pem": other[0]}),
    )



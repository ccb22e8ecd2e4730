"""``serve`` over TLS to a real QEMU 10 destination, as QEMU's own TLS migration is set up.

The destination has ``-object tls-creds-x509,id=tls0,dir=SERVER,endpoint=server,verify-peer=on``
and the ``tls-creds`` migration parameter ``tls0`` before ``migrate-incoming``; serve gets a
directory laid out as QEMU's client endpoint reads it (``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``). The certificates are made for each run with the ``openssl`` command
(``tests/helpers/tls.make_pki``). QEMU is the oracle: it must complete the
migration, and its RAM must then equal the file's; what it refuses, it says on its stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mappedram.errors import MigrationError, UsageError
from mappedram.ops import ServeOptions, ServeReport, serve
from tests.helpers.qemu_cases import MAPPED_RAM, RAM_MIB, qemu_pattern, qemu_save, write_src_ram
from tests.helpers.qemu_harness import QemuVM, first_mismatch, require_qemu
from tests.helpers.tls import Pki, make_pki

pytestmark = pytest.mark.qemu

#: Every wait here is bounded by this; nothing asserts on speed.
LIMIT = 60.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))  # skips without openssl, fails in CI


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mapped-ram file QEMU saved of the pattern RAM (one per module: serve never changes it)."""
    work = tmp_path_factory.mktemp("saved")
    out = work / "qemu.mig"
    qemu_save(require_qemu((10, 0, 0)), "q35", write_src_ram(work), out, MAPPED_RAM)
    return out


@contextlib.contextmanager
def tls_destination(
    ram: Path, tmp_path: Path, pki: Pki, *, postcopy: bool = False, unix: bool = False
) -> Iterator[tuple[QemuVM, str]]:
    """An incoming QEMU with TLS migration (verify-peer=on) listening on loopback TCP (or a
    unix socket); yields it and the address to serve to."""
    binary = require_qemu((10, 0, 0))
    creds = f"tls-creds-x509,id=tls0,dir={os.fspath(pki.server).replace(',', ',,')},endpoint=server,verify-peer=on"
    with QemuVM(ram, ram_mib=RAM_MIB, binary=binary, incoming=True, workdir=tmp_path,
                extra_args=["-object", creds]) as vm:  # fmt: skip
        vm.configure_migration({"postcopy-ram": True} if postcopy else {}, {"tls-creds": "tls0"})
        assert vm.cmd("query-migrate-parameters")["tls-creds"] == "tls0"
        if unix:
            sock = Path(vm.socket_path).parent / f"{vm.name}.mig"
            vm.cmd("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
            yield vm, f"unix:{sock}"
            return
        vm.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
        port = vm.cmd("query-migrate")["socket-address"][0]["port"]
        yield vm, f"tcp:127.0.0.1:{port}"


def assert_ram(path: Path) -> None:
    actual = path.read_bytes()
    expected = bytes(qemu_pattern())
    if actual != expected:
        pytest.fail(f"destination RAM differs: {first_mismatch(actual, expected)}")


def serve_and_complete(vm: QemuVM, path: Path, to: str, options: ServeOptions) -> ServeReport:
    report = serve(path, to, options=options)
    assert report.ok and report.destination_status == 0, report
    info = vm.wait_migration(LIMIT)
    assert info["status"] == "completed", info
    return report


# -- served over TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_serve_over_tls(tmp_path: Path, shm: Path, pki: Pki, saved: Path, postcopy: bool) -> None:
    """A file QEMU saved, served over TLS (QEMU checks serve's client certificate, serve
    checks QEMU's certificate for 127.0.0.1): the migration completes, the RAM is the file's."""
    ram = (shm if postcopy else tmp_path) / "dst.ram"
    with tls_destination(ram, tmp_path, pki, postcopy=postcopy) as (vm, to):
        report = serve_and_complete(vm, saved, to, ServeOptions(postcopy=postcopy, timeout=LIMIT,
                                                                tls_creds=os.fspath(pki.client)))  # fmt: skip
        assert report.mode == ("postcopy" if postcopy else "precopy")
        assert_ram(ram)


def test_serve_over_tls_by_host_name(tmp_path: Path, pki: Pki, saved: Path) -> None:
    """tls_hostname names what QEMU's certificate is checked against (its DNS:localhost)."""
    ram = tmp_path / "dst.ram"
    with tls_destination(ram, tmp_path, pki) as (vm, to):
        serve_and_complete(vm, saved, to, ServeOptions(timeout=LIMIT, tls_creds=os.fspath(pki.client),
                                                       tls_hostname="localhost"))  # fmt: skip
        assert_ram(ram)


def test_serve_over_tls_on_a_unix_socket(tmp_path: Path, pki: Pki, saved: Path) -> None:
    """QEMU does TLS on a unix socket too; the name to check must then be given."""
    ram = tmp_path / "dst.ram"
    with tls_destination(ram, tmp_path, pki, unix=True) as (vm, to):
        with pytest.raises(UsageError, match="tls-hostname"):
            serve(saved, to, options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(pki.client)))
        serve_and_complete(vm, saved, to, ServeOptions(timeout=LIMIT, tls_creds=os.fspath(pki.client),
                                                       tls_hostname="localhost"))  # fmt: skip
        assert_ram(ram)


def test_cli_serve_over_tls(tmp_path: Path, pki: Pki, saved: Path) -> None:
    ram = tmp_path / "dst.ram"
    with tls_destination(ram, tmp_path, pki) as (vm, to):
        cmd = [sys.executable, "-m", "mappedram", "serve", os.fspath(saved), "--to", to, "--tls-creds",
               os.fspath(pki.client), "--tls-hostname", "127.0.0.1", "--output", "json"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT * 2, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["ok"]
        assert vm.wait_migration(LIMIT)["status"] == "completed"
        assert_ram(ram)


# -- refusals ----------------------------------------------------------------------------------------


def test_serve_without_tls_to_a_tls_destination(tmp_path: Path, pki: Pki, saved: Path) -> None:
    """QEMU expects a TLS handshake and gets a migration stream: it drops the connection
    (and says why on its stderr); serve fails with MigrationError, not a hang."""
    with tls_destination(tmp_path / "dst.ram", tmp_path, pki) as (vm, to):
        with pytest.raises(MigrationError) as info:
            serve(saved, to, options=ServeOptions(timeout=LIMIT))
        assert info.value.stage in ("configuration", "ram-setup", "pages", "device-state", "finish"), info.value
        assert vm.cmd("query-migrate").get("status") != "completed"


def test_serve_with_tls_to_a_destination_without(tmp_path: Path, pki: Pki, saved: Path) -> None:
    """A destination without TLS reads the ClientHello as a migration stream and closes:
    MigrationError at stage "tls"."""
    binary = require_qemu((10, 0, 0))
    with QemuVM(tmp_path / "dst.ram", ram_mib=RAM_MIB, binary=binary, incoming=True, workdir=tmp_path) as vm:
        vm.configure_migration({}, None)
        vm.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
        port = vm.cmd("query-migrate")["socket-address"][0]["port"]
        with pytest.raises(MigrationError) as info:
            serve(saved, f"tcp:127.0.0.1:{port}", options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(pki.client)))
        assert info.value.stage == "tls", info.value
        assert "TLS handshake" in str(info.value), str(info.value)


@pytest.mark.parametrize("creds", ["client_rogue", "client_no_cert"])
def test_client_certificate_refused_by_qemu(tmp_path: Path, pki: Pki, saved: Path, creds: str) -> None:
    """verify-peer=on: a client certificate signed by another CA, or none, is refused by
    QEMU; serve fails with MigrationError; a serve with the right one then still completes."""
    ram = tmp_path / "dst.ram"
    with tls_destination(ram, tmp_path, pki) as (vm, to):
        with pytest.raises(MigrationError) as info:
            serve(saved, to, options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(getattr(pki, creds))))
        text = str(info.value)
        # QEMU drops the connection in the handshake or right after it: either way the error
        # says the TLS peer went away (which of the two depends on how fast QEMU checks)
        assert "TLS" in text and ("before sending anything" in text or "in the TLS handshake" in text), text
        assert "PRIVATE KEY" not in text and "CERTIFICATE-----" not in text
        said = "The certificate hasn't got a known issuer" if creds == "client_rogue" else "No certificate was found"
        assert said in vm.stderr, vm.stderr
        serve_and_complete(vm, saved, to, ServeOptions(timeout=LIMIT, tls_creds=os.fspath(pki.client)))
        assert_ram(ram)


@pytest.mark.parametrize(("creds", "hostname", "said"), [
    ("unknown_ca", None, "certificate verify failed"),
    ("client", "not-this-host.example", "Hostname mismatch"),
])  # fmt: skip
def test_qemu_certificate_refused_by_serve(tmp_path: Path, pki: Pki, saved: Path, creds: str,
                                           hostname: str | None, said: str) -> None:  # fmt: skip
    """QEMU's certificate not signed by the CA serve was given, or not for the name checked:
    MigrationError at stage "tls", with OpenSSL's reason."""
    with tls_destination(tmp_path / "dst.ram", tmp_path, pki) as (vm, to):
        with pytest.raises(MigrationError) as info:
            serve(saved, to, options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(getattr(pki, creds)),
                                                  tls_hostname=hostname))  # fmt: skip
        assert info.value.stage == "tls", info.value
        assert said in str(info.value), str(info.value)
        assert vm.cmd("query-migrate").get("status") != "completed"


def test_plain_tcp_to_another_host_is_refused(saved: Path) -> None:
    with pytest.raises(UsageError, match="in the clear"):
        serve(saved, "tcp:192.0.2.1:4444", options=ServeOptions(timeout=LIMIT))


def test_tls_to_another_host_is_allowed(pki: Pki, saved: Path) -> None:
    """With TLS a host that is not this one passes the check: what fails is the connection
    (192.0.2.1 is TEST-NET: nothing answers there)."""
    with pytest.raises(MigrationError) as info:
        serve(saved, "tcp:192.0.2.1:4444",
              options=ServeOptions(timeout=1.0, connect_retry=0.0, tls_creds=os.fspath(pki.client)))  # fmt: skip
    assert info.value.stage == "connect", info.value


def test_key_readable_by_others_is_refused(tmp_path: Path, pki: Pki, saved: Path) -> None:
    """A client key of mode 0644 is refused before anything is opened or connected; the
    error names the file, never its contents."""
    creds = tmp_path / "creds"
    shutil.copytree(pki.client, creds)
    (creds / "client-key.pem").chmod(0o644)
    with pytest.raises(UsageError, match=r"client-key\.pem") as info:
        serve(saved, "tcp:127.0.0.1:1", options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(creds)))
    assert "0644" in str(info.value) and "PRIVATE KEY" not in str(info.value)
    (creds / "ca-cert.pem").unlink()
    (creds / "client-key.pem").chmod(0o600)
    with pytest.raises(UsageError, match=r"ca-cert\.pem"):
        serve(saved, "tcp:127.0.0.1:1", options=ServeOptions(timeout=LIMIT, tls_creds=os.fspath(creds)))

"""Compressed files and QEMU 10: QEMU refuses a compressed file (it names the capability,
before it reads any RAM) and loads what ``decompress`` gives back, RAM bit-exact; and
``serve`` sends a compressed file to a QEMU destination, precopy and postcopy, its RAM
then equal to the file's byte for byte."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mappedram
from mappedram import ops
from mappedram.ops import CompressOptions, EngineOptions, ServeOptions
from tests.helpers.qemu_cases import (
    LEGACY,
    MAPPED_RAM,
    MULTIFD4,
    OFFSET,
    RAM_MIB,
    Variant,
    qemu_destination,
    qemu_load,
    qemu_pattern,
    qemu_save,
    resolved_machine,
    write_src_ram,
)
from tests.helpers.qemu_harness import BACKEND_ID, QemuError, QemuVM, first_mismatch, require_qemu

pytestmark = pytest.mark.qemu

LIMIT = 60.0
OPTS = EngineOptions(channels=2, durable=False)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, f"mappedram {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _assert_ram(path: Path, expected: object) -> None:
    mismatch = first_mismatch(path.read_bytes(), bytes(expected))  # type: ignore[call-overload]
    assert mismatch is None, f"destination RAM differs: {mismatch}"


def _qemu_file(tmp_path: Path, variant: Variant, machine: str = "q35") -> Path:
    out = tmp_path / "qemu.mig"
    qemu_save(require_qemu(), machine, write_src_ram(tmp_path), out, variant)
    return out


def _compressed(tmp_path: Path, src: Path, offset: int = 0, frame_bytes: int = 2 << 20) -> Path:
    z = tmp_path / "z.mig"
    ops.compress(src, z, source_offset=offset, compression=CompressOptions(frame_bytes=frame_bytes), options=OPTS)
    with mappedram.open_file(z) as mf:
        assert mf.compressed
    return z


# -- QEMU refuses a compressed file, loads its decompression -------------------------------------


@pytest.mark.parametrize("load", [MAPPED_RAM, MULTIFD4], ids=lambda v: v.name)
def test_qemu_refuses_a_compressed_file_by_its_capability(tmp_path: Path, load: Variant) -> None:
    binary = require_qemu((10, 0, 0))
    z = _compressed(tmp_path, _qemu_file(tmp_path, MAPPED_RAM))
    with qemu_destination(binary, "q35", tmp_path) as vm:
        with pytest.raises(QemuError) as failure:
            qemu_load(vm, z, load)
        assert vm.returncode is None, "QEMU exited although exit-on-error is false"
        said = vm.stderr
    # QEMU 10's check_capabilities(), then vmstate_load_state's note of the subsection it failed
    assert "qemu-system-x86_64: Received unknown capability mappedram-zstd\n" in said, said
    assert vm.last_error() == "Failed to load configuration/capabilities:capabilities", said
    assert "Received unknown capability mappedram-zstd" in str(failure.value)
    assert not any((tmp_path / "dst.ram").read_bytes()[: 1 << 20]), "QEMU wrote RAM from a file it refused"


@pytest.mark.parametrize("variant", [MAPPED_RAM, LEGACY, OFFSET], ids=lambda v: v.name)
def test_qemu_loads_the_decompressed_file(tmp_path: Path, variant: Variant) -> None:
    binary = require_qemu((10, 0, 0))
    src = _qemu_file(tmp_path, variant, "pc")
    z = _compressed(tmp_path, src, variant.offset or 0, frame_bytes=64 << 10)
    back = tmp_path / "back.mig"
    _run("decompress", os.fspath(z), os.fspath(back), "--quiet")
    with mappedram.open_file(back) as mf:
        assert mf.format_name == "mapped-ram" and not mf.compressed
    with qemu_destination(binary, "pc", tmp_path) as vm:
        qemu_load(vm, back, MULTIFD4)
    _assert_ram(tmp_path / "dst.ram", qemu_pattern())


def test_qemu_loads_a_decompressed_save_of_ours(tmp_path: Path) -> None:
    """mappedram save -> compress --seal -> decompress --seal -> QEMU, RAM bit-exact."""
    binary = require_qemu((10, 0, 0))
    src_ram = write_src_ram(tmp_path)
    ours, z, back = tmp_path / "ours.mig", tmp_path / "z.mig", tmp_path / "back.mig"
    with qemu_destination(binary, "q35", tmp_path) as vm:
        _run("save", "--block", f"{BACKEND_ID}={src_ram}", "-o", os.fspath(ours), "--machine", resolved_machine(vm),
             "--quiet")  # fmt: skip
        _run("compress", os.fspath(ours), os.fspath(z), "--frame-size", "1M", "--seal", "--quiet")
        _run("verify", os.fspath(z), "--data", "--quiet")
        _run("decompress", os.fspath(z), os.fspath(back), "--seal", "--quiet")
        _run("verify", os.fspath(back), "--data", "--quiet")
        qemu_load(vm, back, MAPPED_RAM)
    _assert_ram(tmp_path / "dst.ram", src_ram.read_bytes())


# -- serve of a compressed file --------------------------------------------------------------


@contextlib.contextmanager
def destination(ram: Path, tmp_path: Path, *, postcopy: bool = False) -> Iterator[tuple[QemuVM, str]]:
    """An incoming q35 QEMU listening on a unix socket (as tests/interop/test_serve.py's)."""
    binary = require_qemu((10, 0, 0))
    qmp = tmp_path / "serve.qmp"
    with QemuVM(ram, machine="q35", ram_mib=RAM_MIB, binary=binary, incoming=True, workdir=tmp_path,
                extra_args=("-qmp", f"unix:{qmp},server=on,wait=off")) as vm:  # fmt: skip
        vm.configure_migration({"postcopy-ram": True} if postcopy else {}, None)
        sock = Path(vm.socket_path).parent / f"{vm.name}.mig"
        vm.cmd("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
        yield vm, f"unix:{sock}"


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
@pytest.mark.parametrize("variant", [MAPPED_RAM, LEGACY], ids=lambda v: v.name)
def test_serve_a_compressed_file(tmp_path: Path, shm: Path, variant: Variant, postcopy: bool) -> None:
    src = _qemu_file(tmp_path, variant)
    z = _compressed(tmp_path, src, variant.offset or 0, frame_bytes=256 << 10)
    before = z.read_bytes()
    ram = (shm if postcopy else tmp_path) / "dst.ram"
    with destination(ram, tmp_path, postcopy=postcopy) as (vm, to):
        report = ops.serve(z, to, options=ServeOptions(postcopy=postcopy, timeout=LIMIT))
        assert report.ok and report.destination_status == 0, report
        assert report.mode == ("postcopy" if postcopy else "precopy")
        info = vm.wait_migration(LIMIT)
        assert info["status"] == "completed", info
        with mappedram.open_file(z) as mf:
            present = sum(b.pages_present for b in mf.blocks)
        if not postcopy:
            assert report.pages_sent == present, report
        _assert_ram(ram, qemu_pattern())
    assert z.read_bytes() == before, "serve changed the file"


def test_serve_a_sealed_compressed_file_checks_the_seal(tmp_path: Path) -> None:
    src = _qemu_file(tmp_path, MAPPED_RAM)
    z = tmp_path / "z.mig"
    ops.compress(src, z, compression=CompressOptions(frame_bytes=1 << 20), options=OPTS, seal=ops.SealOptions())
    with destination(tmp_path / "dst.ram", tmp_path) as (vm, to):
        report = ops.serve(z, to, options=ServeOptions(timeout=LIMIT))
        assert report.ok and report.seal == "ok", report
        assert vm.wait_migration(LIMIT)["status"] == "completed"
        _assert_ram(tmp_path / "dst.ram", qemu_pattern())

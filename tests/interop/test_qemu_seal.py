"""QEMU loads sealed files: one ``mappedram save --seal`` wrote, and QEMU's own files sealed
in place by ``mappedram seal``; the destination's RAM equals the source's byte for byte.
QEMU reads the trailer and discards it; analyze-migration.py's way of finding the JSON
(the last NUL byte, then the first brace) still finds it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import mappedram
from tests.helpers.qemu_cases import (
    LEGACY,
    MAPPED_RAM,
    MULTIFD4,
    Variant,
    qemu_destination,
    qemu_load,
    qemu_pattern,
    qemu_save,
    resolved_machine,
    write_src_ram,
)
from tests.helpers.qemu_harness import BACKEND_ID, first_mismatch, require_qemu

pytestmark = pytest.mark.qemu


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, f"mappedram {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _analyze_migration_finds_the_seal(path: Path) -> None:
    """scripts/analyze-migration.py read_migration_debug_json, on the last 10 MiB of the file."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(-f.tell(), -10 * 1024 * 1024), os.SEEK_END)
        data = f.read()
    jsonpos = data.find(b"{", data.rfind(b"\0"))
    assert data[jsonpos - 5] == 0x06, "No Debug Migration device found"
    (length,) = struct.unpack(">I", data[jsonpos - 4 : jsonpos])
    desc = json.loads(data[jsonpos : jsonpos + length].decode("utf-8"))
    assert desc["mappedram"]["seal"]["version"] == 1 and "configuration" in desc


def test_qemu_loads_a_file_saved_with_seal(tmp_path: Path) -> None:
    qemu_binary = require_qemu()
    src_ram = write_src_ram(tmp_path)
    out = tmp_path / "ours.mig"
    with qemu_destination(qemu_binary, "q35", tmp_path) as vm:
        machine_type = resolved_machine(vm)
        _run("save", "--block", f"{BACKEND_ID}={src_ram}", "-o", os.fspath(out), "--machine", machine_type,
             "--seal", "--quiet")  # fmt: skip
        with mappedram.open_file(out) as mf:
            assert mf.seal is not None and not mf.seal.keyed
        _run("verify", os.fspath(out), "--data", "--quiet")
        _analyze_migration_finds_the_seal(out)
        qemu_load(vm, out, MULTIFD4)
    mismatch = first_mismatch((tmp_path / "dst.ram").read_bytes(), src_ram.read_bytes())
    assert mismatch is None, f"a sealed save loaded into QEMU: destination RAM differs: {mismatch}"


@pytest.mark.parametrize("variant", [MAPPED_RAM, LEGACY], ids=lambda v: v.name)
def test_qemu_loads_its_own_file_sealed_in_place(tmp_path: Path, variant: Variant) -> None:
    qemu_binary = require_qemu()
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    qemu_file = tmp_path / "qemu.mig"
    qemu_save(qemu_binary, "pc", src_ram, qemu_file, variant)
    with mappedram.open_file(qemu_file) as mf:
        assert mf.vmdesc is not None and mf.seal is None
        at, device_state = mf.vmdesc.offset, mf.device_state()
    before = qemu_file.read_bytes()[:at]
    key = tmp_path / "seal.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    _run("seal", os.fspath(qemu_file), "--key", os.fspath(key), "--quiet")
    assert qemu_file.read_bytes()[:at] == before, "sealing in place changed more than the trailer"
    with mappedram.open_file(qemu_file) as mf:
        assert mf.seal is not None and mf.seal.keyed and mf.device_state() == device_state
    _run("verify", os.fspath(qemu_file), "--data", "--key", os.fspath(key), "--quiet")
    _analyze_migration_finds_the_seal(qemu_file)
    with qemu_destination(qemu_binary, "pc", tmp_path) as vm:
        qemu_load(vm, qemu_file, variant)
    mismatch = first_mismatch((tmp_path / "dst.ram").read_bytes(), pattern)
    assert mismatch is None, f"QEMU's {variant.name} file sealed by mappedram: destination RAM differs: {mismatch}"

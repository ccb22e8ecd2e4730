"""Interop with a live QEMU: read files QEMU saves, and load them back into QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

import mappedram
from tests.helpers.qemu_cases import (
    MACHINE_PREFIX,
    MAPPED_RAM,
    PREFILL,
    RAM_MIB,
    VARIANTS,
    Variant,
    nonzero_pages,
    qemu_pattern,
    qemu_save,
    write_src_ram,
)
from tests.helpers.qemu_harness import (
    BACKEND_ID,
    QemuError,
    QemuVM,
    file_uri,
    first_mismatch,
    require_qemu,
)

pytestmark = pytest.mark.qemu

MACHINES = ("pc", "q35")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("machine", MACHINES)
def test_read_qemu_saved_file(tmp_path: Path, machine: str, variant: Variant) -> None:
    qemu_binary = require_qemu()
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    qemu_save(qemu_binary, machine, src_ram, out, variant)
    offset = variant.offset or 0
    if variant.offset is not None:
        head = out.read_bytes()[: offset + 4]
        assert head[:offset] == PREFILL[:offset], "bytes before offset= were not preserved"
        assert head[offset:] == b"QEVM"

    with mappedram.open_file(out, offset) as f:
        assert f.mapped_ram is variant.mapped_ram
        assert f.machine_type is not None and f.machine_type.startswith(MACHINE_PREFIX[machine]), f.machine_type
        block = f.block(BACKEND_ID)
        assert block.used_length == RAM_MIB << 20
        assert block.pages_present == nonzero_pages(pattern), "pages present != non-zero pages of the pattern"
        got = f.read_pages(block, 0, block.num_pages)
    mismatch = first_mismatch(got, pattern)
    assert mismatch is None, f"{variant.name} on {machine}: RAM read from the file differs: {mismatch}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_loads_what_it_saved(tmp_path: Path, machine: str, variant: Variant) -> None:
    qemu_binary = require_qemu()
    src_ram = write_src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    qemu_save(qemu_binary, machine, src_ram, out, variant)
    dst_ram = tmp_path / "dst.ram"
    with QemuVM(dst_ram, machine=machine, ram_mib=RAM_MIB, binary=qemu_binary, incoming=True) as vm:
        info = vm.load(file_uri(out, variant.offset), variant.capabilities, variant.parameters)
        assert info["status"] == "completed"
        assert any(e["event"] == "MIGRATION" and e["data"]["status"] == "completed" for e in vm.events)
        status = vm.cmd("query-status")
        assert status["status"] != "running", status
    mismatch = first_mismatch(dst_ram.read_bytes(), src_ram.read_bytes())
    assert mismatch is None, f"{variant.name} on {machine}: destination RAM differs from the source: {mismatch}"


def test_load_failure_reports_qemu_error(tmp_path: Path) -> None:
    qemu_binary = require_qemu()
    src_ram = write_src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    qemu_save(qemu_binary, "q35", src_ram, out, MAPPED_RAM)
    with QemuVM(tmp_path / "dst.ram", machine="q35", ram_mib=RAM_MIB, binary=qemu_binary, incoming=True) as vm:
        with pytest.raises(QemuError) as failure:
            vm.load(file_uri(out), {}, {})
        assert vm.returncode is None, "QEMU exited although exit-on-error is false"
    assert "Capability mapped-ram is off, but received capability is on" in failure.value.message

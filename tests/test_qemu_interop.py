"""Interop with a live QEMU: read files QEMU saves, and load them back into QEMU."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

if os.fspath(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, os.fspath(Path(__file__).parent))

import mappedram
from qemu_harness import (
    BACKEND_ID,
    PAGE_SIZE,
    QemuError,
    QemuVM,
    file_uri,
    first_mismatch,
    o_direct_supported,
    pattern_ram,
    require_qemu,
)

pytestmark = pytest.mark.qemu

RAM_MIB = 64
MACHINES = ("pc", "q35")
MACHINE_PREFIX = {"pc": "pc-i440fx-", "q35": "pc-q35-"}
#: Bytes before the stream in the offset variant; they must survive the save.
PREFILL = b"A" * 8000


@dataclass(frozen=True)
class Variant:
    name: str
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    offset: int | None = None

    @property
    def mapped_ram(self) -> bool:
        return self.capabilities.get("mapped-ram", False)

    @property
    def direct_io(self) -> bool:
        return bool(self.parameters.get("direct-io"))


MAPPED_RAM = Variant("mapped-ram", {"mapped-ram": True})
MULTIFD4 = Variant("multifd4", {"mapped-ram": True, "multifd": True}, {"multifd-channels": 4})
DIRECT_IO = Variant(
    "multifd4-direct-io", {"mapped-ram": True, "multifd": True}, {"multifd-channels": 4, "direct-io": True}
)
OFFSET = Variant("offset-0x1234", {"mapped-ram": True}, offset=0x1234)
LEGACY = Variant("legacy")
VARIANTS = [MAPPED_RAM, MULTIFD4, DIRECT_IO, OFFSET, LEGACY]


@functools.cache
def _pattern() -> npt.NDArray[np.uint8]:
    """The test-vector pattern plus zero pages with one non-zero byte (first, last, and inner bytes)."""
    ram = pattern_ram(RAM_MIB << 20)
    pages = ram.reshape(-1, PAGE_SIZE)
    zero = np.flatnonzero(~pages.any(axis=1))
    # Page 0 and the last page, plus some zero pages of the pattern, each get one byte.
    marks = {0: 0, len(pages) - 1: PAGE_SIZE - 1}
    for k, byte in zip(zero[10:16], (0, 1, PAGE_SIZE - 1, PAGE_SIZE - 2, PAGE_SIZE // 2, 7), strict=True):
        marks[int(k)] = byte
    for page, byte in marks.items():
        pages[page] = 0
        pages[page, byte] = 0x5A
    ram.flags.writeable = False
    return ram


def _src_ram(tmp_path: Path) -> Path:
    path = tmp_path / "src.ram"
    _pattern().tofile(path)
    return path


def _nonzero_pages(ram: npt.NDArray[np.uint8]) -> int:
    return int(np.count_nonzero(ram.reshape(-1, PAGE_SIZE).any(axis=1)))


def _save(qemu_binary: str, machine: str, ram: Path, out: Path, variant: Variant) -> None:
    if variant.direct_io and not o_direct_supported(out.parent):
        pytest.skip(f"the filesystem of {out.parent} refuses O_DIRECT")
    if variant.offset is not None:
        out.write_bytes(PREFILL)
    with QemuVM(ram, machine=machine, ram_mib=RAM_MIB, binary=qemu_binary, name="src") as vm:
        vm.save(file_uri(out, variant.offset), variant.capabilities, variant.parameters)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("machine", MACHINES)
def test_read_qemu_saved_file(tmp_path: Path, machine: str, variant: Variant) -> None:
    qemu_binary = require_qemu()
    pattern, src_ram = _pattern(), _src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    _save(qemu_binary, machine, src_ram, out, variant)
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
        assert block.pages_present == _nonzero_pages(pattern), "pages present != non-zero pages of the pattern"
        got = f.read_pages(block, 0, block.num_pages)
    mismatch = first_mismatch(got, pattern)
    assert mismatch is None, f"{variant.name} on {machine}: RAM read from the file differs: {mismatch}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_loads_what_it_saved(tmp_path: Path, machine: str, variant: Variant) -> None:
    qemu_binary = require_qemu()
    src_ram = _src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    _save(qemu_binary, machine, src_ram, out, variant)
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
    src_ram = _src_ram(tmp_path)
    out = tmp_path / "vm.mig"
    _save(qemu_binary, "q35", src_ram, out, MAPPED_RAM)
    with QemuVM(tmp_path / "dst.ram", machine="q35", ram_mib=RAM_MIB, binary=qemu_binary, incoming=True) as vm:
        with pytest.raises(QemuError) as failure:
            vm.load(file_uri(out), {}, {})
        assert vm.returncode is None, "QEMU exited although exit-on-error is false"
    assert "Capability mapped-ram is off, but received capability is on" in failure.value.message

"""The QEMU cases shared by the interop tests and the live-save tests: the variants QEMU
saves with, the RAM pattern, and the QEMU steps (save, load into a fresh destination)."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import mappedram
from mappedram.ops import verify

from .qemu_harness import PAGE_SIZE, QemuVM, file_uri, o_direct_supported, pattern_ram, require_qemu

RAM_MIB = 64
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
def qemu_pattern() -> npt.NDArray[np.uint8]:
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


def write_src_ram(tmp_path: Path) -> Path:
    path = tmp_path / "src.ram"
    qemu_pattern().tofile(path)
    return path


def nonzero_pages(ram: npt.NDArray[np.uint8]) -> int:
    return int(np.count_nonzero(ram.reshape(-1, PAGE_SIZE).any(axis=1)))


def qemu_save(qemu_binary: str, machine: str, ram: Path, out: Path, variant: Variant) -> None:
    if variant.direct_io and not o_direct_supported(out.parent):
        pytest.skip(f"the filesystem of {out.parent} refuses O_DIRECT")
    if variant.offset is not None:
        out.write_bytes(PREFILL)
    with QemuVM(ram, machine=machine, ram_mib=RAM_MIB, binary=qemu_binary, name="src") as vm:
        vm.save(file_uri(out, variant.offset), variant.capabilities, variant.parameters)


def needs_o_direct(directory: Path) -> None:
    if not o_direct_supported(directory):
        pytest.skip(f"the filesystem of {directory} refuses O_DIRECT")


@contextlib.contextmanager
def qemu_destination(qemu_binary: str, machine: str, tmp_path: Path) -> Iterator[QemuVM]:
    """A fresh incoming guest (all-zero RAM in ``tmp_path/dst.ram``)."""
    with QemuVM(tmp_path / "dst.ram", machine=machine, ram_mib=RAM_MIB, binary=qemu_binary, incoming=True) as vm:
        yield vm


def resolved_machine(vm: QemuVM) -> str:
    """The versioned machine type ``vm`` runs, as QEMU names it in a migration file."""
    for m in vm.cmd("query-machines"):
        if vm.machine in (m["name"], m.get("alias")):
            name: str = m["name"]
            return name
    raise AssertionError(f"query-machines does not list {vm.machine!r}")


def qemu_load(vm: QemuVM, path: Path, load: Variant, offset: int | None = None) -> None:
    """Load ``path`` into the incoming ``vm`` with the capabilities/parameters of ``load``."""
    if load.direct_io:
        needs_o_direct(path.parent)
    info = vm.load(file_uri(path, offset), load.capabilities, load.parameters)
    assert info["status"] == "completed", info
    status = vm.cmd("query-status")
    assert status["status"] != "running", status


@functools.cache
def qemu_trailer(machine: str, mapped_ram: bool) -> dict[str, Any]:
    """The vmdesc trailer QEMU itself writes for ``machine`` with mapped-ram on or off
    (a fresh save of a small guest, once per session): the oracle for ours."""
    binary = require_qemu()
    with tempfile.TemporaryDirectory(prefix="mappedram-trailer-") as tmp:
        out = Path(tmp) / "qemu.mig"
        qemu_save(binary, machine, write_src_ram(Path(tmp)), out, MAPPED_RAM if mapped_ram else LEGACY)
        with mappedram.open_file(out) as mf:
            assert mf.vmdesc is not None, "QEMU wrote no vmdesc trailer"
            return dict(mf.vmdesc.data)


def assert_trailer_like_qemu(path: Path, machine: str) -> None:
    """``path``'s trailer describes its stream as QEMU's own would: the configuration entry
    equals the one QEMU writes for that machine and format, key order and all; the trailer
    opens with it, as QEMU's does; and verify (which walks every section with the
    trailer, as QEMU's analyze-migration.py does) finds nothing wrong."""
    with mappedram.open_file(path) as mf:
        assert mf.vmdesc is not None, f"{path}: no vmdesc trailer"
        ours = mf.vmdesc.data
        mapped = mf.mapped_ram
    qemu = qemu_trailer(machine, mapped)
    assert list(ours)[:2] == list(qemu)[:2] == ["configuration", "page_size"], (list(ours), list(qemu))
    assert ours["configuration"] == qemu["configuration"], (
        f"{path}: configuration entry differs from QEMU's ({'mapped-ram' if mapped else 'legacy'}, {machine}):\n"
        f"ours: {ours['configuration']}\nQEMU: {qemu['configuration']}"
    )
    assert ours["page_size"] == qemu["page_size"]
    report = verify(path)
    assert report.ok, report.problems

"""Interop with a live QEMU, the other way round: QEMU loads the files this project writes.

Rewrites of QEMU's own files (legacy and mapped-ram, 1 channel or 4 with O_DIRECT) and
saves from raw RAM buffers (API and CLI) must load into a fresh guest of the same
machine, whose RAM then equals the source's byte for byte.

A file from :func:`mappedram.ops.writer` without ``device_state`` lists only the
``m0`` block and no device sections; QEMU 10.0 loads it (the other RAM blocks, ROMs,
keep what the destination loaded at start-up; the devices keep their reset state).
It must name the destination's versioned machine type ("pc-q35-10.0", never the alias
"q35"): QEMU compares the names and refuses any other.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.ops import EngineOptions
from tests.helpers.qemu_cases import (
    DIRECT_IO,
    LEGACY,
    MACHINE_PREFIX,
    MAPPED_RAM,
    MULTIFD4,
    OFFSET,
    PREFILL,
    RAM_MIB,
    Variant,
    assert_trailer_like_qemu,
    needs_o_direct,
    nonzero_pages,
    qemu_destination,
    qemu_load,
    qemu_pattern,
    qemu_save,
    resolved_machine,
    write_src_ram,
)
from tests.helpers.qemu_harness import (
    BACKEND_ID,
    QemuError,
    first_mismatch,
    require_qemu,
)
from tests.helpers.streams import as_qemu_writes_it

pytestmark = pytest.mark.qemu

MACHINES = ("q35", "pc")


# -- helpers ---------------------------------------------------------------------------


def _assert_dst_ram(tmp_path: Path, expected: object, what: str) -> None:
    mismatch = first_mismatch((tmp_path / "dst.ram").read_bytes(), expected)
    assert mismatch is None, f"{what}: destination RAM differs from the source: {mismatch}"


def _file_difference(actual: bytes, expected: bytes) -> str | None:
    """None if equal, else the sizes and the first differing byte offset."""
    if actual == expected:
        return None
    n = min(len(actual), len(expected))
    diff = np.flatnonzero(np.frombuffer(actual, np.uint8, n) != np.frombuffer(expected, np.uint8, n))
    at = int(diff[0]) if len(diff) else n
    return f"sizes {len(actual)} vs {len(expected)} (QEMU), first difference at byte {at:#x}"


def _qemu_machine_type(path: Path, offset: int = 0) -> str:
    with mappedram.open_file(path, offset) as f:
        assert f.machine_type is not None
        return f.machine_type


# -- 1. rewrites of QEMU's files --------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    name: str
    channels: int
    direct_io: bool = False


ONE_CHANNEL = Rewrite("1ch", 1)
FOUR_DIRECT = Rewrite("4ch-direct-io", 4, direct_io=True)

#: (QEMU's save, our rewrite, the destination's load): every load configuration is used.
REWRITE_CASES = [
    pytest.param(LEGACY, ONE_CHANNEL, MAPPED_RAM, id="legacy-1ch-load-mapped-ram"),
    pytest.param(LEGACY, FOUR_DIRECT, MULTIFD4, id="legacy-4ch-direct-io-load-multifd4"),
    pytest.param(MULTIFD4, ONE_CHANNEL, MULTIFD4, id="multifd4-1ch-load-multifd4"),
    pytest.param(MULTIFD4, FOUR_DIRECT, DIRECT_IO, id="multifd4-4ch-direct-io-load-multifd4-direct-io"),
]


@pytest.mark.parametrize(("source", "how", "load"), REWRITE_CASES)
@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_loads_rewritten_file(tmp_path: Path, machine: str, source: Variant, how: Rewrite, load: Variant) -> None:
    qemu_binary = require_qemu()
    if how.direct_io:
        needs_o_direct(tmp_path)
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    qemu_file, ours = tmp_path / "qemu.mig", tmp_path / "ours.mig"
    qemu_save(qemu_binary, machine, src_ram, qemu_file, source)

    report = ops.rewrite(qemu_file, ours, options=EngineOptions(channels=how.channels, direct_io=how.direct_io))
    assert report.channels == how.channels and report.direct_io is how.direct_io, report
    with mappedram.open_file(qemu_file) as q, mappedram.open_file(ours) as f:
        assert f.mapped_ram and f.machine_type == q.machine_type, (f.format_name, f.machine_type, q.machine_type)
        assert [b.idstr for b in f.blocks] == [b.idstr for b in q.blocks]
        assert f.block(BACKEND_ID).pages_present == nonzero_pages(pattern)
        assert f.device_state() == q.device_state()
    assert_trailer_like_qemu(ours, machine)

    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        qemu_load(vm, ours, load)
    _assert_dst_ram(tmp_path, pattern, f"{source.name} rewritten ({how.name}) on {machine}, loaded as {load.name}")


@pytest.mark.parametrize("source", [MAPPED_RAM, MULTIFD4, OFFSET], ids=lambda v: v.name)
@pytest.mark.parametrize("machine", MACHINES)
def test_rewrite_of_qemu_mapped_ram_file_is_identical(tmp_path: Path, machine: str, source: Variant) -> None:
    """1 channel re-lays QEMU's mapped-ram file byte for byte (in place at QEMU's offset for OFFSET)."""
    qemu_binary = require_qemu()
    qemu_file, ours = tmp_path / "qemu.mig", tmp_path / "ours.mig"
    qemu_save(qemu_binary, machine, write_src_ram(tmp_path), qemu_file, source)
    if source.offset is not None:
        ours.write_bytes(PREFILL)
    ops.rewrite(qemu_file, ours, source_offset=source.offset or 0, offset=source.offset, options=EngineOptions(channels=1))
    difference = _file_difference(as_qemu_writes_it(ours.read_bytes()), qemu_file.read_bytes())
    assert difference is None, f"rewrite of QEMU's {source.name} file on {machine} is not identical: {difference}"


# -- 2. saves from raw buffers ---------------------------------------------------------


@dataclass(frozen=True)
class BufferSave:
    name: str
    buffer: str  # "numpy" (the pattern array, not page-aligned) or "mmap" (of the source RAM file)
    channels: int = 4
    direct_io: bool = False
    offset: int | None = None
    load: Variant = MAPPED_RAM


BUFFER_SAVES = [
    pytest.param("q35", BufferSave("numpy-4ch", "numpy"), id="q35-numpy-4ch"),
    pytest.param("pc", BufferSave("numpy-4ch", "numpy", load=MULTIFD4), id="pc-numpy-4ch-load-multifd4"),
    pytest.param(
        "q35", BufferSave("mmap-4ch-direct-io", "mmap", direct_io=True, load=DIRECT_IO), id="q35-mmap-4ch-direct-io"
    ),
    pytest.param("pc", BufferSave("numpy-4ch-direct-io", "numpy", direct_io=True), id="pc-unaligned-4ch-direct-io"),
    pytest.param("q35", BufferSave("offset", "mmap", offset=OFFSET.offset), id="q35-mmap-4ch-offset"),
]


@contextlib.contextmanager
def _buffer(kind: str, src_ram: Path) -> Iterator[object]:
    if kind == "numpy":
        yield qemu_pattern()
        return
    with open(src_ram, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        yield m


@pytest.mark.parametrize(("machine", "case"), BUFFER_SAVES)
def test_qemu_loads_save_from_buffer(tmp_path: Path, machine: str, case: BufferSave) -> None:
    """A file with only the ``m0`` block and no device sections loads into a fresh guest."""
    qemu_binary = require_qemu()
    if case.direct_io:
        needs_o_direct(tmp_path)
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    out = tmp_path / "ours.mig"
    if case.offset is not None:
        out.write_bytes(PREFILL)
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        machine_type = resolved_machine(vm)
        assert machine_type.startswith(MACHINE_PREFIX[machine]), machine_type
        with _buffer(case.buffer, src_ram) as buf:
            report = ops.save(out, {BACKEND_ID: buf}, machine_type=machine_type, offset=case.offset, options=EngineOptions(channels=case.channels, direct_io=case.direct_io))
        assert report.direct_io is case.direct_io and report.machine_type == machine_type, report
        assert report.ram_bytes == RAM_MIB << 20 and report.pages_written == nonzero_pages(pattern), report
        if case.offset is not None:
            assert out.read_bytes()[: case.offset] == PREFILL[: case.offset], "bytes before offset= were not kept"
        with mappedram.open_file(out, case.offset or 0) as f:
            assert [b.idstr for b in f.blocks] == [BACKEND_ID] and f.device_sections == [], f.device_sections
        if case.offset is None:
            assert_trailer_like_qemu(out, machine)
        qemu_load(vm, out, case.load, case.offset)
    _assert_dst_ram(tmp_path, pattern, f"save ({case.name}) on {machine}, loaded as {case.load.name}")


@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_loads_save_with_qemu_device_state(tmp_path: Path, machine: str) -> None:
    """The device sections and vmdesc of a QEMU file of the same machine, with our ``m0`` block."""
    qemu_binary = require_qemu()
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    qemu_file, out = tmp_path / "qemu.mig", tmp_path / "ours.mig"
    qemu_save(qemu_binary, machine, src_ram, qemu_file, MAPPED_RAM)
    with mappedram.open_file(qemu_file) as q:
        assert q.machine_type is not None and q.vmdesc is not None and q.device_sections
        machine_type, device_state, vmdesc = q.machine_type, q.device_state(), q.vmdesc.raw
        section_id = q.ram_section_id
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        assert resolved_machine(vm) == machine_type
        ops.save(
            out,
            {BACKEND_ID: pattern},
            machine_type=machine_type,
            device_state=device_state,
            vmdesc=vmdesc,
            ram_section_id=section_id,
        )
        assert_trailer_like_qemu(out, machine)
        qemu_load(vm, out, MULTIFD4)
    _assert_dst_ram(tmp_path, pattern, f"save with QEMU's device state on {machine}")


@pytest.mark.parametrize("machine", ["q35", "pc-i440fx-9.2"])
def test_save_of_all_blocks_matches_qemu_file(tmp_path: Path, machine: str) -> None:
    """save() of every block of a QEMU mapped-ram file, with its device state, gives QEMU's bytes.

    A 10.0 machine type gets MIG_CMD_SWITCHOVER_START, a 9.2 one must not. QEMU writes
    one RAM PART section per save iteration (one or more, by timing); save() writes
    one, so QEMU's extra PART sections (all identical) are dropped before comparing.
    """
    qemu_binary = require_qemu((9, 2, 0) if machine.endswith("9.2") else (9, 0, 0))
    qemu_file, out = tmp_path / "qemu.mig", tmp_path / "ours.mig"
    qemu_save(qemu_binary, machine, write_src_ram(tmp_path), qemu_file, MAPPED_RAM)
    with mappedram.open_file(qemu_file) as q:
        assert q.machine_type is not None and q.vmdesc is not None
        blocks = [(b.idstr, q.read_pages(b, 0, b.num_pages)) for b in q.blocks]
        ops.save(out, blocks, machine_type=q.machine_type, device_state=q.device_state(), vmdesc=q.vmdesc.raw, ram_section_id=q.ram_section_id, options=EngineOptions(channels=4))
        sections = q.sections
    data = qemu_file.read_bytes()
    parts = [i for i, s in enumerate(sections) if s.kind == "PART"]
    assert parts and parts == list(range(parts[0], parts[-1] + 1)), [s.kind for s in sections]
    chunks = {data[sections[i].offset : sections[i + 1].offset] for i in parts}
    assert len(chunks) == 1, f"QEMU's PART sections differ: {chunks}"
    expected = data[: sections[parts[0]].offset] + data[sections[parts[-1]].offset :]
    difference = _file_difference(as_qemu_writes_it(out.read_bytes()), expected)
    assert difference is None, f"save() of QEMU's {machine} file (blocks + device state): {difference}"


@pytest.mark.parametrize(
    ("saved_as", "machine"),
    [("older-version", "q35"), ("pc-q35", "pc")],
    ids=["q35-9.2-into-q35-10.0", "q35-type-into-pc"],
)
def test_qemu_refuses_other_machine_type(tmp_path: Path, saved_as: str, machine: str) -> None:
    qemu_binary = require_qemu()
    out = tmp_path / "ours.mig"
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        local = resolved_machine(vm)
        named = "pc-q35-9.2" if saved_as == "older-version" else ops.DEFAULT_MACHINE
        ops.save(out, {BACKEND_ID: qemu_pattern()}, machine_type=named)
        with pytest.raises(QemuError) as failure:
            qemu_load(vm, out, MAPPED_RAM)
        assert vm.returncode is None, "QEMU exited although exit-on-error is false"
    assert f"Machine type received is '{named}' and local is '{local}'" in failure.value.message


# -- 3. the command line ---------------------------------------------------------------


def test_qemu_loads_cli_save(tmp_path: Path) -> None:
    """``mappedram save --machine`` (not the q35 default: the guest is pc) into a file QEMU loads."""
    qemu_binary = require_qemu()
    src_ram = write_src_ram(tmp_path)
    out = tmp_path / "ours.mig"
    with qemu_destination(qemu_binary, "pc", tmp_path) as vm:
        machine_type = resolved_machine(vm)
        args = ["save", "--block", f"{BACKEND_ID}={src_ram}", "-o", os.fspath(out), "--machine", machine_type]
        proc = subprocess.run(
            [sys.executable, "-m", "mappedram", *args, "--channels", "4", "--quiet"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        assert proc.returncode == 0, f"mappedram save failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        assert _qemu_machine_type(out) == machine_type
        assert_trailer_like_qemu(out, "pc")
        qemu_load(vm, out, MULTIFD4)
    _assert_dst_ram(tmp_path, src_ram.read_bytes(), "CLI save on pc")


# -- 4. conversions ---------------------------------------------------------------------


@pytest.mark.parametrize(("source", "to", "load"), [
    pytest.param(MULTIFD4, "legacy", LEGACY, id="mapped-ram-to-legacy"),
    pytest.param(LEGACY, "mapped-ram", MAPPED_RAM, id="legacy-to-mapped-ram"),
])  # fmt: skip
@pytest.mark.parametrize("machine", MACHINES)
def test_qemu_loads_converted_file(tmp_path: Path, machine: str, source: Variant, to: str, load: Variant) -> None:
    """`convert` both ways keeps the device state; QEMU loads the result with mapped-ram off/on."""
    qemu_binary = require_qemu()
    pattern, src_ram = qemu_pattern(), write_src_ram(tmp_path)
    qemu_file, ours = tmp_path / "qemu.mig", tmp_path / "ours.mig"
    qemu_save(qemu_binary, machine, src_ram, qemu_file, source)
    args = ["convert", os.fspath(qemu_file), os.fspath(ours), "--to", to, "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with mappedram.open_file(qemu_file) as q, mappedram.open_file(ours) as f:
        assert f.format_name == to and f.device_state() == q.device_state()
    assert_trailer_like_qemu(ours, machine)
    diff = subprocess.run([sys.executable, "-m", "mappedram", "diff", os.fspath(qemu_file), os.fspath(ours)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert diff.returncode == 0, diff.stdout + diff.stderr
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        qemu_load(vm, ours, load)
    _assert_dst_ram(tmp_path, pattern, f"{source.name} converted to {to} on {machine}")

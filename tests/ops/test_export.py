"""Guest-physical export against QEMU's own ``dump-guest-memory`` of the same stopped guest.

Three kinds of guests, on ``pc`` and ``q35``:

* small (64 MiB, 2 vCPUs, TCG) running tests/data/bios/exportbios.S: it programs the host
  bridge (PAM modes, and on q35 SMRAM, TSEG and SMBASE) and halts in long mode with known
  registers, so the map, the EM_X86_64 notes and both CPUs' notes are exercised;
* large (pc 4 GiB: split at 3 GiB; q35 3 GiB: split at 2 GiB), QEMU's default firmware,
  paused at reset (never run): RAM above 4 GiB, the reset PAM state, EM_386 notes;
* with QEMU's default devices (VGA, a NIC; no -nodefaults), 64 MiB: SeaBIOS run until it
  has mapped the VGA's BAR0 and its VGA BIOS has written the text screen (both polled over
  QMP), so vga.vram shows behind BAR0; never run (on q35 also without SMM, where RAM shows
  in the VGA window); and BARs programmed through the PCI configuration ports from the
  monitor (0xcf8/0xcfc), for the ROM BAR, a disabled device and invalid or covered BARs
  (these are saved with mapped-ram only).

QEMU dumps the guest, then saves it (mapped-ram); a second QEMU of the same guest saves it
in the legacy format. Our ELF export of either file must equal QEMU's dump byte for byte,
except e_ehsize (QEMU writes 8, the size of a pointer); the raw export must hold the dump's
bytes at each guest-physical address. The guests' RAM files are sparse, with pattern pages
in every region (and in regions that must not show, such as TSEG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.format.elf import ELF64_PHDR, PT_LOAD, Elf64Ehdr, Elf64Phdr, plan_core
from mappedram.format.x86cpu import R_CS, decode_cpu_section
from mappedram.format.x86map import (
    FAMILY_I440FX,
    FAMILY_Q35,
    GuestPhysBlock,
    guest_phys_blocks,
    host_bridge_reset,
    machine_family,
    ram_split,
)
from mappedram.ops import EngineOptions
from mappedram.ops.guestphys import guest_memory_map, section_bodies
from tests.helpers import DATA as TEST_DATA
from tests.helpers.qemu_harness import PAGE_SIZE, QemuVM, file_uri, kvm_usable, require_qemu

GIB = 1 << 30
MIB = 1 << 20
BIOS_BLOB = TEST_DATA / "bios" / "exportbios.bin"
BIOS_SIZE = 256 << 10
#: Where exportbios.S halts: RIP after its HLT, and the values it loads.
HALT_RIP = 0xFFFFF2DC
E_EHSIZE = slice(52, 54)


# -- unit tests: the map and the ELF layout --------------------------------------------


@pytest.mark.parametrize(
    ("machine", "ram", "limit", "below", "above"),
    [
        ("pc-i440fx-10.0", 4 * GIB, None, 3 * GIB, 1 * GIB),  # gigabyte_align
        ("pc-i440fx-10.0", 3584 * MIB, None, 3 * GIB, 512 * MIB),
        ("pc-i440fx-10.0", 3 * GIB, None, 3 * GIB, 0),
        ("pc-1.7", 4 * GIB, None, 3584 * MIB, 512 * MIB),  # pc-1.7: no gigabyte alignment
        ("pc-i440fx-10.0", 4 * GIB, 2 * GIB, 2 * GIB, 2 * GIB),  # max-ram-below-4g=2G
        ("pc-i440fx-10.0", 3968 * MIB, 4 * GIB, 3968 * MIB, 0),  # max-ram-below-4g=4G
        ("pc-q35-10.0", 3 * GIB, None, 2 * GIB, 1 * GIB),
        ("pc-q35-10.0", 2816 * MIB, None, 2 * GIB, 768 * MIB),  # >= 0xb0000000
        ("pc-q35-10.0", 2560 * MIB, None, 2560 * MIB, 0),
        ("pc-q35-10.0", 3 * GIB, 1 * GIB, 1 * GIB, 2 * GIB),
    ],
)
def test_ram_split(machine: str, ram: int, limit: int | None, below: int, above: int) -> None:
    # the examples of pc_init1's comment, and pc_q35_init's 0xb0000000 rule
    split = ram_split(machine_family(machine), machine, ram, limit)
    assert (split.below_4g_mem_size, split.above_4g_mem_size) == (below, above)


def test_reset_map_is_qemu_flat_view() -> None:
    # `info mtree -f` of a paused pc/q35 guest (-nodefaults, 64 MiB, bios-256k.bin)
    for family in (FAMILY_I440FX, FAMILY_Q35):
        split = ram_split(family, None, 64 * MIB)
        got = guest_phys_blocks(family, split, "m0", bridge=host_bridge_reset(family), bios=("pc.bios", 0x40000),
                                option_rom=("pc.rom", 0x20000), vga=False)  # fmt: skip
        assert got == [
            GuestPhysBlock(0, 0xC0000, "m0", 0),
            GuestPhysBlock(0xC0000, 0xE0000, "pc.rom", 0),
            GuestPhysBlock(0xE0000, 0x100000, "pc.bios", 0x20000),
            GuestPhysBlock(0x100000, 64 * MIB, "m0", 0x100000),
            GuestPhysBlock(0xFFFC0000, 4 * GIB, "pc.bios", 0),
        ], family


def test_vga_window_and_ram_above_4g() -> None:
    split = ram_split(FAMILY_I440FX, "pc-i440fx-10.0", 4 * GIB)
    bridge = host_bridge_reset(FAMILY_I440FX)
    got = guest_phys_blocks(FAMILY_I440FX, split, "pc.ram", bridge=bridge, bios=("pc.bios", 0x20000),
                            option_rom=None, vga=True)  # fmt: skip
    assert got == [
        GuestPhysBlock(0, 0xA0000, "pc.ram", 0),  # then vga-lowmem (I/O) behind smram-region
        GuestPhysBlock(0xC0000, 0xE0000, "pc.ram", 0xC0000),  # PAM to PCI, nothing there (no pc.rom): RAM
        GuestPhysBlock(0xE0000, 0x100000, "pc.bios", 0),  # a 128 KiB BIOS is all isa-bios
        GuestPhysBlock(0x100000, 3 * GIB, "pc.ram", 0x100000),
        GuestPhysBlock(4 * GIB - 0x20000, 4 * GIB, "pc.bios", 0),
        GuestPhysBlock(4 * GIB, 5 * GIB, "pc.ram", 3 * GIB),
    ]


def test_plan_core_layout() -> None:
    plan = plan_core([(0, 0x2000), (0x100000, 0x1000)], b"\1" * 8, 62)
    ehdr = Elf64Ehdr.unpack(plan.head)
    assert (ehdr.e_phoff, ehdr.e_shoff, ehdr.e_phnum, ehdr.e_shnum, ehdr.e_ehsize) == (0xC0, 0x40, 3, 2, 64)
    assert plan.note_offset == 0xC0 + 3 * ELF64_PHDR.size and plan.memory_offset == plan.note_offset + 8
    loads = [Elf64Phdr.unpack(plan.head, 0xC0 + i * ELF64_PHDR.size) for i in (1, 2)]
    assert [(p.p_type, p.p_paddr, p.p_vaddr, p.p_offset, p.p_filesz) for p in loads] == [
        (PT_LOAD, 0, 0, plan.memory_offset, 0x2000),
        (PT_LOAD, 0x100000, 0x100000, plan.memory_offset + 0x2000, 0x1000),
    ]
    assert plan.tail_offset == plan.memory_offset + 0x3000 and plan.tail == b"\0.shstrtab\0"
    aligned = plan_core([(0, 0x2000), (0x100000, 0x1000)], b"\1" * 8, 62, data_alignment=PAGE_SIZE)
    assert aligned.memory_offset == PAGE_SIZE and aligned.tail_offset == PAGE_SIZE + 0x3000
    assert [s.file_offset for s in aligned.segments] == [PAGE_SIZE, PAGE_SIZE + 0x2000]
    assert [Elf64Phdr.unpack(aligned.head, 0xC0 + i * ELF64_PHDR.size).p_offset for i in (1, 2)] == [
        PAGE_SIZE, PAGE_SIZE + 0x2000,
    ]  # fmt: skip
    assert aligned.head[plan.memory_offset :] == bytes(PAGE_SIZE - plan.memory_offset)  # the padding: a hole
    with pytest.raises(ValueError, match="ascend"):
        plan_core([(0x1000, 0x1000), (0, 0x1000)], b"", 62)


def _small_file(tmp_path: Path, machine: str) -> tuple[Path, np.ndarray]:
    ram = np.zeros(2 * MIB, dtype=np.uint8)
    for page in (0, 7, 0xA0, 0xC4, 0x100, 0x1FF):
        ram[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = (page * 7 + 1) & 0xFF
    path = tmp_path / "small.mig"
    ops.save(path, {"pc.ram": ram}, machine_type=machine, options=EngineOptions(durable=False))
    return path, ram


def test_export_without_device_state_says_so(tmp_path: Path) -> None:
    path, ram = _small_file(tmp_path, "pc-i440fx-10.0")
    raw = tmp_path / "out.raw"
    report = ops.export(path, raw, format="raw")
    assert any("host bridge" in w for w in report.warnings)
    assert report.segments == [ops.ExportSegment(0, 2 * MIB, "pc.ram", 0, 0)]
    assert raw.read_bytes() == ram.tobytes()
    elf = tmp_path / "out.elf"
    report = ops.export(path, elf)
    assert report.cpus == 0 and report.e_machine == "EM_X86_64"
    assert any("no CPU notes" in w for w in report.warnings)
    seg = report.segments[0]
    with elf.open("rb") as f:
        f.seek(seg.file_offset)
        assert f.read(seg.size) == ram.tobytes()
    assert os.stat(elf).st_blocks * 512 < 64 * PAGE_SIZE  # zero pages are holes
    with pytest.raises(mappedram.UsageError, match="the output is the input file"):
        ops.export(path, path)
    with mappedram.open_file(path) as f:
        assert f.blocks[0].pages_present == 6


def test_cli_warns_about_an_unknown_machine(tmp_path: Path) -> None:
    path, _ = _small_file(tmp_path, "microvm")
    out = tmp_path / "out.elf"
    proc = subprocess.run([sys.executable, "-m", "mappedram", "export", str(path), "-o", str(out), "--output",
                           "json"], capture_output=True, text=True, check=True)  # fmt: skip
    assert "mappedram: warning: machine type 'microvm' is neither pc (i440FX) nor q35" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["machine_family"] == "unknown" and report["format"] == "elf"
    assert any("microvm" in w for w in report["warnings"])
    human = subprocess.run([sys.executable, "-m", "mappedram", "export", f"file:{path}", "-o", str(out),
                            "--format", "raw"], capture_output=True, text=True, check=True)  # fmt: skip
    assert "raw guest-physical image" in human.stdout and "warning" in human.stderr


def test_cpu_section_decodes_only_with_matching_sizes(vector) -> None:  # type: ignore[no-untyped-def]
    path, _ = vector("q35-64M-mapped-ram.mig")
    with mappedram.open_file(path) as f:
        [(index, body, fields)] = section_bodies(f, "cpu")
        cpu = decode_cpu_section(body, fields, index)
        # the vectors' CPU never ran: x86 reset state (x86_cpu_reset_hold)
        assert cpu.cpu_index == 0 and not cpu.lma and cpu.eip == 0xFFF0 and cpu.cr[0] == 0x60000010
        assert (cpu.segs[R_CS].selector, cpu.segs[R_CS].base, cpu.segs[R_CS].limit) == (0xF000, 0xFFFF0000, 0xFFFF)
        assert cpu.gdt.limit == cpu.idt.limit == 0xFFFF and cpu.eflags == 0x2
        bad = json.loads(json.dumps(fields))
        next(e for e in bad if e["name"] == "env.eflags")["size"] = 4
        with pytest.raises(mappedram.FormatError, match="do not match the section body"):
            decode_cpu_section(body, bad, index)


# -- QEMU's dump of the same guest -----------------------------------------------------


def _pattern_page(addr: int) -> bytes:
    words = np.full(PAGE_SIZE // 8, 0xA5A5_0000_0000_0000 | addr, dtype="<u8")
    words[1] = ~np.uint64(addr)
    return words.tobytes()


def _write_ram(path: Path, size: int, addrs: list[int]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for a in addrs:
            f.seek(a)
            f.write(_pattern_page(a))


def _bios_image(path: Path) -> Path:
    blob = BIOS_BLOB.read_bytes()
    filler = ((np.arange(BIOS_SIZE - len(blob), dtype=np.uint32) * 131 + 17) & 0xFF).astype(np.uint8)
    filler[filler == 0] = 0x5A
    path.write_bytes(filler.tobytes() + blob)
    return path


@dataclass(frozen=True)
class Guest:
    name: str
    machine: str
    ram_mib: int
    run: bool  # our firmware, run until halted; else QEMU's firmware, paused at reset

    @property
    def ram_size(self) -> int:
        return self.ram_mib << 20

    def addresses(self, below: int) -> list[int]:
        """RAM offsets of the pattern pages: every region, also those the guest map hides."""
        low = [0x0, 0x8000, 0x30000, 0x4F000, 0x9F000, 0xA0000, 0xBF000, 0xC0000, 0xC4000, 0xC8000, 0xCC000,
               0xD0000, 0xDC000, 0xE0000, 0xE4000, 0xEC000, 0xF0000, 0xFF000, 0x100000]  # fmt: skip
        top = [below - 0x101000, below - 0x100000, below - PAGE_SIZE, self.ram_size - PAGE_SIZE]
        high = [below, below + 0x123000] if below < self.ram_size else []
        return sorted({a for a in low + top + high if 0 <= a < self.ram_size})


SMALL = [Guest("pc-64M", "pc", 64, True), Guest("q35-64M", "q35", 64, True)]
LARGE = [Guest("pc-4G", "pc", 4096, False), Guest("q35-3G", "q35", 3072, False)]


@dataclass(frozen=True)
class Saved:
    guest: Guest
    dump: Path  # QEMU's dump-guest-memory
    mapped: Path  # QEMU's mapped-ram save of the same VM
    legacy: Path  # QEMU's legacy save of the same guest (second VM)
    work: Path


def _start(guest: Guest, work: Path, ram: Path, name: str) -> QemuVM:
    extra = ["-bios", os.fspath(_bios_image(work / "bios.img"))] if guest.run else []
    return QemuVM(ram, machine=guest.machine, ram_mib=guest.ram_mib, accel="tcg", workdir=work, name=name,
                  smp=2 if guest.run else 1, extra_args=extra, timeout=60)  # fmt: skip


def _save_guest(guest: Guest, work: Path, dump_dir: Path) -> Saved:
    require_qemu()
    ram = work / "guest.ram"
    family = machine_family("pc-q35-10.0" if guest.machine == "q35" else "pc-i440fx-10.0")
    below = ram_split(family, None, guest.ram_size).below_4g_mem_size
    _write_ram(ram, guest.ram_size, guest.addresses(below))
    saved = Saved(guest, dump_dir / f"{guest.name}.dump", work / "mapped.mig", work / "legacy.mig", work)
    with _start(guest, work, ram, "src") as vm:
        if guest.run:
            vm.run_until_halted()
        vm.dump_guest_memory(saved.dump)
        vm.save(file_uri(saved.mapped), {"mapped-ram": True}, timeout=300)
    with _start(guest, work, ram, "src2") as vm:
        if guest.run:
            vm.run_until_halted()
        vm.save(file_uri(saved.legacy), {}, timeout=300)
    return saved


@pytest.fixture(scope="module")
def dump_dir() -> Iterator[Path]:
    """Where QEMU's dumps go: /dev/shm (QEMU writes every zero byte), else the temporary directory."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 10 * GIB else None
    path = Path(tempfile.mkdtemp(prefix="mappedram-dump-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=SMALL, ids=lambda g: g.name)
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dump_dir: Path) -> Saved:
    guest: Guest = request.param
    return _save_guest(guest, tmp_path_factory.mktemp(guest.name), dump_dir)


@pytest.fixture(scope="module", params=LARGE, ids=lambda g: g.name)
def large(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dump_dir: Path) -> Iterator[Saved]:
    guest: Guest = request.param
    saved = _save_guest(guest, tmp_path_factory.mktemp(guest.name), dump_dir)
    yield saved
    saved.dump.unlink(missing_ok=True)
    shutil.rmtree(saved.work, ignore_errors=True)


def _loads(path: Path) -> list[Elf64Phdr]:
    with path.open("rb") as f:
        head = f.read(1 << 16)
    ehdr = Elf64Ehdr.unpack(head)
    phdrs = [Elf64Phdr.unpack(head, ehdr.e_phoff + i * ELF64_PHDR.size) for i in range(ehdr.e_phnum)]
    return [p for p in phdrs if p.p_type == PT_LOAD]


def _data_pages(fd: int, start: int, size: int) -> set[int]:
    """Pages (of ``size`` bytes from file offset ``start``) that hold data extents, by SEEK_DATA/SEEK_HOLE."""
    pages: set[int] = set()
    at, end = start, start + size
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        pages.update(range((data - start) // PAGE_SIZE, -(-(hole - start) // PAGE_SIZE)))
        at = hole
    return pages


def _nonzero_pages(mm: np.ndarray, start: int, size: int) -> set[int]:
    """Non-zero pages of ``mm[start:start+size]`` (start is a multiple of 4), scanned in 64 MiB chunks."""
    out: set[int] = set()
    chunk = 16384
    for first in range(0, size // PAGE_SIZE, chunk):
        n = min(chunk, size // PAGE_SIZE - first)
        block = mm[start + first * PAGE_SIZE : start + (first + n) * PAGE_SIZE].view(np.uint32)
        out.update((first + np.flatnonzero(block.reshape(n, -1).any(axis=1))).tolist())
    return out


def _assert_same_bytes(ours: Path, ours_at: list[int], dump: Path, loads: list[Elf64Phdr]) -> None:
    """Every PT_LOAD of the dump equals ``ours`` at the given offsets: pages the dump has non-zero,
    and pages ours stores (data extents), are compared; all others are zero in both."""
    mm = np.memmap(dump, dtype=np.uint8, mode="r")
    fd = os.open(ours, os.O_RDONLY)
    compared = 0
    try:
        for p, at in zip(loads, ours_at, strict=True):
            pages = _nonzero_pages(mm, p.p_offset, p.p_filesz) | _data_pages(fd, at, p.p_filesz)
            compared += len(pages)
            for k in sorted(pages):
                want = mm[p.p_offset + k * PAGE_SIZE : p.p_offset + (k + 1) * PAGE_SIZE].tobytes()
                got = os.pread(fd, PAGE_SIZE, at + k * PAGE_SIZE)
                assert got == want, f"guest-physical {p.p_paddr + k * PAGE_SIZE:#x} differs from QEMU's dump"
        assert compared >= 16, f"only {compared} non-zero pages to compare: the guest's pattern is missing"
    finally:
        os.close(fd)
        del mm


def _assert_qemu_layout_equals_dump(ours: Path, dump: Path, *, whole: bool) -> None:
    """With ``qemu_layout`` the export is QEMU's dump but for e_ehsize."""
    loads = _loads(dump)
    assert [(p.p_paddr, p.p_offset, p.p_filesz, p.p_memsz, p.p_vaddr) for p in _loads(ours)] == [
        (p.p_paddr, p.p_offset, p.p_filesz, p.p_memsz, p.p_vaddr) for p in loads
    ]
    assert ours.stat().st_size == dump.stat().st_size
    memory = loads[0].p_offset
    with ours.open("rb") as a, dump.open("rb") as b:
        head_a, head_b = bytearray(a.read(memory)), bytearray(b.read(memory))
        assert head_b[E_EHSIZE] == b"\x08\x00" and head_a[E_EHSIZE] == b"\x40\x00"  # QEMU: sizeof a pointer
        head_a[E_EHSIZE] = head_b[E_EHSIZE]
        assert head_a == head_b, "ELF headers or notes differ from QEMU's dump"
        tail = loads[-1].p_offset + loads[-1].p_filesz
        a.seek(tail)
        b.seek(tail)
        assert a.read() == b.read() == b"\0.shstrtab\0"
        if whole:
            a.seek(memory)
            b.seek(memory)
            assert a.read() == b.read(), "page data differs from QEMU's dump"
    if not whole:
        _assert_same_bytes(ours, [p.p_offset for p in loads], dump, loads)


def _notes(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(1 << 16)
    ehdr = Elf64Ehdr.unpack(head)
    note = Elf64Phdr.unpack(head, ehdr.e_phoff)
    return head[note.p_offset : note.p_offset + note.p_filesz]


def _assert_aligned_equals_dump(ours: Path, dump: Path) -> None:
    """By default the data is page-aligned: the same segments, notes and bytes as QEMU's dump."""
    loads, ours_loads = _loads(dump), _loads(ours)
    assert [(p.p_paddr, p.p_vaddr, p.p_filesz, p.p_memsz) for p in ours_loads] == [
        (p.p_paddr, p.p_vaddr, p.p_filesz, p.p_memsz) for p in loads
    ]
    assert all(p.p_offset % PAGE_SIZE == 0 for p in ours_loads)
    assert _notes(ours) == _notes(dump) != b""
    _assert_same_bytes(ours, [p.p_offset for p in ours_loads], dump, loads)


@pytest.mark.qemu
@pytest.mark.parametrize("source", ["mapped", "legacy"])
def test_small_elf_equals_qemu_dump(small: Saved, source: str, tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-layout.elf"
    report = ops.export(getattr(small, source), qemu, qemu_layout=True, options=EngineOptions(channels=2))
    assert report.e_machine == "EM_X86_64" and report.cpus == 2 and not report.warnings
    _assert_qemu_layout_equals_dump(qemu, small.dump, whole=True)
    aligned = tmp_path / "ours.elf"
    assert ops.export(getattr(small, source), aligned).layout == "page-aligned"
    _assert_aligned_equals_dump(aligned, small.dump)


@pytest.mark.qemu
def test_small_raw_equals_qemu_dump(small: Saved, tmp_path: Path) -> None:
    out = tmp_path / "ours.raw"
    report = ops.export(small.mapped, out, format="raw")
    loads = _loads(small.dump)
    assert [(s.paddr, s.size) for s in report.segments] == [(p.p_paddr, p.p_filesz) for p in loads]
    assert out.stat().st_size == 4 * GIB  # pc.bios ends the address space
    _assert_same_bytes(out, [p.p_paddr for p in loads], small.dump, loads)


@pytest.mark.qemu
def test_small_map_shows_the_firmware_settings(small: Saved) -> None:
    with mappedram.open_file(small.mapped) as f:
        gmap = guest_memory_map(f)
    starts = {b.target_start: b for b in gmap.blocks}
    assert starts[0xC4000].idstr == "pc.rom" and starts[0xE4000].idstr == "pc.bios"  # PAM segments left to PCI
    assert starts[0xC8000].idstr == "m0" and starts[0xC8000].size == 0x8000  # read-only + write-only RAM merged
    if small.guest.machine == "q35":
        assert starts[0xFEDA0000] == GuestPhysBlock(0xFEDA0000, 0xFEDC0000, "m0", 0xA0000)  # open high SMRAM
        assert 0x30000 not in starts and starts[0].size == 0x30000 and 0x50000 in starts  # SMBASE blackhole
        assert starts[0xEC000].target_end == 63 * MIB  # 1 MiB TSEG blackhole


@pytest.mark.qemu
def test_small_core_opens_in_readelf_pyelftools_and_gdb(small: Saved, tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile

    out = tmp_path / "ours.elf"
    ops.export(small.mapped, out)

    def readelf(path: Path) -> list[list[str]]:
        text = subprocess.run(["readelf", "-lW", os.fspath(path)], capture_output=True, text=True, check=True).stdout
        return [line.split() for line in text.splitlines() if line.strip().startswith(("LOAD", "NOTE"))]

    ours, qemu = readelf(out), readelf(small.dump)
    # type, vaddr, paddr, filesz, memsz: QEMU's; the offsets (column 1) are page-aligned
    assert [r[:1] + r[2:] for r in ours] == [r[:1] + r[2:] for r in qemu] and len(ours) > 5
    assert all(int(r[1], 16) % PAGE_SIZE == 0 for r in ours if r[0] == "LOAD")

    with out.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
        loads = [(s["p_paddr"], s["p_filesz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads == [(p.p_paddr, p.p_filesz) for p in _loads(small.dump)]
        [note_seg] = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
        notes = [(n["n_name"], n["n_type"], n["n_descsz"]) for n in note_seg.iter_notes()]
        assert notes == [("CORE", "NT_PRSTATUS", 336)] * 2 + [("QEMU", 0, 440)] * 2
        seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_paddr"] == 0)
        assert seg.data()[0x8000 : 0x8000 + PAGE_SIZE] == _pattern_page(0x8000)

    if shutil.which("gdb") is None:
        return
    gdb = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", f"core-file {out}", "-ex", "info registers rip rax r15 fs_base gs_base",
         "-ex", "x/2gx 0x8000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    text = gdb.stdout
    assert f"rip            {HALT_RIP:#x}" in text, gdb.stdout + gdb.stderr
    assert "0x1111111111111111" in text and "0xfedcba9876543210" in text
    assert "0x7f1234560000" in text and "0xffff888000001000" in text
    assert "0xa5a5000000008000" in text  # the pattern page at guest-physical 0x8000


@pytest.mark.qemu
def test_large_exports_equal_qemu_dump(large: Saved) -> None:
    """RAM across 4 GiB; the split derived from the machine type and RAM size; both formats; ELF and raw."""
    guest = large.guest
    out = large.work / "ours.elf"
    for source, qemu_layout in ((large.mapped, False), (large.legacy, True)):
        report = ops.export(source, out, qemu_layout=qemu_layout, options=EngineOptions(channels=2))
        below = {"pc": 3 * GIB, "q35": 2 * GIB}[guest.machine]
        assert (report.below_4g_mem_size, report.above_4g_mem_size) == (below, guest.ram_size - below)
        assert report.e_machine == "EM_386" and report.cpus == 1 and not report.warnings  # reset: real mode
        assert report.segments[-1].paddr == 4 * GIB and report.segments[-1].block_offset == below
        if qemu_layout:
            _assert_qemu_layout_equals_dump(out, large.dump, whole=False)
        else:
            _assert_aligned_equals_dump(out, large.dump)
            # only the non-zero pages (pattern, ROMs) and the headers take space
            assert out.stat().st_blocks * 512 <= (len(guest.addresses(below)) + 2 * 96 + 2) * PAGE_SIZE
        out.unlink()
    raw = large.work / "ours.raw"
    ops.export(large.mapped, raw, format="raw")
    loads = _loads(large.dump)
    assert raw.stat().st_size == loads[-1].p_paddr + loads[-1].p_filesz
    _assert_same_bytes(raw, [p.p_paddr for p in loads], large.dump, loads)
    raw.unlink()


# -- QEMU's default devices: RAM behind PCI BARs ----------------------------------------

#: vga.vram: the VGA's 16 MiB BAR0 (vga_common_init's vgamem_mb default).
VRAM_SIZE = 16 * MIB
#: PCI_BAR_UNMAPPED as query-pci reports it (an int64).
BAR_UNMAPPED = (-1, (1 << 64) - 1)


class DefaultDevicesVM(QemuVM):
    """The harness's guest, with QEMU's default devices: no ``-nodefaults`` (``-display none`` stays)."""

    @property
    def args(self) -> list[str]:
        return [a for a in super().args if a != "-nodefaults"]


def _hmp(vm: QemuVM, command: str) -> str:
    return str(vm.cmd("human-monitor-command", {"command-line": command}))


def _vga(vm: QemuVM) -> dict[str, Any]:
    """query-pci's entry of the VGA controller (class 0x0300) on the root bus."""
    [dev] = [d for bus in vm.cmd("query-pci") for d in bus["devices"] if d["class_info"]["class"] == 0x0300]
    return dict(dev)


def _vga_bar0(vm: QemuVM) -> tuple[int, int] | None:
    """(address, size) of the VGA's BAR0 once QEMU has mapped it (pci_update_mappings), else None."""
    [bar0] = [r for r in _vga(vm)["regions"] if r["bar"] == 0]
    return None if bar0["address"] in BAR_UNMAPPED else (bar0["address"], bar0["size"])


def _vga_text_written(vm: QemuVM) -> bool:
    """The first words of the text screen (0xb8000, read through vga-lowmem) are no longer zero."""
    out = _hmp(vm, "xp /8xw 0xb8000")
    return any(int(w, 16) for line in out.splitlines() for w in line.partition(":")[2].split())


def _poll(vm: QemuVM, done: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``done`` over QMP until it holds, the guest running; ``timeout`` only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout} s\n{vm.stderr[-2000:]}"
        time.sleep(0.005)


#: HMP's size letters: b(yte), h(alf word), w(ord).
_HMP_SIZE = {1: "b", 2: "h", 4: "w"}


def _pci_config_write(vm: QemuVM, dev: dict[str, Any], reg: int, value: int, size: int) -> None:
    """Write the device's configuration space through the 0xcf8/0xcfc ports (HMP ``o``), as firmware does."""
    bdf = (dev["bus"] << 16) | (dev["slot"] << 11) | (dev["function"] << 8)
    _hmp(vm, f"o /w 0xcf8 {0x80000000 | bdf | (reg & ~3):#x}")
    _hmp(vm, f"o /{_HMP_SIZE[size]} {0xCFC + (reg & 3):#x} {value:#x}")


@dataclass(frozen=True)
class DefaultsCase:
    name: str
    machine: str  # -machine, with properties
    accel: str = "tcg"
    ram_mib: int = 64
    #: "ran": SeaBIOS run until VGA BAR0 is mapped and the text screen written; "reset": never run;
    #: else a BAR programming scenario on the never-run guest (see _PROGRAMS)
    state: str = "ran"

    @property
    def family_machine(self) -> str:
        return self.machine.split(",")[0]


#: VGA config writes (register, value, size) per scenario; the COMMAND register last, as firmware does.
_PROGRAMS: dict[str, list[tuple[int, int, int]]] = {
    "rom-and-bar0": [(0x10, 0xE0000000, 4), (0x30, 0xFEBE0001, 4), (0x04, 0x0002, 2)],
    "memory-disabled": [(0x10, 0xE0000000, 4), (0x30, 0xFEBE0001, 4), (0x04, 0x0001, 2)],
    "bar0-reaches-4g": [(0x10, 0xFF000000, 4), (0x30, 0xFEBE0000, 4), (0x04, 0x0002, 2)],  # ROM BAR not enabled
    "bar0-over-ram": [(0x10, 0x03000000, 4), (0x04, 0x0002, 2)],  # with 56 MiB of RAM: half covered
}


def _save_defaults_guest(case: DefaultsCase, work: Path, dump_dir: Path) -> tuple[Saved, tuple[int, int] | None]:
    require_qemu()
    guest = Guest(case.name, case.family_machine, case.ram_mib, False)
    ram = work / "guest.ram"
    family = machine_family("pc-q35-10.0" if guest.machine == "q35" else "pc-i440fx-10.0")
    _write_ram(ram, guest.ram_size, guest.addresses(ram_split(family, None, guest.ram_size).below_4g_mem_size))
    saved = Saved(guest, dump_dir / f"{case.name}.dump", work / "mapped.mig", work / "legacy.mig", work)
    with DefaultDevicesVM(ram, machine=case.machine, ram_mib=guest.ram_mib, accel=case.accel, workdir=work,
                          name="src", timeout=60) as vm:  # fmt: skip
        assert _vga_bar0(vm) is None  # at reset: COMMAND is 0
        if case.state == "ran":
            vm.cmd("cont")
            _poll(vm, lambda: _vga_bar0(vm), "SeaBIOS mapping the VGA's BAR0")
            _poll(vm, lambda: _vga_text_written(vm), "the VGA BIOS writing the text screen")
            vm.cmd("stop")
        elif case.state != "reset":
            dev = _vga(vm)
            for reg, value, size in _PROGRAMS[case.state]:
                _pci_config_write(vm, dev, reg, value, size)
        bar0 = _vga_bar0(vm)
        vm.dump_guest_memory(saved.dump)
        vm.save(file_uri(saved.mapped), {"mapped-ram": True}, timeout=300)
    return saved, bar0


DEFAULTS_RAN = [DefaultsCase("pc-defaults-ran", "pc"), DefaultsCase("q35-defaults-ran", "q35")]
DEFAULTS_RESET = [
    DefaultsCase("q35-defaults-reset", "q35", state="reset"),
    DefaultsCase("q35-defaults-reset-no-smm", "q35,smm=off", state="reset"),
    DefaultsCase("pc-defaults-reset", "pc", state="reset"),
] + ([DefaultsCase("q35-defaults-reset-kvm", "q35", accel="kvm", state="reset")] if kvm_usable() else [])
DEFAULTS_PROGRAMMED = [DefaultsCase(f"{m}-{p}", m, state=p, ram_mib=56 if p == "bar0-over-ram" else 64)
                       for p in _PROGRAMS for m in ("pc", "q35")]  # fmt: skip


@pytest.fixture(scope="module", params=DEFAULTS_RAN, ids=lambda c: c.name)
def defaults_ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 dump_dir: Path) -> tuple[Saved, tuple[int, int] | None]:  # fmt: skip
    case: DefaultsCase = request.param
    return _save_defaults_guest(case, tmp_path_factory.mktemp(case.name), dump_dir)


def _export_equals_dump(saved: Saved, out: Path) -> ops.ExportReport:
    """Our ELF export of QEMU's mapped-ram save has QEMU's PT_LOADs, notes and bytes."""
    report = ops.export(saved.mapped, out, options=EngineOptions(channels=2))
    _assert_aligned_equals_dump(out, saved.dump)
    return report


@pytest.mark.qemu
def test_defaults_ran_vram_behind_bar0_equals_qemu_dump(defaults_ran: tuple[Saved, tuple[int, int] | None],
                                                        tmp_path: Path) -> None:  # fmt: skip
    saved, bar0 = defaults_ran
    assert bar0 is not None and bar0[1] == VRAM_SIZE
    loads = _loads(saved.dump)
    assert (bar0[0], VRAM_SIZE) in [(p.p_paddr, p.p_filesz) for p in loads]  # QEMU dumps vga.vram at BAR0
    report = _export_equals_dump(saved, tmp_path / "ours.elf")
    [vram] = [s for s in report.segments if s.block.endswith("/vga.vram")]
    assert (vram.paddr, vram.size, vram.block_offset) == (bar0[0], VRAM_SIZE, 0)
    assert not report.warnings, report.warnings
    assert not any(b.endswith("vga.vram") for b in report.unplaced_blocks)
    with saved.dump.open("rb") as f:  # the VGA BIOS's text screen is in vram's first page
        f.seek(next(p.p_offset for p in loads if p.p_paddr == bar0[0]))
        assert f.read(PAGE_SIZE) != bytes(PAGE_SIZE)


@pytest.mark.qemu
@pytest.mark.parametrize("case", DEFAULTS_RESET, ids=lambda c: c.name)
def test_defaults_never_ran_equals_qemu_dump(case: DefaultsCase, tmp_path: Path, dump_dir: Path) -> None:
    saved, bar0 = _save_defaults_guest(case, tmp_path, dump_dir)
    assert bar0 is None
    first = (_loads(saved.dump)[0].p_paddr, _loads(saved.dump)[0].p_filesz)
    if case.machine == "q35,smm=off":
        assert first == (0, 0xC0000)  # no SMRAM regions: RAM shows in the VGA window
    elif case.accel == "tcg":
        assert first == (0, 0xA0000)  # smram-region shows the PCI window, where vga-lowmem is
    report = _export_equals_dump(saved, tmp_path / "ours.elf")
    assert (report.segments[0].paddr, report.segments[0].size) == first
    assert not report.warnings, report.warnings
    vram = next(b for b in report.unplaced_blocks if b.endswith("/vga.vram"))
    assert any(vram in n and "memory space disabled in the COMMAND register" in n for n in report.notes)
    saved.dump.unlink()


@pytest.mark.qemu
@pytest.mark.parametrize("case", DEFAULTS_PROGRAMMED, ids=lambda c: c.name)
def test_defaults_programmed_bars_equal_qemu_dump(case: DefaultsCase, tmp_path: Path, dump_dir: Path) -> None:
    saved, bar0 = _save_defaults_guest(case, tmp_path, dump_dir)
    loads = {p.p_paddr: p.p_filesz for p in _loads(saved.dump)}
    report = _export_equals_dump(saved, tmp_path / "ours.elf")
    assert not report.warnings, report.warnings
    placed = {s.block.rpartition("/")[2]: (s.paddr, s.size, s.block_offset) for s in report.segments}
    if case.state == "rom-and-bar0":
        assert bar0 == (0xE0000000, VRAM_SIZE) and loads[0xE0000000] == VRAM_SIZE and loads[0xFEBE0000] == 0x10000
        assert placed["vga.vram"] == (0xE0000000, VRAM_SIZE, 0) and placed["vga.rom"] == (0xFEBE0000, 0x10000, 0)
    elif case.state == "bar0-over-ram":
        # RAM (priority 0) covers the BAR's first 8 MiB; the PCI space (-1) shows the rest of vga.vram
        assert bar0 == (0x03000000, VRAM_SIZE) and loads[56 * MIB] == 8 * MIB
        assert placed["vga.vram"] == (56 * MIB, 8 * MIB, 8 * MIB)
    else:
        assert bar0 is None and not {"vga.vram", "vga.rom"} & set(placed)
        reason = {"memory-disabled": "memory space disabled", "bar0-reaches-4g": "reaches 4 GiB"}[case.state]
        assert any("vga.vram" in n and reason in n for n in report.notes), report.notes
        assert {b.rpartition("/")[2] for b in report.unplaced_blocks} >= {"vga.vram", "vga.rom"}
    saved.dump.unlink()

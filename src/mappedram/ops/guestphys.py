"""Guest-physical export: an ELF core as QEMU's ``dump-guest-memory`` writes it, or a flat raw image.

The guest-physical map is rebuilt from the file (format/x86map.py): the machine type and
the main RAM block's size give the below/above-4G split as QEMU computes it; the host
bridge's device section (``I440FX`` or ``mch``, decoded with the vmdesc) gives the PAM
and SMRAM registers that decide what shows in 0xa0000-0xfffff. Each PCI device's section
gives its configuration space (format/pci.py): RAM blocks the device maps (framebuffers,
option ROMs) are placed where its BARs are, when its COMMAND register enables them. The
``cpu`` sections, decoded with the vmdesc, give the NT_PRSTATUS and "QEMU" notes
(format/x86cpu.py).
Page data is copied by the engine's sparse copy: pages that are zero (or absent from the
file) are never written, so they stay holes in the output.

Every assumption the file cannot confirm is listed in the report's ``notes``; those that
may make the output differ from what dump-guest-memory would have written are also in
``warnings``.

References:
    QEMU dump/dump.c (dump_init, create_vmcore), system/memory_mapping.c,
    target/i386/arch_dump.c, hw/i386/pc_piix.c, hw/i386/pc_q35.c, hw/pci-host/pam.c,
    hw/pci/pci.c (pci_update_mappings, pci_bar_address).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mappedram.engine.copy import PageCopy, sparse_copy, write_sparse_file
from mappedram.errors import FormatError, UsageError
from mappedram.format.elf import EM_386, EM_X86_64, plan_core
from mappedram.format.vmstate import find_field
from mappedram.format.x86cpu import X86CPUState, core_notes, decode_cpu_section
from mappedram.format.x86map import (
    FAMILY_I440FX,
    FAMILY_Q35,
    FAMILY_UNKNOWN,
    GuestPhysBlock,
    HostBridge,
    RamSplit,
    decode_host_bridge,
    guest_phys_blocks,
    machine_family,
    mch_has_smm_ranges,
    ram_split,
)
from mappedram.image import MigrationFile, open_file

from .options import DEFAULTS, EXPORT_FORMATS, EngineOptions
from .pcimap import legacy_vga, pci_devices, place_bars, section_bodies
from .protocol import CHUNK_PAGES, refuse_chain_file, refuse_same_file, refuse_symlink
from .seal import SEAL_CHECK, SealCheck, SealOptions, checked

__all__ = [
    "EXPORT_FORMATS",
    "GuestMemoryMap",
    "ExportSegment",
    "ExportReport",
    "guest_memory_map",
    "cpu_states",
    "export",
]



_HOST_BRIDGE_VMSD = {FAMILY_I440FX: "I440FX", FAMILY_Q35: "mch"}
_PCI_CONFIG = ("parent_obj", "config[0]")
_E_MACHINE = {EM_X86_64: "EM_X86_64", EM_386: "EM_386"}


@dataclass(frozen=True, slots=True)
class GuestMemoryMap:
    """The guest-physical RAM of a file, as dump-guest-memory's guest_phys_blocks."""

    machine_type: str | None
    family: str
    ram_block: str
    split: RamSplit
    bridge: HostBridge | None
    blocks: list[GuestPhysBlock]
    unplaced: list[str]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _host_bridge(mf: MigrationFile, family: str) -> HostBridge | None:
    vmsd = _HOST_BRIDGE_VMSD.get(family)
    if vmsd is None:
        return None
    for _, body, fields in section_bodies(mf, vmsd):
        span = find_field(fields, _PCI_CONFIG)
        if span is not None and span.size >= 256 and span.offset + 256 <= len(body):
            return decode_host_bridge(family, body[span.offset : span.offset + 256])
    return None


def _block_size(mf: MigrationFile, idstr: str) -> tuple[str, int] | None:
    for b in mf.blocks:
        if b.idstr == idstr:
            return b.idstr, b.used_length
    return None


def guest_memory_map(mf: MigrationFile, *, max_ram_below_4g: int | None = None) -> GuestMemoryMap:
    """Rebuild the guest-physical RAM map of ``mf`` (x86 ``pc`` and ``q35`` machines)."""
    family = machine_family(mf.machine_type)
    main = mf.main_block
    split = ram_split(family, mf.machine_type, main.used_length, max_ram_below_4g)
    notes: list[str] = []
    warnings: list[str] = []
    if family == FAMILY_UNKNOWN:
        warnings.append(
            f"machine type {mf.machine_type!r} is neither pc (i440FX) nor q35: the map assumes pc_init1's "
            "RAM split, RAM throughout 0xa0000-0xfffff and the BIOS ending at 4 GiB"
        )
    bridge = _host_bridge(mf, family)
    if family != FAMILY_UNKNOWN and bridge is None:
        # as firmware leaves it: PAM all RAM, SMRAM closed (a VGA window shows at 0xa0000)
        bridge = HostBridge(pam=(3,) * 13, smram=0x02)
        warnings.append(
            f"the {_HOST_BRIDGE_VMSD[family]} host bridge state could not be decoded (no vmdesc or no section): "
            "0xc0000-0xfffff is assumed to be RAM and SMRAM closed, as firmware leaves them"
        )
    limit = f"{max_ram_below_4g:#x} (given)" if max_ram_below_4g else f"QEMU's default {split.max_ram_below_4g:#x}"
    notes.append(
        f"{split.rule}: {main.used_length:#x} bytes of RAM ({main.idstr!r}), {split.below_4g_mem_size:#x} below "
        f"4 GiB and {split.above_4g_mem_size:#x} from {split.above_4g_mem_start:#x}; max-ram-below-4g {limit} "
        "(a machine property, not in the file)"
    )
    no_smram = family == FAMILY_Q35 and bridge is not None and not mch_has_smm_ranges(bridge)
    if no_smram:
        notes.append(
            "the mch has no SMRAM regions (its SMRAM register is 0: the machine has no SMM, as with KVM "
            "without SMM support or smm=off): RAM shows in 0xa0000-0xbffff"
        )
    bios = _block_size(mf, "pc.bios")
    option_rom = _block_size(mf, "pc.rom")
    devices = pci_devices(mf)
    vga_owner = legacy_vga(mf, devices)
    if vga_owner is not None and not no_smram:
        notes.append(
            f"a VGA device claims 0xa0000-0xbffff (vga-lowmem of {vga_owner}): no RAM is placed there while the "
            "host bridge routes it to PCI (SMRAM closed); dump-guest-memory writes the vga.chain4 window of the "
            "framebuffer there in chain-4 video modes"
        )
    pci = place_bars(mf, devices)
    if pci.placed:
        notes.append("RAM behind PCI BARs: " + "; ".join(pci.placed))
    if pci.unmapped:
        notes.append("RAM of PCI devices not mapped (dump-guest-memory leaves it out too): " + "; ".join(pci.unmapped))
    if pci.unknown:
        warnings.append("RAM of PCI devices that cannot be placed: " + "; ".join(pci.unknown))
    blocks = guest_phys_blocks(family, split, main.idstr, bridge=bridge, bios=bios, option_rom=option_rom,
                               vga=vga_owner is not None, bars=pci.bars)  # fmt: skip
    placed = {b.idstr for b in blocks}
    unplaced = [b.idstr for b in mf.blocks if b.idstr not in placed]
    hidden = sorted({b.idstr for b in pci.bars} - placed)
    if hidden:
        notes.append("RAM behind PCI BARs wholly covered by regions of higher priority (RAM): " + ", ".join(hidden))
    others = [idstr for idstr in unplaced if idstr not in pci.claimed]
    if others:
        notes.append(
            "blocks not in the guest-physical map: "
            + ", ".join(others)
            + " (fw_cfg blobs and flash are not RAM of the address space; DIMMs and further memory backends "
            "cannot be placed from the file)"
        )
    return GuestMemoryMap(mf.machine_type, family, main.idstr, split, bridge, blocks, unplaced, notes, warnings)


def cpu_states(mf: MigrationFile) -> list[X86CPUState]:
    """The vCPUs' state from the ``cpu`` sections, in cpu_index order (FormatError if undecodable)."""
    sections = section_bodies(mf, "cpu")
    return sorted((decode_cpu_section(body, fields, index) for index, body, fields in sections),
                  key=lambda c: c.cpu_index)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ExportSegment:
    """One guest-physical block of the export: ``size`` bytes at ``paddr``, from ``block`` at ``block_offset``."""

    paddr: int
    size: int
    block: str
    block_offset: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class ExportReport:
    source: str
    output: str
    format: str
    layout: str  # ELF: "page-aligned" or "qemu"; raw: "guest-physical"
    machine_type: str | None
    machine_family: str
    ram_block: str
    ram_size: int
    below_4g_mem_size: int
    above_4g_mem_size: int
    segments: list[ExportSegment]
    cpus: int  # CPUs with notes written (ELF)
    e_machine: str | None  # ELF
    file_size: int
    bytes_written: int
    bytes_read_logical: int
    seconds: float
    channels: int
    unplaced_blocks: list[str]
    notes: list[str]
    warnings: list[str]
    seal: SealCheck | None = None  # checked before the first output byte (None: not checked)

    @property
    def gbps(self) -> float:
        return self.bytes_read_logical / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


def export(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str = "elf",
    offset: int = 0,
    max_ram_below_4g: int | None = None,
    qemu_layout: bool = False,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions = SEAL_CHECK,
) -> ExportReport:
    """Write the guest-physical memory of a migration file as an ELF core or a flat raw image.

    ``format="elf"``: the layout of QEMU's ``dump-guest-memory`` (paging off): one PT_NOTE
    (the CPU notes, when the ``cpu`` sections decode) and one PT_LOAD per guest-physical
    block. The data starts on a page boundary, so zero pages are exact holes;
    ``qemu_layout`` puts it where QEMU does, right after the notes (the file then equals
    QEMU's dump but for e_ehsize). ``format="raw"``: byte A of the file is guest-physical
    address A; the gaps between blocks are holes. Zero pages are holes in both. A sealed
    file's digests are checked before the output is created (``seal``: the key, or no check).
    """
    if format not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    out = os.fspath(output)
    refuse_symlink(out)
    refuse_same_file(path, out, "export")
    with open_file(path, offset) as mf:
        refuse_chain_file(mf, out, "export")
        gmap = guest_memory_map(mf, max_ram_below_4g=max_ram_below_4g)
        if not gmap.blocks:
            raise UsageError(f"{mf.path}: no guest-physical RAM to export")
        notes, warnings = list(gmap.notes), list(gmap.warnings)
        cpus: list[X86CPUState] = []
        e_machine: int | None = None
        pieces: list[tuple[int, bytes]] = []
        if format == "elf":
            try:
                cpus = cpu_states(mf)
            except FormatError as exc:
                warnings.append(f"no CPU notes: the cpu sections do not decode with the vmdesc ({exc})")
            else:
                if not cpus:
                    warnings.append("no CPU notes: the file has no cpu sections described by a vmdesc")
            note_bytes, e_machine = core_notes(cpus)
            plan = plan_core([(b.target_start, b.size) for b in gmap.blocks], note_bytes, e_machine,
                             data_alignment=1 if qemu_layout else mf.page_size)  # fmt: skip
            offsets = [s.file_offset for s in plan.segments]
            pieces = [(0, plan.head), (plan.tail_offset, plan.tail)]
            size = plan.file_size
            if cpus and not cpus[0].lma and all(b.target_end <= 0xFFFFFFFF for b in gmap.blocks):
                notes.append("dump-guest-memory would write ELF32 here (no long mode, no RAM at 4 GiB); this is ELF64")
        else:
            offsets = [b.target_start for b in gmap.blocks]
            size = max(b.target_end for b in gmap.blocks)
        tasks = []
        by_name = {b.idstr: b for b in mf.blocks}
        for gb, at in zip(gmap.blocks, offsets):
            rb = by_name[gb.idstr]
            ps = rb.page_size
            first, count = gb.offset // ps, gb.size // ps
            for k in range(0, count, CHUNK_PAGES):
                n = min(CHUNK_PAGES, count - k)
                tasks.append(PageCopy(at + k * ps, rb.sources(first + k, n)))
        check = checked(mf, seal, options)
        logical = sum(b.size for b in gmap.blocks)
        options.started(logical)
        start = time.perf_counter()
        write_sparse_file(out, size, pieces)
        written = sparse_copy(mf.store, out, tasks, page_size=mf.page_size, max_pages=CHUNK_PAGES,
                              channels=options.channels, progress=options.progress)  # fmt: skip
        seconds = time.perf_counter() - start
        segments = [ExportSegment(b.target_start, b.size, b.idstr, b.offset, at) for b, at in zip(gmap.blocks, offsets)]
        return ExportReport(
            source=mf.path,
            output=out,
            format=format,
            layout="guest-physical" if format == "raw" else "qemu" if qemu_layout else "page-aligned",
            machine_type=mf.machine_type,
            machine_family=gmap.family,
            ram_block=gmap.ram_block,
            ram_size=gmap.split.ram_size,
            below_4g_mem_size=gmap.split.below_4g_mem_size,
            above_4g_mem_size=gmap.split.above_4g_mem_size,
            segments=segments,
            cpus=len(cpus),
            e_machine=None if e_machine is None else _E_MACHINE[e_machine],
            file_size=size,
            bytes_written=written,
            bytes_read_logical=logical,
            seconds=seconds,
            channels=options.channels,
            unplaced_blocks=gmap.unplaced,
            notes=notes,
            warnings=warnings,
            seal=check,
        )

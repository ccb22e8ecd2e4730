"""The guest-physical memory map of QEMU's x86 ``pc`` (i440FX) and ``q35`` machines.

Theory of operation: ``dump-guest-memory`` walks the flat view of the system address
space and keeps the RAM (and ROM) sections, merging neighbours that continue the same
RAMBlock (guest_phys_blocks_append). This module rebuilds that flat view from what a
migration file holds: the RAM blocks (their names and sizes), the machine type, and the
host bridge's PCI configuration space (PAM and SMRAM registers). It paints the regions
QEMU creates, highest priority first; a window into the PCI address space is
transparent where the PCI space holds nothing, as QEMU's renderer is:

====================  =====  =====================================================
region                prio   content
====================  =====  =====================================================
PAM segments (13)     1      0xc0000-0xfffff: RAM if the mode is 1-3, PCI if 0
smram-region          1      0xa0000-0xbffff: PCI window (VGA) unless D_OPEN
                             (q35: only with SMM ranges, see below)
smram-open-high       1      q35: RAM 0xa0000.. at 0xfeda0000 if D_OPEN and H_SMRAME
tseg-blackhole        1      q35: I/O, the top TSEG bytes of low RAM, if T_EN and G_SMRAME
smbase-blackhole      1      q35: I/O at 0x30000-0x4ffff once F_SMBASE is locked
ram-below-4g          0      RAM [0, below_4g_mem_size)
ram-above-4g          0      RAM at 4 GiB, offset below_4g_mem_size in the block
pci (container)       -1     pc.rom at 0xc0000, isa-bios (top 128 KiB of pc.bios) below
                             1 MiB, pc.bios ending at 4 GiB, vga-lowmem (I/O) at 0xa0000,
                             and the RAM behind the devices' BARs (prio 1, added last)
====================  =====  =====================================================

The q35 MCH creates its SMRAM regions only when the machine has SMM (x86_machine_is_smm_enabled:
always with TCG, with KVM when the host supports it, never with ``smm=off``). Without them
nothing covers the legacy window, so ram-below-4g shows through the VGA window
0xa0000-0xbffff; and mch_reset then leaves the SMRAM register 0, where it is otherwise
never without its read-only C_BASE_SEG bits (0x02). That register tells the two apart.

What the file does not hold, and is therefore assumed: ``max-ram-below-4g`` (QEMU's
default unless given), SMM being enabled on i440FX (its SMRAM window exists either way),
the VGA chain-4 window, the kvmvapic ROM alias (RAM over RAM where PAM is RAM, as firmware
leaves it), DIMMs and NUMA layouts. Where devices' BARs are (clipped to the windows of the
bridges in front of them) is read from their configuration spaces by the caller
(format/pci.py) and handed in as ``bars``.

References:
    QEMU hw/i386/pc_piix.c (pc_init1: the below/above 4G split, gigabyte_align),
    hw/i386/pc_q35.c (pc_q35_init), hw/i386/pc.c (pc_memory_init, pc_pci_as_mapping_init),
    hw/i386/x86-common.c (x86_bios_rom_init, x86_isa_bios_init), hw/pci-host/pam.c
    (init_pam, pam_update), hw/pci-host/i440fx.c (i440fx_update_memory_mappings),
    hw/pci-host/q35.c (mch_realize, mch_reset, mch_update, mch_update_pam, mch_update_smram,
    mch_update_smbase_smram), hw/i386/x86.c (x86_machine_is_smm_enabled), hw/pci/pci.c
    (pci_update_mappings),
    include/hw/pci-host/q35.h, system/memory_mapping.c (guest_phys_block_add_section).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "FAMILY_I440FX",
    "FAMILY_Q35",
    "FAMILY_UNKNOWN",
    "GIB",
    "RamSplit",
    "HostBridge",
    "GuestPhysBlock",
    "machine_family",
    "ram_split",
    "decode_host_bridge",
    "host_bridge_reset",
    "guest_phys_blocks",
    "describe",
    "mch_has_smm_ranges",
    "I440FX_PAM",
    "I440FX_SMRAM",
    "MCH_HOST_BRIDGE_PAM0",
    "MCH_HOST_BRIDGE_SMRAM",
    "MCH_HOST_BRIDGE_ESMRAMC",
    "MCH_HOST_BRIDGE_F_SMBASE",
    "MCH_HOST_BRIDGE_EXT_TSEG_MBYTES",
]

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10
FOUR_GIB = 4 * GIB

FAMILY_I440FX = "i440fx"
FAMILY_Q35 = "q35"
FAMILY_UNKNOWN = "unknown"

# include/hw/pci-host/pam.h
PAM_BIOS_BASE = 0xF0000
PAM_BIOS_SIZE = 0x10000
PAM_EXPAN_BASE = 0xC0000
PAM_EXPAN_SIZE = 0x04000
PAM_REGIONS_COUNT = 13
PAM_ATTR_MASK = 0x3
# include/hw/pci-host/i440fx.h
I440FX_PAM = 0x59
I440FX_SMRAM = 0x72
# include/hw/pci-host/q35.h
MCH_HOST_BRIDGE_PAM0 = 0x90
MCH_HOST_BRIDGE_SMRAM = 0x9D
MCH_HOST_BRIDGE_ESMRAMC = 0x9E
MCH_HOST_BRIDGE_F_SMBASE = 0x9C
MCH_HOST_BRIDGE_EXT_TSEG_MBYTES = 0x50
MCH_HOST_BRIDGE_EXT_TSEG_MBYTES_QUERY = 0xFFFF
MCH_HOST_BRIDGE_SMRAM_DEFAULT = 0x02  # SMRAM_C_BASE_SEG
SMRAM_C_BASE_SEG_MASK = 0x07  # read-only: MCH_HOST_BRIDGE_SMRAM_WMASK(_LCK) never covers it
MCH_HOST_BRIDGE_ESMRAMC_DEFAULT = 0x38  # SM_CACHE | SM_L1 | SM_L2
MCH_HOST_BRIDGE_ESMRAMC_H_SMRAME = 0x80
MCH_HOST_BRIDGE_ESMRAMC_TSEG_SZ_MASK = 0x06
MCH_HOST_BRIDGE_ESMRAMC_T_EN = 0x01
MCH_HOST_BRIDGE_F_SMBASE_QUERY = 0xFF
MCH_HOST_BRIDGE_F_SMBASE_IN_RAM = 0x01
MCH_HOST_BRIDGE_F_SMBASE_LCK = 0x02
MCH_HOST_BRIDGE_SMBASE_ADDR = 0x30000
MCH_HOST_BRIDGE_SMBASE_SIZE = 128 * KIB
MCH_HOST_BRIDGE_SMRAM_C_BASE = 0xA0000
MCH_HOST_BRIDGE_SMRAM_C_SIZE = 128 * KIB
#: mch's "extended-tseg-mbytes" property default (not in the migration stream).
MCH_EXT_TSEG_MBYTES_DEFAULT = 16
OPEN_HIGH_SMRAM_ADDR = 0xFEDA0000
# include/hw/pci-host/pam.h (SMRAM_* bits, shared by i440FX and MCH)
SMRAM_D_OPEN = 0x40
SMRAM_D_LCK = 0x10
SMRAM_G_SMRAME = 0x08
# include/hw/i386/pc.h
PC_ROM_MIN_VGA = 0xC0000
ISA_BIOS_MAX = 128 * KIB

_I440FX_NAME = re.compile(r"^pc-(?:i440fx-)?(\d+)\.(\d+)$")
_Q35_NAME = re.compile(r"^pc-q35-(\d+)\.(\d+)$")


def machine_family(machine_type: str | None) -> str:
    """``i440fx`` for ``pc``/``pc-i440fx-X.Y`` (and the old ``pc-X.Y``), ``q35`` for ``q35``/``pc-q35-X.Y``."""
    if machine_type is None:
        return FAMILY_UNKNOWN
    if machine_type == "pc" or _I440FX_NAME.match(machine_type):
        return FAMILY_I440FX
    if machine_type == "q35" or _Q35_NAME.match(machine_type):
        return FAMILY_Q35
    return FAMILY_UNKNOWN


@dataclass(frozen=True, slots=True)
class RamSplit:
    """How QEMU splits the machine's RAM around the PCI hole below 4 GiB."""

    ram_size: int
    below_4g_mem_size: int
    above_4g_mem_size: int
    max_ram_below_4g: int
    rule: str  # the QEMU function whose rule was applied
    above_4g_mem_start: int = FOUR_GIB


def _gigabyte_align(machine_type: str | None) -> bool:
    """pc_i440fx_1_7_machine_options and older set gigabyte_align = false."""
    m = _I440FX_NAME.match(machine_type or "")
    return m is None or (int(m[1]), int(m[2])) > (1, 7)


def ram_split(family: str, machine_type: str | None, ram_size: int, max_ram_below_4g: int | None = None) -> RamSplit:
    """below/above 4G sizes as pc_init1 (i440fx, and unknown machines) or pc_q35_init computes them.

    ``max_ram_below_4g`` is the machine property (0 or None: QEMU's default). It is not
    in the migration stream.
    """
    if family == FAMILY_Q35:
        # reference: pc_q35_init
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
        limit = max_ram_below_4g or FOUR_GIB
        lowmem = min(lowmem, limit)
        rule = "pc_q35_init"
    else:
        # reference: pc_init1
        limit = max_ram_below_4g or 0xE0000000
        lowmem = limit
        if ram_size >= limit and _gigabyte_align(machine_type):
            lowmem = min(lowmem, 0xC0000000)
        rule = "pc_init1"
    if ram_size >= lowmem:
        return RamSplit(ram_size, lowmem, ram_size - lowmem, limit, rule)
    return RamSplit(ram_size, ram_size, 0, limit, rule)


@dataclass(frozen=True, slots=True)
class HostBridge:
    """The memory-map registers of the i440FX or MCH host bridge (PCI config space)."""

    pam: tuple[int, ...]  # 13 modes (0 PCI, 1 read-only RAM, 2 write-only, 3 RAM): 0xf0000, then 0xc0000 + 16K*i
    smram: int
    esmramc: int = 0  # q35
    f_smbase: int = 0  # q35
    ext_tseg_mbytes: int | None = None  # q35: the register, once the firmware queried it


# reference: pam_update (the mode of region idx is in config[PAM0 + DIV_ROUND_UP(idx, 2)])
def _pam_modes(config: bytes, base: int) -> tuple[int, ...]:
    modes = []
    for idx in range(PAM_REGIONS_COUNT):
        val = config[base + (idx + 1) // 2]
        modes.append((val >> ((not idx & 1) * 4)) & PAM_ATTR_MASK)
    return tuple(modes)


def decode_host_bridge(family: str, config: bytes) -> HostBridge:
    """The PAM/SMRAM state of the host bridge from its 256-byte PCI configuration space."""
    if len(config) < 256:
        raise ValueError(f"PCI configuration space of {len(config)} bytes, expected 256")
    if family == FAMILY_Q35:
        ext = int.from_bytes(config[MCH_HOST_BRIDGE_EXT_TSEG_MBYTES : MCH_HOST_BRIDGE_EXT_TSEG_MBYTES + 2], "little")
        return HostBridge(
            pam=_pam_modes(config, MCH_HOST_BRIDGE_PAM0),
            smram=config[MCH_HOST_BRIDGE_SMRAM],
            esmramc=config[MCH_HOST_BRIDGE_ESMRAMC],
            f_smbase=config[MCH_HOST_BRIDGE_F_SMBASE],
            ext_tseg_mbytes=None if ext in (0, MCH_HOST_BRIDGE_EXT_TSEG_MBYTES_QUERY) else ext,
        )
    return HostBridge(pam=_pam_modes(config, I440FX_PAM), smram=config[I440FX_SMRAM])


def host_bridge_reset(family: str) -> HostBridge:
    """The registers after reset (i440fx_pcihost_initfn/mch_reset): every PAM segment routed to PCI."""
    if family == FAMILY_Q35:
        return HostBridge((0,) * PAM_REGIONS_COUNT, MCH_HOST_BRIDGE_SMRAM_DEFAULT, MCH_HOST_BRIDGE_ESMRAMC_DEFAULT)
    return HostBridge((0,) * PAM_REGIONS_COUNT, 0x02)


@dataclass(frozen=True, slots=True)
class GuestPhysBlock:
    """One run of guest-physical RAM: [target_start, target_end) is ``idstr`` from ``offset`` on."""

    target_start: int
    target_end: int
    idstr: str
    offset: int

    @property
    def size(self) -> int:
        return self.target_end - self.target_start


@dataclass(frozen=True, slots=True)
class _Region:
    start: int
    end: int
    priority: int
    kind: str  # "ram", "io" (opaque, not RAM), "pci" (window into the PCI address space)
    idstr: str = ""
    offset: int = 0
    name: str = ""


@dataclass(slots=True)
class _Painter:
    system: list[_Region] = field(default_factory=list)
    pci: list[_Region] = field(default_factory=list)

    def resolve(self, addr: int) -> _Region | None:
        for region in self.system:
            if not region.start <= addr < region.end:
                continue
            if region.kind == "pci":
                hit = next((r for r in self.pci if r.start <= addr < r.end), None)
                if hit is None:
                    continue  # nothing in the PCI space here: lower priorities show through
                return hit if hit.kind == "ram" else None
            return region if region.kind == "ram" else None
        return None


def _sorted(regions: list[_Region]) -> list[_Region]:
    # higher priority first; among equals, the later added wins (memory_region_update_container_subregions)
    return [r for _, r in sorted(enumerate(regions), key=lambda ir: (-ir[1].priority, -ir[0]))]


# reference: mch_realize, mch_reset (has_smm_ranges), pc_q35_init (x86_machine_is_smm_enabled)
def mch_has_smm_ranges(bridge: HostBridge) -> bool:
    """The MCH made its SMRAM regions (the machine has SMM): its SMRAM register keeps C_BASE_SEG."""
    return bool(bridge.smram & SMRAM_C_BASE_SEG_MASK)


# reference: guest_phys_blocks_append, guest_phys_block_add_section, pc_memory_init, init_pam,
# pci_update_mappings (a BAR: memory_region_add_subregion_overlap(pci address space, addr, mr, 1))
def guest_phys_blocks(
    family: str,
    split: RamSplit,
    ram_block: str,
    *,
    bridge: HostBridge | None,
    bios: tuple[str, int] | None,
    option_rom: tuple[str, int] | None,
    vga: bool,
    smm: bool = True,
    bars: Sequence[GuestPhysBlock] = (),
) -> list[GuestPhysBlock]:
    """The guest-physical RAM blocks dump-guest-memory would list, in address order.

    ``bios`` and ``option_rom`` are (idstr, size) of ``pc.bios`` and ``pc.rom`` when the
    file has them; ``vga`` says a VGA device claims the legacy window 0xa0000-0xbffff.
    ``bridge`` None (unknown machine) leaves the legacy area to RAM. ``bars`` are the RAM
    regions mapped by PCI devices' BARs (in the PCI address space, at priority 1), in the
    order the devices mapped them. ``smm`` False: the machine has no SMM (q35 without SMRAM
    regions; a q35 bridge whose SMRAM register is 0 says so itself).
    """
    p = _Painter()
    below, above = split.below_4g_mem_size, split.above_4g_mem_size
    # the PCI address space (pc_pci_as_mapping_init maps it at priority -1)
    if option_rom is not None:
        p.pci.append(_Region(PC_ROM_MIN_VGA, PC_ROM_MIN_VGA + option_rom[1], 1, "ram", option_rom[0], 0, "pc.rom"))
    if bios is not None:
        isa = min(bios[1], ISA_BIOS_MAX)
        p.pci.append(_Region(MIB - isa, MIB, 1, "ram", bios[0], bios[1] - isa, "isa-bios"))
        p.pci.append(_Region(FOUR_GIB - bios[1], FOUR_GIB, 0, "ram", bios[0], 0, "pc.bios"))
    if vga:
        p.pci.append(_Region(0xA0000, 0xC0000, 1, "io", name="vga-lowmem"))
    for bar in bars:
        p.pci.append(_Region(bar.target_start, bar.target_end, 1, "ram", bar.idstr, bar.offset, "pci-bar"))
    p.pci = _sorted(p.pci)

    regions = [_Region(0, below, 0, "ram", ram_block, 0, "ram-below-4g")]
    if above:
        regions.append(_Region(split.above_4g_mem_start, split.above_4g_mem_start + above, 0, "ram", ram_block,
                               below, "ram-above-4g"))  # fmt: skip
    regions.append(_Region(0, 1 << 64, -1, "pci", name="pci"))
    if bridge is not None:
        regions += _bridge_regions(family, bridge, below, split.ram_size, ram_block, smm)
    p.system = _sorted(regions)

    cuts = sorted({0, 1 << 64} | {r.start for r in p.system + p.pci} | {r.end for r in p.system + p.pci})
    out: list[GuestPhysBlock] = []
    for a, b in itertools.pairwise(cuts):
        hit = p.resolve(a)
        if hit is None or a >= b:
            continue
        offset = hit.offset + (a - hit.start)
        last = out[-1] if out else None
        # guest_phys_block_add_section: continuity in guest-physical and host memory, same region
        if last is not None and last.target_end == a and last.idstr == hit.idstr and last.offset + last.size == offset:
            out[-1] = GuestPhysBlock(last.target_start, b, last.idstr, last.offset)
        else:
            out.append(GuestPhysBlock(a, b, hit.idstr, offset))
    return out


def _bridge_regions(family: str, bridge: HostBridge, below: int, ram_size: int, ram_block: str,
                    smm: bool) -> list[_Region]:  # fmt: skip
    out = []
    for idx, mode in enumerate(bridge.pam):
        start, size = (PAM_BIOS_BASE, PAM_BIOS_SIZE) if idx == 0 else (PAM_EXPAN_BASE + (idx - 1) * PAM_EXPAN_SIZE,
                                                                      PAM_EXPAN_SIZE)  # fmt: skip
        if mode == 0:
            out.append(_Region(start, start + size, 1, "pci", name="pam-pci"))
        elif start + size <= ram_size:  # pam-rom, pam-ram and the write-only alias all read the RAM
            out.append(_Region(start, start + size, 1, "ram", ram_block, start, "pam-ram"))
    if family == FAMILY_I440FX:
        # reference: i440fx_update_memory_mappings
        if not bridge.smram & SMRAM_D_OPEN:
            out.append(_Region(0xA0000, 0xC0000, 1, "pci", name="smram-region"))
        return out
    if family != FAMILY_Q35 or not smm or not mch_has_smm_ranges(bridge):
        return out  # mch_realize: no SMRAM regions; RAM shows in 0xa0000-0xbffff
    # reference: mch_update_smram (D_LCK clears D_OPEN)
    smram = bridge.smram & ~SMRAM_D_OPEN if bridge.smram & SMRAM_D_LCK else bridge.smram
    h_smrame = bool(bridge.esmramc & MCH_HOST_BRIDGE_ESMRAMC_H_SMRAME)
    if not smram & SMRAM_D_OPEN or h_smrame:
        out.append(_Region(MCH_HOST_BRIDGE_SMRAM_C_BASE, MCH_HOST_BRIDGE_SMRAM_C_BASE + MCH_HOST_BRIDGE_SMRAM_C_SIZE,
                           1, "pci", name="smram-region"))  # fmt: skip
    if smram & SMRAM_D_OPEN and h_smrame:
        out.append(_Region(OPEN_HIGH_SMRAM_ADDR, OPEN_HIGH_SMRAM_ADDR + MCH_HOST_BRIDGE_SMRAM_C_SIZE, 1, "ram",
                           ram_block, MCH_HOST_BRIDGE_SMRAM_C_BASE, "smram-open-high"))  # fmt: skip
    tseg = _tseg_size(bridge, smram)
    if tseg:
        out.append(_Region(below - tseg, below, 1, "io", name="tseg-blackhole"))
    # reference: mch_update_smbase_smram
    if bridge.f_smbase not in (MCH_HOST_BRIDGE_F_SMBASE_QUERY, MCH_HOST_BRIDGE_F_SMBASE_IN_RAM) and (
        bridge.f_smbase & MCH_HOST_BRIDGE_F_SMBASE_LCK
    ):
        out.append(_Region(MCH_HOST_BRIDGE_SMBASE_ADDR, MCH_HOST_BRIDGE_SMBASE_ADDR + MCH_HOST_BRIDGE_SMBASE_SIZE, 1,
                           "io", name="smbase-blackhole"))  # fmt: skip
    return out


def _tseg_size(bridge: HostBridge, smram: int) -> int:
    if not (bridge.esmramc & MCH_HOST_BRIDGE_ESMRAMC_T_EN and smram & SMRAM_G_SMRAME):
        return 0
    sz = (bridge.esmramc & MCH_HOST_BRIDGE_ESMRAMC_TSEG_SZ_MASK) >> 1
    if sz == 0:
        return 1 * MIB
    if sz == 1:
        return 2 * MIB
    if sz == 2:
        return 8 * MIB
    return (bridge.ext_tseg_mbytes or MCH_EXT_TSEG_MBYTES_DEFAULT) * MIB


def describe(blocks: Sequence[GuestPhysBlock]) -> list[str]:
    """One line per block, for messages."""
    return [f"{b.target_start:#x}-{b.target_end - 1:#x} {b.idstr}+{b.offset:#x}" for b in blocks]

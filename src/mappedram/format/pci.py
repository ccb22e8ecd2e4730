"""PCI devices in a migration file: their configuration space, their BARs, and the RAM they map.

A PCI device's section holds its 256-byte configuration space (VMSTATE_PCI_DEVICE: a
``PCIDevice`` struct in the vmdesc whose ``pci config`` field is the space; a virtio
proxy saves the same PCIDevice state first in its ``virtio`` field). The COMMAND
register and the BAR registers say where each BAR sits, as ``pci_bar_address`` decides.
RAM blocks registered with the device (idstr ``DDDD:BB:SS.F/name``) are found behind
the BARs the device's realize function gave them (``PCI_RAM_BARS``); option ROMs
(``name.rom``, pci_add_option_rom) sit behind the ROM BAR.

A device on the root bus maps its BARs into the PCI address space itself; behind a
PCI-PCI bridge (or a PCIe root port) a BAR shows only where it falls inside the bridge's
memory and prefetchable windows (``bridge_windows``), at every level of the path.

References:
    QEMU hw/pci/pci.c (pci_bar, pci_config_get_bar_addr, pci_bar_address,
    pci_update_mappings, pcibus_get_dev_path, pci_add_option_rom, pci_device_save),
    hw/pci/pci_bridge.c (pci_bridge_get_base, pci_bridge_get_limit, pci_bridge_init_alias,
    pci_bridge_region_init), include/hw/pci/pci_regs.h, hw/display/vga-pci.c, bochs-display.c, vmware_vga.c,
    virtio-vga.c, ati.c, qxl.c, cirrus_vga.c, hw/virtio/virtio-pci.c
    (virtio_pci_save_config), hw/virtio/virtio.c (virtio_save).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .vmstate import field_spans

__all__ = [
    "PCI_COMMAND",
    "PCI_COMMAND_IO",
    "PCI_COMMAND_MEMORY",
    "PCI_CLASS_DEVICE",
    "PCI_CLASS_DISPLAY_VGA",
    "PCI_BASE_ADDRESS_0",
    "PCI_ROM_ADDRESS",
    "PCI_ROM_ADDRESS1",
    "PCI_ROM_SLOT",
    "PCI_BASE_ADDRESS_SPACE_IO",
    "PCI_BASE_ADDRESS_MEM_TYPE_64",
    "PCI_BASE_ADDRESS_MEM_PREFETCH",
    "PCI_ROM_ADDRESS_ENABLE",
    "PCI_CONFIG_SPACE_SIZE",
    "PCI_RAM_BARS",
    "BAR_LINEAR_MODE",
    "QXL_VRAM32_BAR",
    "QXL_VRAM64_BAR",
    "PciPath",
    "BarPlacement",
    "split_dev_path",
    "parent_paths",
    "bridge_windows",
    "bridge_forwards_vga",
    "clip_to_windows",
    "pci_config",
    "pci_bar",
    "bar_type",
    "pci_bar_address",
    "bar_rule",
    "class_code",
]

# include/hw/pci/pci_regs.h
PCI_VENDOR_ID = 0x00
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_BRIDGE = 1
PCI_HEADER_TYPE_MULTI_FUNCTION = 0x80
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_ROM_ADDRESS = 0x30
PCI_ROM_ADDRESS1 = 0x38
PCI_ROM_ADDRESS_ENABLE = 0x01
PCI_CLASS_DISPLAY_VGA = 0x0300
PCI_MEMORY_BASE = 0x20
PCI_MEMORY_LIMIT = 0x22
PCI_MEMORY_RANGE_MASK = ~0x0F & 0xFFFF
PCI_PREF_MEMORY_BASE = 0x24
PCI_PREF_MEMORY_LIMIT = 0x26
PCI_PREF_RANGE_MASK = ~0x0F & 0xFFFF
PCI_PREF_RANGE_TYPE_64 = 0x01
PCI_PREF_BASE_UPPER32 = 0x28
PCI_PREF_LIMIT_UPPER32 = 0x2C
PCI_BRIDGE_CONTROL = 0x3E
PCI_BRIDGE_CTL_VGA = 0x08
PCI_CONFIG_SPACE_SIZE = 0x100
# include/hw/pci/pci.h
PCI_ROM_SLOT = 6
PCI_NUM_REGIONS = 7
PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4  # every virtio-pci device
_U64 = (1 << 64) - 1
PCI_BAR_UNMAPPED = _U64
HWADDR_MAX = _U64
UINT32_MAX = 0xFFFFFFFF

#: A RAM block shows in the BAR only while the device's registers select the linear mode
#: (cirrus_update_memory_access maps vga.vram into BAR0 then); the registers are not decoded.
BAR_LINEAR_MODE = -1

#: (device vmsd name, RAM block name) -> the BARs whose region is that RAM block, from its
#: offset 0, as each device's realize function registers them (pci_register_bar).
PCI_RAM_BARS: Mapping[tuple[str, str], tuple[int, ...]] = {
    ("vga", "vga.vram"): (0,),  # pci_std_vga_realize, pci_secondary_vga_realize
    ("bochs-display", "bochs-display-vram"): (0,),  # bochs_display_realize
    ("virtio-vga", "vga.vram"): (0,),  # virtio_vga_base_realize
    ("ati-vga", "vga.vram"): (0,),  # ati_vga_realize (vram at offset 0 of the linear aperture)
    ("vmware_vga", "vga.vram"): (1,),  # pci_vmsvga_realize
    ("vmware_vga", "vmsvga.fifo"): (2,),
    ("qxl", "vga.vram"): (0,),  # qxl_realize_common: QXL_RAM_RANGE_INDEX (qxl-vga)
    ("qxl", "qxl.vgavram"): (0,),  # qxl_realize_secondary
    ("qxl", "qxl.vrom"): (2,),  # QXL_ROM_RANGE_INDEX
    ("qxl", "qxl.vram"): (1, 4),  # QXL_VRAM_RANGE_INDEX (vram32 alias), QXL_VRAM64_RANGE_INDEX
    ("cirrus_vga", "vga.vram"): (BAR_LINEAR_MODE,),  # pci_cirrus_vga_realize: BAR0 is cirrus-pci-bar0
}
#: qxl's BAR1 is an alias of the first vram32_size bytes of qxl.vram (a property, not in
#: the file); it is the whole block only when BAR4 (the 64-bit one) is not registered.
QXL_VRAM32_BAR = 1
QXL_VRAM64_BAR = 4

# pcibus_get_dev_path: "Domain:00:Slot.Function" then ":Slot.Function" for each bridge
_DEV_PATH = re.compile(r"^([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])((?::[0-9a-f]{2}\.[0-7])*)/(.+)$")


@dataclass(frozen=True, slots=True)
class PciPath:
    """A qdev path of a PCI device (``0000:00:02.0``), and the name registered under it."""

    path: str
    name: str
    behind_bridge: bool  # the path has more than one Slot.Function: a bridge is in between


@dataclass(frozen=True, slots=True)
class BarPlacement:
    """Where a BAR of a device maps: ``address`` (None: unmapped, ``reason`` says why)."""

    bar: int
    address: int | None
    reason: str = ""


# reference: pcibus_get_dev_path, vmstate_register_ram (idstr = "<dev path>/<name>")
def split_dev_path(idstr: str) -> PciPath | None:
    """The PCI device path and the name of a section or RAM block idstr, or None if it has none."""
    m = _DEV_PATH.match(idstr)
    if m is None:
        return None
    return PciPath(m[1] + m[2], m[3], bool(m[2]))


def parent_paths(path: str) -> list[str]:
    """The paths of the bridges between the root bus and the device at ``path``, root first."""
    root, *slots = re.findall(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]|:[0-9a-f]{2}\.[0-7]", path)
    return ["".join([root, *slots[:k]]) for k in range(len(slots))]


def _bridge_base(config: bytes, base: int, upper: int | None) -> int:
    # reference: pci_config_get_memory_base, pci_config_get_pref_base
    word = _le(config, base, 2)
    if upper is None:
        return (word & PCI_MEMORY_RANGE_MASK) << 16
    val = (word & PCI_PREF_RANGE_MASK) << 16
    if word & PCI_PREF_RANGE_TYPE_64:
        val |= _le(config, upper, 4) << 32
    return val


# reference: pci_bridge_region_init, pci_bridge_init_alias, pci_bridge_get_base, pci_bridge_get_limit
def bridge_windows(config: bytes) -> list[tuple[int, int]]:
    """The [start, end) ranges of the bridge's secondary memory space it forwards (prefetchable, then memory).

    Empty when the bridge's COMMAND register disables memory space or both windows are
    closed (limit below base).
    """
    if not _le(config, PCI_COMMAND, 2) & PCI_COMMAND_MEMORY:
        return []
    out = []
    for base_at, limit_at, upper in ((PCI_PREF_MEMORY_BASE, PCI_PREF_MEMORY_LIMIT, (PCI_PREF_BASE_UPPER32,
                                      PCI_PREF_LIMIT_UPPER32)), (PCI_MEMORY_BASE, PCI_MEMORY_LIMIT, None)):  # fmt: skip
        base = _bridge_base(config, base_at, upper[0] if upper else None)
        limit = _bridge_base(config, limit_at, upper[1] if upper else None) | 0xFFFFF
        if limit >= base:
            out.append((base, limit + 1))
    return out


# reference: pci_bridge_init_vga_aliases, pci_update_vga
def bridge_forwards_vga(config: bytes) -> bool:
    """The bridge forwards the legacy VGA window 0xa0000-0xbffff (VGA Enable, memory space on)."""
    return bool(_le(config, PCI_BRIDGE_CONTROL, 2) & PCI_BRIDGE_CTL_VGA and _le(config, PCI_COMMAND, 2)
                & PCI_COMMAND_MEMORY)  # fmt: skip


def clip_to_windows(start: int, end: int, windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) inside the union of ``windows``, in address order."""
    cuts = sorted((max(start, a), min(end, b)) for a, b in windows if max(start, a) < min(end, b))
    out: list[tuple[int, int]] = []
    for a, b in cuts:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _pci_device_config(fields: list[object], body: bytes, base: int) -> bytes | None:
    """The ``pci config`` field of a PCIDevice struct's fields, from ``base`` in ``body``."""
    for entry, span in zip(fields, field_spans(fields, base)):
        if isinstance(entry, dict) and entry.get("type") == "pci config" and span.size >= PCI_CONFIG_SPACE_SIZE:
            return body[span.offset : span.offset + PCI_CONFIG_SPACE_SIZE]
    return None


# reference: vmstate_pci_device (VMSTATE_PCI_DEVICE), virtio_pci_save_config, pci_device_save
def pci_config(fields: object, body: bytes) -> bytes | None:
    """The 256-byte configuration space in a device section body, found with its vmdesc fields.

    A top-level struct of vmsd ``PCIDevice`` holds it in its ``pci config`` field; a
    ``virtio`` field starts with the proxy's PCIDevice state (``version_id``, then the
    space), which virtio_save writes first. None when neither is there (or does not fit).
    """
    if not isinstance(fields, list):
        return None
    for entry, span in zip(fields, field_spans(fields)):
        if not isinstance(entry, dict):
            continue
        struct = entry.get("struct")
        if isinstance(struct, dict) and struct.get("vmsd_name") == "PCIDevice" and span.struct_fields is not None:
            config = _pci_device_config(list(span.struct_fields), body, span.offset)
            if config is not None and len(config) == PCI_CONFIG_SPACE_SIZE:
                return config
        if entry.get("type") == "virtio" and span.size >= 4 + PCI_CONFIG_SPACE_SIZE:
            config = body[span.offset + 4 : span.offset + 4 + PCI_CONFIG_SPACE_SIZE]
            vendor = int.from_bytes(config[PCI_VENDOR_ID : PCI_VENDOR_ID + 2], "little")
            if len(config) == PCI_CONFIG_SPACE_SIZE and vendor == PCI_VENDOR_ID_REDHAT_QUMRANET:
                return config
    return None


def _le(config: bytes, at: int, size: int) -> int:
    return int.from_bytes(config[at : at + size], "little")


def class_code(config: bytes) -> int:
    """The class code (base class and sub-class) of the device, e.g. 0x0300 for a VGA controller."""
    return _le(config, PCI_CLASS_DEVICE, 2)


# reference: pci_bar
def pci_bar(config: bytes, reg: int) -> int:
    """The configuration-space offset of BAR ``reg`` (the ROM BAR of a bridge is at 0x38)."""
    if reg != PCI_ROM_SLOT:
        return PCI_BASE_ADDRESS_0 + reg * 4
    header = config[PCI_HEADER_TYPE] & ~PCI_HEADER_TYPE_MULTI_FUNCTION
    return PCI_ROM_ADDRESS1 if header == PCI_HEADER_TYPE_BRIDGE else PCI_ROM_ADDRESS


def bar_type(config: bytes, reg: int) -> int:
    """The BAR's type bits as pci_register_bar wrote them (read-only in the register; 0 for the ROM)."""
    if reg == PCI_ROM_SLOT:
        return 0
    low = config[pci_bar(config, reg)]
    return low & PCI_BASE_ADDRESS_SPACE_IO if low & PCI_BASE_ADDRESS_SPACE_IO else low & 0x0F


# reference: pci_bar_address, pci_config_get_bar_addr
def pci_bar_address(config: bytes, reg: int, size: int, *, allow_0_address: bool = False) -> BarPlacement:
    """Where QEMU maps BAR ``reg`` of ``size`` bytes (a power of two) given the configuration space.

    Unmapped when the COMMAND register does not enable the BAR's space, the ROM BAR's
    enable bit is clear, or the address is not valid: 0 (x86 machines do not allow it),
    wrapping, all ones, a 32-bit BAR reaching 4 GiB, or the end of the address space.
    """
    if len(config) < PCI_CONFIG_SPACE_SIZE or not 0 <= reg < PCI_NUM_REGIONS:
        raise ValueError(f"BAR {reg} of a {len(config)}-byte configuration space")
    if size <= 0 or size & (size - 1):
        raise ValueError(f"BAR size {size:#x} is not a power of two")
    cmd = _le(config, PCI_COMMAND, 2)
    kind = bar_type(config, reg)
    at = pci_bar(config, reg)
    mask = ~(size - 1) & _U64
    if kind & PCI_BASE_ADDRESS_SPACE_IO:
        if not cmd & PCI_COMMAND_IO:
            return BarPlacement(reg, None, "I/O space disabled in the COMMAND register")
        return BarPlacement(reg, None, "an I/O BAR")  # not in the memory address space
    if not cmd & PCI_COMMAND_MEMORY:
        return BarPlacement(reg, None, "memory space disabled in the COMMAND register")
    wide = bool(kind & PCI_BASE_ADDRESS_MEM_TYPE_64)
    new_addr = _le(config, at, 8 if wide else 4)
    if reg == PCI_ROM_SLOT and not new_addr & PCI_ROM_ADDRESS_ENABLE:
        return BarPlacement(reg, None, "the ROM BAR is not enabled")
    new_addr &= mask
    last_addr = (new_addr + size - 1) & _U64
    if last_addr <= new_addr or last_addr == PCI_BAR_UNMAPPED or (not allow_0_address and new_addr == 0):
        return BarPlacement(reg, None, f"the BAR address {new_addr:#x} is not valid (0, wrapping or all ones)")
    if not wide and last_addr >= UINT32_MAX:
        return BarPlacement(reg, None, f"the 32-bit BAR at {new_addr:#x} reaches 4 GiB")
    if last_addr >= HWADDR_MAX:
        return BarPlacement(reg, None, f"the BAR at {new_addr:#x} reaches the end of the address space")
    return BarPlacement(reg, new_addr)


def bar_rule(kinds: Iterable[str], name: str, config: bytes | None = None) -> tuple[int, ...] | None:
    """The BARs showing RAM block ``name`` of a device whose sections have the vmsd names ``kinds``.

    An option ROM (``name.rom``) is behind the ROM BAR. None: no device rule knows the block.
    ``BAR_LINEAR_MODE`` in the result: the block shows only in a mode not decoded here.
    With the configuration space, qxl's vram is placed in BAR4 when that BAR exists (its
    type bits are set) and in BAR1 only otherwise, where BAR1 covers the whole block.
    """
    kinds = set(kinds)
    for kind in sorted(kinds):
        bars = PCI_RAM_BARS.get((kind, name))
        if bars is None:
            continue
        if kind == "qxl" and name == "qxl.vram" and config is not None:
            return (QXL_VRAM64_BAR,) if bar_type(config, QXL_VRAM64_BAR) else (QXL_VRAM32_BAR,)
        return bars
    if name.endswith(".rom"):
        return (PCI_ROM_SLOT,)  # pci_add_option_rom: "<vmsd or type name>.rom", pci_register_bar(PCI_ROM_SLOT)
    return None

"""RAM behind PCI BARs, from a migration file's device state: which block each device maps, and where.

A RAM block owned by a PCI device (vga.vram behind the VGA's BAR0, ROMs behind the ROM
BAR, ...) shows in the guest-physical map where the device's config space, saved in its
device section, puts the BAR: when memory space (or the ROM BAR) is enabled, the address
valid, and every bridge above forwards it, as QEMU's pci_update_mappings decides. The
rules of which block sits behind which BAR are format/pci.py's (``PCI_RAM_BARS``).
Blocks that QEMU would not map either are listed with a note; those that may be mapped
but cannot be placed, with a warning (the export may then differ from dump-guest-memory).

References:
    QEMU hw/pci/pci.c (pci_update_mappings, pci_bar_address), hw/pci/pci_bridge.c,
    hw/display/vga-pci.c, hw/display/bochs-display.c, hw/display/vmware_vga.c, hw/display/qxl.c.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mappedram.errors import FormatError
from mappedram.format.pci import (
    BAR_LINEAR_MODE,
    PCI_CLASS_DISPLAY_VGA,
    PCI_RAM_BARS,
    PCI_ROM_SLOT,
    QXL_VRAM64_BAR,
    bar_rule,
    bridge_forwards_vga,
    bridge_windows,
    class_code,
    clip_to_windows,
    parent_paths,
    pci_bar_address,
    pci_config,
    split_dev_path,
)
from mappedram.format.x86map import GuestPhysBlock
from mappedram.image import MigrationFile, RamBlock

__all__ = ["BarMap", "PciDevice", "legacy_vga", "pci_devices", "place_bars", "section_bodies"]


def section_bodies(mf: MigrationFile, vmsd_name: str) -> list[tuple[int, bytes, object]]:
    """(instance_id, body, vmdesc fields) of every device section of ``vmsd_name``, in stream order."""
    if mf.vmdesc is None or mf.device_sections is None:
        return []
    wanted = [(s, d) for s, d in zip(mf.device_sections, mf.vmdesc.devices) if d.get("vmsd_name") == vmsd_name]
    if not wanted:
        return []
    blob = mf.device_state()
    out = []
    for section, desc in wanted:
        at = section.body_offset - mf.device_state_offset
        out.append((section.instance_id, blob[at : at + section.body_length], desc.get("fields")))
    return out


@dataclass(frozen=True, slots=True)
class PciDevice:
    """A PCI device of the file: its qdev path, the vmsd names of its sections, its configuration space."""

    path: str
    kinds: frozenset[str]
    config: bytes | None


def pci_devices(mf: MigrationFile) -> dict[str, PciDevice]:
    """The PCI devices with a section named by a device path (``0000:00:02.0/vga``), by path."""
    if mf.vmdesc is None or mf.device_sections is None:
        return {}
    blob: bytes | None = None
    kinds: dict[str, set[str]] = {}
    configs: dict[str, bytes] = {}
    for section, desc in zip(mf.device_sections, mf.vmdesc.devices):
        where = split_dev_path(section.idstr)
        if where is None:
            continue
        vmsd = desc.get("vmsd_name")
        kinds.setdefault(where.path, set()).add(vmsd if isinstance(vmsd, str) else where.name)
        if where.path in configs:
            continue
        if blob is None:
            blob = mf.device_state()
        at = section.body_offset - mf.device_state_offset
        try:
            config = pci_config(desc.get("fields"), blob[at : at + section.body_length])
        except FormatError:
            config = None  # a vmdesc entry that does not describe its fields
        if config is not None:
            configs[where.path] = config
    return {path: PciDevice(path, frozenset(k), configs.get(path)) for path, k in kinds.items()}


def _pow2ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(slots=True)
class BarMap:
    """The outcome of placing the RAM blocks PCI devices map."""

    bars: list[GuestPhysBlock] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)  # one line per placed region
    unmapped: list[str] = field(default_factory=list)  # blocks QEMU does not map either
    unknown: list[str] = field(default_factory=list)  # blocks that may be mapped, but cannot be placed
    claimed: set[str] = field(default_factory=set)  # blocks a device rule accounts for


def _owner(block: RamBlock, devices: dict[str, PciDevice], names: set[str]) -> tuple[PciDevice | None, str] | None:
    """The device mapping ``block`` and the block's name under it; None if no PCI device registers it.

    A block named without a device path (a global name: ``vmsvga.fifo``, or ``vga.vram``
    with ``global-vmstate``) belongs to the one device whose rules know that name and that
    has no block of that name under its own path.
    """
    where = split_dev_path(block.idstr)
    if where is not None:
        return devices.get(where.path), where.name
    if not any(name == block.idstr for _, name in PCI_RAM_BARS):
        return None
    candidates = [d for d in devices.values() if any((k, block.idstr) in PCI_RAM_BARS for k in d.kinds)
                  and f"{d.path}/{block.idstr}" not in names]  # fmt: skip
    return (candidates[0] if len(candidates) == 1 else None), block.idstr


# reference: pci_update_mappings, pci_bar_address, pci_register_bar
def place_bars(mf: MigrationFile, devices: dict[str, PciDevice]) -> BarMap:
    out = BarMap()
    names = {b.idstr for b in mf.blocks}
    for block in mf.blocks:
        owned = _owner(block, devices, names)
        if owned is None:
            continue
        dev, name = owned
        out.claimed.add(block.idstr)
        if dev is None:
            out.unknown.append(f"{block.idstr} (no section of its PCI device, so no configuration space)")
            continue
        label = f"{dev.path} ({', '.join(sorted(dev.kinds))})"
        if dev.config is None:
            out.unknown.append(f"{block.idstr} ({label}: no PCI configuration space in its sections)")
            continue
        rule = bar_rule(dev.kinds, name, dev.config)
        if rule is None:
            out.unknown.append(f"{block.idstr} ({label}: no rule says which BAR maps it)")
            continue
        windows, why = _bridge_path(dev, devices)
        if windows is None:
            out.unknown.append(f"{block.idstr} ({label}: {why})")
            continue
        size = _pow2ceil(block.used_length)
        for bar in rule:
            if bar == BAR_LINEAR_MODE:
                lfb = pci_bar_address(dev.config, 0, size)
                where_text = "unmapped" if lfb.address is None else f"mapped at {lfb.address:#x}"
                line = f"{block.idstr} ({label}: in BAR0 only in linear mode, not decoded; BAR0 is {where_text})"
                (out.unmapped if lfb.address is None else out.unknown).append(line)
                continue
            if bar == QXL_VRAM64_BAR and "qxl" in dev.kinds:
                out.unknown.append(f"{block.idstr} ({label}: its 32-bit alias in BAR1 has vram32_size bytes, "
                                   "a device property not in the file)")  # fmt: skip
            mapping = pci_bar_address(dev.config, bar, size)
            what = "ROM BAR" if bar == PCI_ROM_SLOT else f"BAR{bar}"
            if mapping.address is None:
                out.unmapped.append(f"{block.idstr} ({what} of {label}: {mapping.reason})")
                continue
            start, end = mapping.address, mapping.address + block.used_length
            pieces = [(start, end)]
            for level in windows:  # pci_bridge_init_alias: only the windows of each bridge reach its parent bus
                pieces = [c for a, b in pieces for c in clip_to_windows(a, b, level)]
            if not pieces:
                out.unmapped.append(f"{block.idstr} ({what} of {label} at {start:#x}: outside its bridges' windows)")
                continue
            out.bars += [GuestPhysBlock(a, b, block.idstr, a - start) for a, b in pieces]
            shown = "" if pieces == [(start, end)] else " (as far as its bridges' windows reach)"
            out.placed.append(f"{block.idstr} at {start:#x} ({what} of {label}){shown}")
    return out


def _bridge_path(dev: PciDevice, devices: dict[str, PciDevice]) -> tuple[list[list[tuple[int, int]]] | None, str]:
    """The memory windows of each bridge between the root bus and ``dev``, or None and why not."""
    levels = []
    for path in parent_paths(dev.path):
        bridge = devices.get(path)
        if bridge is None or bridge.config is None:
            return None, f"behind the PCI bridge {path}, whose configuration space is not in the file"
        levels.append(bridge_windows(bridge.config))
    return levels, ""


def legacy_vga(mf: MigrationFile, devices: dict[str, PciDevice]) -> str | None:
    """The device whose legacy VGA window (vga-lowmem) is at 0xa0000, or None.

    vga_init maps it for the PCI VGA controllers (class 0x0300); secondary displays
    (secondary-vga, bochs-display: class 0x0380) have none. Behind bridges it reaches the
    root bus only through bridges that forward VGA. A ``vga.vram`` block whose device has
    no decodable configuration space is taken to have one.
    """
    names = {b.idstr for b in mf.blocks}
    for path, dev in sorted(devices.items()):
        if dev.config is None or class_code(dev.config) != PCI_CLASS_DISPLAY_VGA:
            continue
        bridges = [devices.get(b) for b in parent_paths(path)]
        if all(b is not None and b.config is not None and bridge_forwards_vga(b.config) for b in bridges):
            return f"{path} ({', '.join(sorted(dev.kinds))})"
    for b in mf.blocks:
        if b.idstr.endswith("vga.vram"):
            owned = _owner(b, devices, names)
            if owned is None or owned[0] is None or owned[0].config is None:
                return b.idstr
    return None

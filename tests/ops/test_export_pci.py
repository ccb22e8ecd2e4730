"""RAM behind PCI BARs in the export: the BAR decoder (format/pci.py), the map's PCI space, and the rules.

The BAR rules follow QEMU's pci_bar_address; the cases with real QEMU (default devices,
SeaBIOS run or BARs programmed through the configuration ports) are in test_export.py.
Here: golden configuration spaces, and files whose device sections are built by hand, so
every reason a block stays unplaced is seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.format.pci import (
    BAR_LINEAR_MODE,
    PCI_ROM_SLOT,
    PciPath,
    bar_rule,
    bridge_forwards_vga,
    bridge_windows,
    clip_to_windows,
    parent_paths,
    pci_bar_address,
    pci_config,
    split_dev_path,
)
from mappedram.format.vmstate import DeviceRecord, encode_device_state, encode_vmdesc_json
from mappedram.format.x86map import (
    FAMILY_I440FX,
    FAMILY_Q35,
    GuestPhysBlock,
    HostBridge,
    guest_phys_blocks,
    host_bridge_reset,
    mch_has_smm_ranges,
    ram_split,
)
from mappedram.ops import EngineOptions
from mappedram.ops.guestphys import guest_memory_map

MIB = 1 << 20
GIB = 1 << 30


def _config(*, command: int = 0x2, bars: dict[int, int] | None = None, header: int = 0, vendor: int = 0x1234,
            klass: int = 0x0300, extra: dict[int, bytes] | None = None) -> bytes:  # fmt: skip
    """A 256-byte configuration space: ``bars`` maps a config offset to a dword (BARs 0x10.., ROM 0x30)."""
    c = bytearray(256)
    c[0:2] = vendor.to_bytes(2, "little")
    c[4:6] = command.to_bytes(2, "little")
    c[0x0A:0x0C] = klass.to_bytes(2, "little")
    c[0x0E] = header
    for at, value in (bars or {}).items():
        c[at : at + 4] = value.to_bytes(4, "little")
    for at, raw in (extra or {}).items():
        c[at : at + len(raw)] = raw
    return bytes(c)


# -- pci_bar_address --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "bars", "reg", "size", "address", "reason"),
    [
        (0x2, {0x10: 0xFD000008}, 0, 16 * MIB, 0xFD000000, ""),  # 32-bit prefetchable: type bits masked
        (0x0, {0x10: 0xFD000008}, 0, 16 * MIB, None, "memory space disabled"),
        (0x1, {0x10: 0xFD000008}, 0, 16 * MIB, None, "memory space disabled"),  # I/O only
        (0x2, {0x10: 0x00000008}, 0, 16 * MIB, None, "not valid"),  # address 0
        (0x2, {0x10: 0xFF000000}, 0, 16 * MIB, None, "reaches 4 GiB"),  # last byte 0xffffffff
        (0x2, {0x10: 0xFFFFFFF0}, 0, 16, None, "reaches 4 GiB"),
        (0x2, {0x18: 0x0000000C, 0x1C: 0x8}, 2, 16 * MIB, 0x8_0000_0000, ""),  # 64-bit: two dwords
        (0x2, {0x18: 0xFF00000C, 0x1C: 0xFFFFFFFF}, 2, 16 * MIB, None, "not valid"),  # ends at all ones
        (0x2, {0x18: 0xFE00000C, 0x1C: 0xFFFFFFFF}, 2, 16 * MIB, 0xFFFFFFFF_FE000000, ""),  # QEMU takes it
        (0x2, {0x30: 0xFEBE0000}, PCI_ROM_SLOT, 0x10000, None, "ROM BAR is not enabled"),
        (0x2, {0x30: 0xFEBE0001}, PCI_ROM_SLOT, 0x10000, 0xFEBE0000, ""),
        (0x3, {0x14: 0xC001}, 1, 0x40, None, "an I/O BAR"),
        (0x2, {}, 4, 0x1000, None, "not valid"),  # an unregistered BAR reads 0
    ],
)
def test_pci_bar_address_is_qemus(command: int, bars: dict[int, int], reg: int, size: int, address: int | None,
                                  reason: str) -> None:  # fmt: skip
    got = pci_bar_address(_config(command=command, bars=bars), reg, size)
    assert got.address == address and reason in got.reason, got


def test_bridge_rom_bar_and_windows() -> None:
    # a type-1 header: the ROM BAR is at 0x38; windows as a SeaBIOS-programmed root port
    config = _config(header=0x81, bars={0x38: 0xFE800001, 0x30: 0}, klass=0x0604, extra={
        0x20: (0xFE80).to_bytes(2, "little") + (0xFE90).to_bytes(2, "little"),  # memory: 0xfe800000-0xfe9fffff
        0x24: (0xFD01).to_bytes(2, "little") + (0xFDF1).to_bytes(2, "little"),  # 64-bit prefetchable
        0x28: (0).to_bytes(4, "little") + (0).to_bytes(4, "little"),
        0x3E: (0x0008).to_bytes(2, "little"),  # VGA Enable
    })  # fmt: skip
    assert pci_bar_address(config, PCI_ROM_SLOT, 0x1000).address == 0xFE800000
    assert bridge_windows(config) == [(0xFD000000, 0xFE000000), (0xFE800000, 0xFEA00000)]
    assert bridge_forwards_vga(config)
    closed = bytearray(config)
    closed[4] = 0  # memory space off: no window reaches the parent bus
    assert bridge_windows(bytes(closed)) == [] and not bridge_forwards_vga(bytes(closed))
    closed = bytearray(config)
    closed[0x24:0x28] = (0xFFF1).to_bytes(2, "little") + (0x0001).to_bytes(2, "little")  # limit below base
    assert bridge_windows(bytes(closed)) == [(0xFE800000, 0xFEA00000)]
    assert clip_to_windows(0xFDF00000, 0xFEC00000, bridge_windows(config)) == [(0xFDF00000, 0xFE000000),
                                                                             (0xFE800000, 0xFEA00000)]  # fmt: skip
    assert clip_to_windows(0, 0x1000, [(0x2000, 0x3000)]) == []
    assert clip_to_windows(0, 0x3000, [(0, 0x1000), (0x800, 0x2000)]) == [(0, 0x2000)]


def test_dev_paths() -> None:
    assert split_dev_path("0000:00:02.0/vga.vram") == PciPath("0000:00:02.0", "vga.vram", False)
    where = split_dev_path("0000:00:05.0:00.0:03.1/e1000.rom")
    assert where is not None and (where.path, where.name, where.behind_bridge) == ("0000:00:05.0:00.0:03.1",
                                                                                   "e1000.rom", True)  # fmt: skip
    assert parent_paths("0000:00:05.0:00.0:03.1") == ["0000:00:05.0", "0000:00:05.0:00.0"]
    assert parent_paths("0000:00:02.0") == []
    for name in ("pc.ram", "vga.vram", "/rom@etc/acpi/tables", "0000:00:02.0"):
        assert split_dev_path(name) is None


def test_bar_rules() -> None:
    assert bar_rule({"vga"}, "vga.vram") == (0,)
    assert bar_rule({"virtio-gpu", "virtio-vga"}, "vga.vram") == (0,)
    assert bar_rule({"vmware_vga"}, "vga.vram") == (1,) and bar_rule({"vmware_vga"}, "vmsvga.fifo") == (2,)
    assert bar_rule({"bochs-display"}, "bochs-display-vram") == (0,)
    assert bar_rule({"e1000"}, "e1000.rom") == (PCI_ROM_SLOT,) and bar_rule({"vga"}, "vga.rom") == (PCI_ROM_SLOT,)
    assert bar_rule({"cirrus_vga"}, "vga.vram") == (BAR_LINEAR_MODE,)
    assert bar_rule({"qxl"}, "qxl.vrom") == (2,)
    assert bar_rule({"qxl"}, "qxl.vram", _config(bars={0x20: 0x0000000C})) == (4,)  # BAR4 registered (64-bit)
    assert bar_rule({"qxl"}, "qxl.vram", _config()) == (1,)  # vram32_size == vram_size: BAR1 is all of it
    assert bar_rule({"ivshmem-plain"}, "shm0") is None


def _pci_section(config: bytes, field: str = "parent_obj", rest: tuple[dict[str, Any], ...] = ()) -> tuple[
        bytes, tuple[dict[str, Any], ...]]:  # fmt: skip
    """A VMSTATE_PCI_DEVICE field (version_id, config, irq_state) as body and vmdesc fields."""
    pci = {"vmsd_name": "PCIDevice", "version": 2, "fields": [
        {"name": "version_id", "type": "int32 le", "size": 4}, {"name": "config[0]", "type": "pci config", "size": 256},
        {"name": "irq_state", "type": "pci irq state", "size": 16}]}  # fmt: skip
    body = (2).to_bytes(4, "big") + config + bytes(16) + bytes(sum(f["size"] for f in rest))
    return body, ({"name": field, "type": "struct", "struct": pci, "size": 276}, *rest)


def test_pci_config_in_a_section_body() -> None:
    config = _config(bars={0x10: 0xFD000008})
    body, fields = _pci_section(config, "dev", ({"name": "vga", "type": "buffer", "size": 8},))
    assert pci_config(json.loads(json.dumps(list(fields))), body) == config
    virtio = _config(vendor=0x1AF4)  # virtio_save: the proxy's PCIDevice state first
    blob = (2).to_bytes(4, "big") + virtio + bytes(16) + b"\x01" * 100
    assert pci_config([{"name": "virtio", "type": "virtio", "size": len(blob)}], blob) == virtio
    not_virtio = blob[:4] + _config() + blob[260:]  # not a virtio device's configuration space
    assert pci_config([{"name": "virtio", "type": "virtio", "size": len(blob)}], not_virtio) is None
    assert pci_config([{"name": "x", "type": "uint32", "size": 4}], b"\0" * 4) is None
    assert pci_config(None, b"") is None


# -- the map's PCI address space ---------------------------------------------------------


def test_q35_without_smm_ranges_shows_ram_in_the_vga_window() -> None:
    split = ram_split(FAMILY_Q35, None, 64 * MIB)
    no_smm = HostBridge((0,) * 13, smram=0, esmramc=0)  # mch_reset without has_smm_ranges
    assert not mch_has_smm_ranges(no_smm) and mch_has_smm_ranges(host_bridge_reset(FAMILY_Q35))
    got = guest_phys_blocks(FAMILY_Q35, split, "m0", bridge=no_smm, bios=("pc.bios", 0x40000),
                            option_rom=("pc.rom", 0x20000), vga=True)  # fmt: skip
    assert got[:2] == [GuestPhysBlock(0, 0xC0000, "m0", 0), GuestPhysBlock(0xC0000, 0xE0000, "pc.rom", 0)]
    with_smm = guest_phys_blocks(FAMILY_Q35, split, "m0", bridge=host_bridge_reset(FAMILY_Q35), bios=None,
                                 option_rom=None, vga=True)  # fmt: skip
    assert with_smm[0] == GuestPhysBlock(0, 0xA0000, "m0", 0)  # smram-region shows vga-lowmem
    # i440FX has its smram-region either way: an SMRAM register of 0 is closed
    pc = guest_phys_blocks(FAMILY_I440FX, ram_split(FAMILY_I440FX, None, 64 * MIB), "m0",
                           bridge=HostBridge((0,) * 13, smram=0), bios=None, option_rom=None, vga=True)  # fmt: skip
    assert pc[0] == GuestPhysBlock(0, 0xA0000, "m0", 0)


def test_bars_are_windows_of_the_pci_space() -> None:
    split = ram_split(FAMILY_Q35, None, 56 * MIB)
    bridge = HostBridge((3,) * 13, smram=0x0A, esmramc=0x38)  # as SeaBIOS leaves it
    # vga.vram above RAM; bochs-display's half over RAM (priority 0 wins); a ROM over pc.bios (priority 1 wins)
    bars = [GuestPhysBlock(0xFD000000, 0xFE000000, "0000:00:01.0/vga.vram", 0),
            GuestPhysBlock(0x03000000, 0x04000000, "0000:00:02.0/bochs-display-vram", 0),
            GuestPhysBlock(0xFFFF0000, 1 << 32, "0000:00:03.0/x.rom", 0)]  # fmt: skip
    got = guest_phys_blocks(FAMILY_Q35, split, "m0", bridge=bridge, bios=("pc.bios", 0x40000), option_rom=None,
                            vga=True, bars=bars)  # fmt: skip
    assert got == [
        GuestPhysBlock(0, 0xA0000, "m0", 0),
        GuestPhysBlock(0xC0000, 56 * MIB, "m0", 0xC0000),
        GuestPhysBlock(56 * MIB, 64 * MIB, "0000:00:02.0/bochs-display-vram", 8 * MIB),
        GuestPhysBlock(0xFD000000, 0xFE000000, "0000:00:01.0/vga.vram", 0),
        GuestPhysBlock(0xFFFC0000, 0xFFFF0000, "pc.bios", 0),
        GuestPhysBlock(0xFFFF0000, 1 << 32, "0000:00:03.0/x.rom", 0),
    ]


# -- a file whose devices are built by hand ----------------------------------------------


def _bridge_config() -> bytes:
    return _config(header=0x01, klass=0x0604, extra={
        0x20: (0xFE80).to_bytes(2, "little") + (0xFE80).to_bytes(2, "little"),  # 0xfe800000-0xfe8fffff
        0x24: (0xFFF1).to_bytes(2, "little") + (0x0001).to_bytes(2, "little"),  # prefetchable: closed
    })  # fmt: skip


DEVICES: list[tuple[str, str, bytes | None]] = [
    # (section idstr, vmsd name, configuration space; None: a section without one)
    ("0000:00:01.0/vga", "vga", _config(bars={0x10: 0xFD000008, 0x30: 0xFEB00000})),  # ROM BAR not enabled
    ("0000:00:03.0/vmware_vga", "vmware_vga", _config(bars={0x14: 0xFC000008, 0x18: 0xFE000008}, klass=0x0300)),
    ("0000:00:04.0/e1000", "e1000", _config(bars={0x30: 0xFEB40001}, klass=0x0200)),
    ("0000:00:05.0/cirrus_vga", "cirrus_vga", _config(bars={0x10: 0xFA000008})),
    ("0000:00:06.0/mystery", "mystery", _config(klass=0x0380)),
    ("0000:00:07.0/pci-bridge", "pci-bridge", _bridge_config()),
    ("0000:00:07.0:01.0/bochs-display", "bochs-display", _config(bars={0x10: 0xFE800008}, klass=0x0380)),
    ("0000:00:07.0:02.0/bochs-display", "bochs-display", _config(bars={0x10: 0xFD800008}, klass=0x0380)),
    ("0000:00:08.0:00.0/bochs-display", "bochs-display", _config(bars={0x10: 0xFE800008}, klass=0x0380)),
    ("0000:00:09.0/nopci", "nopci", None),
    ("0000:00:0a.0/vga", "vga", _config(command=0, bars={0x10: 0xF9000008}, klass=0x0380)),  # secondary-vga
]
BLOCKS = {  # name -> size; pc.ram is the main block
    "pc.ram": 32 * MIB,
    "0000:00:01.0/vga.vram": 1 * MIB,
    "0000:00:01.0/vga.rom": 0x10000,
    "0000:00:03.0/vga.vram": 1 * MIB,
    "vmsvga.fifo": 0x10000,  # a global name: vmware_vga's BAR2
    "0000:00:04.0/e1000.rom": 0x40000,
    "0000:00:05.0/vga.vram": 1 * MIB,
    "0000:00:06.0/mystery.ram": 0x10000,
    "0000:00:07.0:01.0/bochs-display-vram": 1 * MIB,  # inside the bridge's memory window
    "0000:00:07.0:02.0/bochs-display-vram": 1 * MIB,  # outside: the prefetchable window is closed
    "0000:00:08.0:00.0/bochs-display-vram": 1 * MIB,  # behind a bridge with no section
    "0000:00:09.0/nopci.ram": 0x10000,
    "0000:00:0a.0/vga.vram": 1 * MIB,
    "0000:00:0b.0/vga.vram": 1 * MIB,  # no section at all
    "/rom@etc/acpi/tables": 0x20000,
}


@pytest.fixture
def hand_made(tmp_path: Path) -> Path:
    records = []
    for idstr, vmsd, config in DEVICES:
        if config is None:
            body, fields = b"\0" * 4, ({"name": "x", "type": "uint32", "size": 4},)
        else:
            body, fields = _pci_section(config)
        records.append(DeviceRecord(idstr, 0, 1, body, fields, vmsd))
    state, devices = encode_device_state(records, first_section_id=2)
    blocks = [(name, np.full(size, 0x11 + k, dtype=np.uint8)) for k, (name, size) in enumerate(BLOCKS.items())]
    path = tmp_path / "devices.mig"
    ops.save(path, blocks, machine_type="pc-q35-10.0", device_state=state,
             vmdesc=encode_vmdesc_json(devices, page_size=4096), options=EngineOptions(durable=False))  # fmt: skip
    return path


def test_hand_made_devices_are_placed_or_said_why_not(hand_made: Path, tmp_path: Path) -> None:
    with mappedram.open_file(hand_made) as f:
        gmap = guest_memory_map(f)
    placed = {b.idstr: (b.target_start, b.size, b.offset) for b in gmap.blocks if b.idstr != "pc.ram"}
    assert placed == {
        "0000:00:01.0/vga.vram": (0xFD000000, MIB, 0),
        "0000:00:03.0/vga.vram": (0xFC000000, MIB, 0),  # vmware: BAR1
        "vmsvga.fifo": (0xFE000000, 0x10000, 0),  # vmware: BAR2
        "0000:00:04.0/e1000.rom": (0xFEB40000, 0x40000, 0),  # ROM BAR enabled
        "0000:00:07.0:01.0/bochs-display-vram": (0xFE800000, MIB, 0),
    }
    assert set(gmap.unplaced) == set(BLOCKS) - set(placed) - {"pc.ram"}
    text = "\n".join(gmap.notes)
    for line in ("0000:00:01.0/vga.rom (ROM BAR of 0000:00:01.0 (vga): the ROM BAR is not enabled)",
                 "0000:00:0a.0/vga.vram (BAR0 of 0000:00:0a.0 (vga): memory space disabled",
                 "0000:00:07.0:02.0/bochs-display-vram (BAR0 of 0000:00:07.0:02.0 (bochs-display) at 0xfd800000: "
                 "outside its bridges' windows)",
                 "0000:00:05.0/vga.vram (0000:00:05.0 (cirrus_vga): in BAR0 only in linear mode"):  # fmt: skip
        assert line in text or line in "\n".join(gmap.warnings), line
    [warning] = [w for w in gmap.warnings if w.startswith("RAM of PCI devices that cannot be placed")]
    for idstr, why in (("0000:00:05.0/vga.vram", "BAR0 is mapped at 0xfa000000"),
                       ("0000:00:06.0/mystery.ram", "no rule says which BAR maps it"),
                       ("0000:00:08.0:00.0/bochs-display-vram", "behind the PCI bridge 0000:00:08.0"),
                       ("0000:00:09.0/nopci.ram", "no PCI configuration space in its sections"),
                       ("0000:00:0b.0/vga.vram", "no section of its PCI device")):  # fmt: skip
        assert f"{idstr} (" in warning and why in warning, (idstr, warning)
    assert any("/rom@etc/acpi/tables" in n and "fw_cfg" in n for n in gmap.notes)
    # the VGA window: 00:01.0 is a VGA controller (class 0x0300) on the root bus
    assert any("vga-lowmem of 0000:00:01.0 (vga)" in n for n in gmap.notes)
    assert all(b.target_start != 0xA0000 for b in gmap.blocks)

    out = tmp_path / "out.raw"
    report = ops.export(hand_made, out, format="raw")
    assert report.unplaced_blocks == gmap.unplaced and report.warnings == gmap.warnings
    with out.open("rb") as f:
        for seg in report.segments:
            f.seek(seg.paddr)
            value = 0x11 + list(BLOCKS).index(seg.block)
            assert f.read(seg.size) == bytes([value]) * seg.size, seg

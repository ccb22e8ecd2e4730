"""Golden bytes for every record type, checked both ways (encode, and decode split anywhere)."""

from __future__ import annotations

import pytest

from mappedram.errors import FormatError, TruncatedError
from mappedram.format import decoder as sd
from mappedram.format import encoder as se
from mappedram.format import events as sv
from mappedram.format.constants import MIG_CMD_SWITCHOVER_START
from mappedram.format.structs import MappedRamHeader

# QEMU 10.0.2, -M pc -m 128M -nodefaults, mapped-ram: the first 0xa2 bytes (spec §10.1)
PC_HEAD = bytes.fromhex(
    "5145564d00000003"  # QEVM, version 3
    "070000000e" + b"pc-i440fx-10.0".hex()  # configuration
    + "051a" + b"configuration/capabilities".hex() + "00000001" + "00000001" + "0a" + b"mapped-ram".hex()
    + "0100000001" + "03" + b"ram".hex() + "00000000" + "00000004"  # START 'ram' id 1
    + "0000000008082004"  # MEM_SIZE 0x8082000
    + "06" + b"pc.ram".hex() + "0000000008000000"  # entry: pc.ram, used_length
    + "00000001" + "0000000000001000" + "000000000000008e" + "0000000000100000"  # MappedRamHeader
)

ACPI_ENTRY = bytes.fromhex(
    "14" + b"/rom@etc/acpi/tables".hex() + "0000000000020000"
    + "00000001" + "0000000000001000" + "0000000008100039" + "0000000008200000"
)

GOLDEN = [
    ("file header", se.encode_file_header(), "5145564d00000003"),
    ("configuration", se.encode_configuration("pc-i440fx-10.0", ("mapped-ram",)), PC_HEAD[8:0x4A].hex()),
    ("configuration legacy", se.encode_configuration("pc-q35-10.0"), "070000000b" + b"pc-q35-10.0".hex()),
    ("section start", se.encode_section_start(1, "ram", 0, 4), "010000000103" + b"ram".hex() + "0000000000000004"),
    ("section full", se.encode_section_full(0, "timer", 0, 2), "010000000005".replace("01", "04", 1) + b"timer".hex() + "0000000000000002"),
    ("section part", se.encode_section_part(1), "0200000001"),
    ("section end", se.encode_section_end(1), "0300000001"),
    ("footer", se.encode_footer(1), "7e00000001"),
    ("switchover start", se.encode_command(MIG_CMD_SWITCHOVER_START), "08000b0000"),
    ("mem size", se.encode_mem_size(0x8082000), "0000000008082004"),
    ("eos", se.encode_eos(), "0000000000000010"),
    ("mapped-ram header", MappedRamHeader(1, 4096, 0x8E, 0x100000).pack(), PC_HEAD[-28:].hex()),
    ("block entry", se.encode_ram_block_entry("/rom@etc/acpi/tables", 0x20000, header=MappedRamHeader(1, 4096, 0x8100039, 0x8200000)), ACPI_ENTRY.hex()),
    ("page", se.encode_page_record("pc.ram", 0x5000, b"\xab" * 4096), "0000000000005008" + "06" + b"pc.ram".hex() + "ab" * 4096),
    ("page continue", se.encode_page_record(None, 0x6000, b"\xcd" * 4096), "0000000000006028" + "cd" * 4096),
    ("zero page", se.encode_page_record("pc.ram", 0x7000, None), "0000000000007002" + "06" + b"pc.ram".hex() + "00"),
    ("zero continue", se.encode_page_record(None, 0x8000, None), "000000000000802200"),
    ("vmdesc", se.encode_vmdesc(b'{"page_size": 4096}'), "0600000013" + b'{"page_size": 4096}'.hex()),
]


@pytest.mark.parametrize(("name", "data", "hexbytes"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_encoding(name, data, hexbytes):
    assert data.hex() == hexbytes


def _events(data: bytes, *, split: int | None = None, start: int = 0) -> list[sv.Event]:
    """Decode ``data`` fed whole, or in pieces of ``split`` bytes, always from ``feed_offset``."""
    dec = sd.Decoder(start_offset=start)
    step = len(data) if split is None else split
    out: list[sv.Event] = []
    while True:
        ev = dec.next_event()
        if ev is sv.NEED_DATA:
            at = dec.feed_offset - start
            dec.feed(data[at : at + step])
            continue
        out.append(ev)
        if isinstance(ev, sv.DeviceStateStart):
            return out


def test_decode_qemu_head_and_golden_records():
    total = 0x8000000
    head = bytearray(PC_HEAD)
    head[0x5B:0x63] = se.encode_mem_size(total)
    stream = bytearray(head) + bytes(0x100000 - len(head))
    tail_at = 0x100000 + total
    tail = se.encode_eos() + se.encode_footer(1) + se.encode_section_part(1) + se.encode_eos() + se.encode_footer(1)
    tail += se.encode_command(MIG_CMD_SWITCHOVER_START) + se.encode_section_end(1) + se.encode_eos() + se.encode_footer(1)
    tail += se.encode_section_full(0, "timer", 0, 2)
    # the decoder jumps over the page region: feed only the bytes around it
    dec = sd.Decoder()
    dec.feed(bytes(stream))
    events = []
    while True:
        ev = dec.next_event()
        if ev is sv.NEED_DATA:
            assert dec.feed_offset == tail_at
            dec.feed(tail)
            continue
        events.append(ev)
        if isinstance(ev, sv.DeviceStateStart):
            break
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "Configuration", "SectionHeader", "MemSize", "RamBlockEntry", "RamEos", "SectionFooterEvent",
        "SectionHeader", "RamEos", "SectionFooterEvent", "Command", "SectionHeader", "RamEos",
        "SectionFooterEvent", "DeviceStateStart",
    ]
    config, start_hdr, mem, entry = events[:4]
    assert config.machine_type == "pc-i440fx-10.0" and config.capabilities == ("mapped-ram",)
    assert config.end_offset == 0x4A
    assert start_hdr.offset == 0x4A and start_hdr.section_id == 1 and start_hdr.version_id == 4
    assert mem.total == total
    assert entry.idstr == "pc.ram" and entry.header_offset == 0x72
    assert entry.header == MappedRamHeader(1, 4096, 0x8E, 0x100000)
    assert events[4].offset == tail_at
    assert events[-1].offset == tail_at + len(tail) - len(se.encode_section_full(0, "timer", 0, 2))


@pytest.mark.parametrize("split", [None, 1, 3, 7, 64])
def test_decode_legacy_any_split(split):
    from tests.helpers.streams import legacy_stream

    data = bytes(range(256)) * 16
    stream = legacy_stream([("pc.ram", data + bytes(4096))], [[("pc.ram", 1, data), ("pc.ram", 0, None)]])
    events = _events(stream, split=split)
    pages = [e for e in events if isinstance(e, sv.RamPage)]
    assert [(p.addr, p.data_offset is None, p.flags & 0x20 != 0) for p in pages] == [
        (0, False, False), (0x1000, True, True), (0x1000, False, False), (0, True, True),
    ]
    for p in pages:
        if p.data_offset is not None:
            assert stream[p.data_offset : p.data_offset + 4096] == data


def test_truncated_everywhere_in_head():
    for cut in range(0, 0x62):
        with pytest.raises(TruncatedError) as info:
            _events(PC_HEAD[:cut])
        assert info.value.offset is not None and info.value.offset <= cut


def test_decoder_errors_are_format_errors_with_offsets():
    bad = bytearray(PC_HEAD)
    bad[0x73] = 2  # MappedRamHeader.version 2 (be32 at 0x72)
    with pytest.raises(FormatError, match="version not supported") as info:
        _events(bytes(bad))
    assert info.value.offset == 0x72 and info.value.block == "pc.ram"


def test_device_state_golden_and_split_back():
    """FULL sections numbered from the given id, each with its footer, then EOF; the vmdesc
    entries delimit them again (as for QEMU's own device state)."""
    import json

    from mappedram.format.vmstate import DeviceRecord, encode_device_state, encode_vmdesc_json, split_device_sections

    records = [
        DeviceRecord("mappedram-cpu", 0, 1, bytes.fromhex("0000000000000005"),
                     ({"name": "rax", "type": "uint64", "size": 8},)),
        DeviceRecord("dev", 3, 2, b"\x7e\x00\x00\x00\x03"),  # a body that looks like its own footer
    ]
    state, devices = encode_device_state(records, first_section_id=2)
    assert state.hex() == (
        "0400000002" + "0d" + b"mappedram-cpu".hex() + "00000000" + "00000001" + "0000000000000005" + "7e00000002"
        + "0400000003" + "03" + b"dev".hex() + "00000003" + "00000002" + "7e00000003" + "7e00000003"
        + "00"
    )
    assert devices[0] == {"name": "mappedram-cpu", "instance_id": 0, "vmsd_name": "mappedram-cpu", "version": 1,
                          "fields": [{"name": "rax", "type": "uint64", "size": 8}]}
    text = encode_vmdesc_json(devices, page_size=4096)
    assert json.loads(text) == {"page_size": 4096, "devices": devices}
    assert text.startswith(b'{"page_size": 4096, "devices": [{"name": ')
    sections = split_device_sections(state, 100, devices)
    assert [(d.idstr, d.section_id, d.instance_id, d.version_id) for d in sections] == [
        ("mappedram-cpu", 2, 0, 1), ("dev", 3, 3, 2)]
    assert state[sections[0].body_offset - 100 :][: sections[0].body_length] == records[0].body
    assert state[sections[1].body_offset - 100 :][: sections[1].body_length] == records[1].body


def test_page_records_at_scattered_offsets():
    import numpy as np

    pages = np.zeros((3, 4096), dtype=np.uint8)
    pages[0] = 0xAB
    pages[2] = 0xCD
    addrs = np.array([0x5000, 0x9000, 0x20000], dtype=np.uint64)
    nonzero = pages.any(axis=1)
    out = np.empty(se.page_records_size("pc.ram", nonzero, 4096), dtype=np.uint8)
    n = se.encode_page_records_into("pc.ram", addrs, pages, nonzero, out)
    assert out[:n].tobytes() == (
        se.encode_page_record("pc.ram", 0x5000, b"\xab" * 4096)
        + se.encode_page_record(None, 0x9000, None)
        + se.encode_page_record(None, 0x20000, b"\xcd" * 4096)
    )

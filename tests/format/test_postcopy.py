"""``format.postcopy``: golden bytes of the MIG_CMD_* encoders, the return-path codec (round
trips and hostile input), and ``layout.plan_stream``'s pieces decoded by the project's decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mappedram.errors import BadMagicError, FormatError, TruncatedError
from mappedram.format import postcopy as pc
from mappedram.format.constants import MIG_CMD_SWITCHOVER_START, QEMU_VM_COMMAND
from mappedram.format.decoder import Decoder
from mappedram.format.encoder import encode_command, encode_page_record
from mappedram.format.events import (
    NEED_DATA,
    Command,
    Configuration,
    DeviceStateStart,
    Event,
    MemSize,
    RamBlockEntry,
    RamEos,
    RamPage,
    SectionFooterEvent,
    SectionHeader,
    SectionType,
)
from mappedram.format.vmstate import find_vmdesc, split_device_sections
from mappedram.layout import PING_OPENED, PING_PACKAGE, PING_RUN, PING_STARTED, StreamSpec, plan_stream
from tests.helpers.streams import MACHINE, device_state

PAGE = 4096

# -- golden bytes of the encoders ------------------------------------------------------------

GOLDEN = [
    ("open return path", pc.encode_open_return_path(), "08" "0001" "0000"),
    ("ping 1", pc.encode_ping(1), "08" "0002" "0004" "00000001"),
    ("ping max", pc.encode_ping(0xFFFFFFFF), "08" "0002" "0004" "ffffffff"),
    ("ping 0x01020304", pc.encode_ping(0x01020304), "08" "0002" "0004" "01020304"),
    (
        "postcopy advise (defaults)",
        pc.encode_postcopy_advise(),
        "08" "0003" "0010" "0000000000001000" "0000000000001000",
    ),
    (
        "postcopy advise (huge pages)",
        pc.encode_postcopy_advise(0x201000, 0x1000),
        "08" "0003" "0010" "0000000000201000" "0000000000001000",
    ),
    ("postcopy listen", pc.encode_postcopy_listen(), "08" "0004" "0000"),
    ("postcopy run", pc.encode_postcopy_run(), "08" "0005" "0000"),
    (
        "ram discard, one range",
        pc.encode_postcopy_ram_discard("pc.ram", [(0, 0x8000000)]),
        "08" "0006" "0019" "00" "06" + b"pc.ram".hex() + "00" + "0000000000000000" "0000000008000000",
    ),
    (
        "ram discard, two ranges",
        pc.encode_postcopy_ram_discard("/rom@etc/acpi/tables", [(0x1000, 0x2000), (0x10000, 0x1000)]),
        "08" "0006" "0037" "00" "14" + b"/rom@etc/acpi/tables".hex() + "00"
        + "0000000000001000" "0000000000002000" "0000000000010000" "0000000000001000",
    ),
    ("packaged, empty", pc.encode_packaged(b""), "08" "0007" "0004" "00000000"),
    ("packaged", pc.encode_packaged(b"\x01\x02\x03"), "08" "0007" "0004" "00000003" "010203"),
    (
        "packaged listen + run",
        pc.encode_packaged(pc.encode_postcopy_listen() + pc.encode_postcopy_run()),
        "08" "0007" "0004" "0000000a" "0800040000" "0800050000",
    ),
]


@pytest.mark.parametrize(("name", "data", "hexbytes"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_command_golden(name: str, data: bytes, hexbytes: str) -> None:
    """Each encoder writes QEMU's bytes exactly: 0x08, be16 cmd, be16 len, payload."""
    assert data.hex() == hexbytes


def test_command_numbers() -> None:
    """The enum values of migration/savevm.h and migration/migration.h."""
    assert (pc.MIG_CMD_OPEN_RETURN_PATH, pc.MIG_CMD_PING, pc.MIG_CMD_POSTCOPY_ADVISE) == (1, 2, 3)
    assert (pc.MIG_CMD_POSTCOPY_LISTEN, pc.MIG_CMD_POSTCOPY_RUN, pc.MIG_CMD_POSTCOPY_RAM_DISCARD) == (4, 5, 6)
    assert pc.MIG_CMD_PACKAGED == 7
    assert (1 << 24) <= pc.MAX_VM_CMD_PACKAGED_SIZE <= 0xFFFFFFFF  # the blob's length is a be32
    assert (pc.MIG_RP_MSG_SHUT, pc.MIG_RP_MSG_PONG, pc.MIG_RP_MSG_REQ_PAGES_ID, pc.MIG_RP_MSG_REQ_PAGES) == (1, 2, 3, 4)
    assert (pc.MIG_RP_MSG_RECV_BITMAP, pc.MIG_RP_MSG_RESUME_ACK, pc.MIG_RP_MSG_SWITCHOVER_ACK) == (5, 6, 7)


def test_packaged_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob of MAX_VM_CMD_PACKAGED_SIZE bytes is packaged; one byte more is refused (the limit
    lowered here, so the test need not build a blob of the real one)."""
    monkeypatch.setattr(pc, "MAX_VM_CMD_PACKAGED_SIZE", 64)
    blob = bytes(range(64))
    out = pc.encode_packaged(blob)
    assert out[:9] == bytes.fromhex("0800070004") + struct.pack(">I", len(blob))
    assert out[9:] == blob
    with pytest.raises(ValueError, match="at most"):
        pc.encode_packaged(blob + b"\x00")


@pytest.mark.parametrize(
    ("idstr", "ranges"),
    [("", [(0, PAGE)]), ("x" * 256, [(0, PAGE)]), ("pc.ram", [])],
    ids=["empty name", "name too long", "no range"],
)
def test_ram_discard_refuses(idstr: str, ranges: list[tuple[int, int]]) -> None:
    """A discard names a block of 1..255 bytes and at least one range."""
    with pytest.raises(ValueError):
        pc.encode_postcopy_ram_discard(idstr, ranges)


def test_ram_discard_longest_name() -> None:
    """A 255-byte block name fits the u8 length."""
    out = pc.encode_postcopy_ram_discard("n" * 255, [(0, PAGE)])
    assert out[5:7] == b"\x00\xff"
    assert out[7 : 7 + 255] == b"n" * 255
    assert out[7 + 255] == 0
    assert struct.unpack(">H", out[3:5])[0] == len(out) - 5 == 1 + 1 + 255 + 1 + 16


# -- the return path ---------------------------------------------------------------------------

RP_GOLDEN = [
    (pc.RpMessage(pc.MIG_RP_MSG_SHUT, value=0), "0001" "0004" "00000000"),
    (pc.RpMessage(pc.MIG_RP_MSG_SHUT, value=1), "0001" "0004" "00000001"),
    (pc.RpMessage(pc.MIG_RP_MSG_PONG, value=3), "0002" "0004" "00000003"),
    (pc.RpMessage(pc.MIG_RP_MSG_PONG, value=0xDEADBEEF), "0002" "0004" "deadbeef"),
    (
        pc.RpMessage(pc.MIG_RP_MSG_REQ_PAGES, start=0x7FFFF000, length=0x1000),
        "0004" "000c" "000000007ffff000" "00001000",
    ),
    (
        pc.RpMessage(pc.MIG_RP_MSG_REQ_PAGES_ID, start=0x2000, length=0x3000, idstr="pc.ram"),
        "0003" "0013" "0000000000002000" "00003000" "06" + b"pc.ram".hex(),
    ),
]


@pytest.mark.parametrize(("message", "hexbytes"), RP_GOLDEN, ids=lambda v: getattr(v, "name", None))
def test_rp_round_trip(message: pc.RpMessage, hexbytes: str) -> None:
    """encode_rp_message writes migrate_send_rp_message's bytes; rp_body_length and
    decode_rp_message read them back to the same message."""
    raw = pc.encode_rp_message(message)
    assert raw.hex() == hexbytes
    header, body = raw[: pc.RP_HEADER_SIZE], raw[pc.RP_HEADER_SIZE :]
    assert pc.rp_body_length(header) == len(body)
    assert pc.decode_rp_message(header, body) == message


def test_rp_names() -> None:
    """A message names its type, also one it does not know."""
    assert pc.RpMessage(pc.MIG_RP_MSG_REQ_PAGES_ID).name == "REQ_PAGES_ID"
    assert pc.RpMessage(pc.MIG_RP_MSG_SHUT).name == "SHUT"
    assert pc.RpMessage(99).name == "type 99"


def test_rp_bodyless_and_unused_types() -> None:
    """SWITCHOVER_ACK has no body; RESUME_ACK has a value; RECV_BITMAP is variable."""
    assert pc.rp_body_length(bytes.fromhex("00070000")) == 0
    assert pc.decode_rp_message(bytes.fromhex("00070000"), b"") == pc.RpMessage(pc.MIG_RP_MSG_SWITCHOVER_ACK)
    assert pc.decode_rp_message(bytes.fromhex("00060004"), b"\x00\x00\x00\x05").value == 5
    assert pc.rp_body_length(bytes.fromhex("00050020")) == 0x20
    assert pc.decode_rp_message(bytes.fromhex("00050003"), b"abc").kind == pc.MIG_RP_MSG_RECV_BITMAP


def _req_pages_id(start: int, length: int, name: bytes, *, name_len: int | None = None) -> tuple[bytes, bytes]:
    body = struct.pack(">QI", start, length) + bytes([len(name) if name_len is None else name_len]) + name
    return struct.pack(">HH", pc.MIG_RP_MSG_REQ_PAGES_ID, len(body)), body


HOSTILE: list[tuple[str, bytes, bytes, type[FormatError]]] = [
    ("unknown type 0", bytes.fromhex("00000004"), b"\x00" * 4, BadMagicError),
    ("unknown type 8", bytes.fromhex("00080000"), b"", BadMagicError),
    ("unknown type 0xffff", bytes.fromhex("ffff0004"), b"\x00" * 4, BadMagicError),
    ("SHUT of 3 bytes", bytes.fromhex("00010003"), b"\x00" * 3, BadMagicError),
    ("SHUT of 5 bytes", bytes.fromhex("00010005"), b"\x00" * 5, BadMagicError),
    ("PONG of 0 bytes", bytes.fromhex("00020000"), b"", BadMagicError),
    ("REQ_PAGES of 13 bytes", bytes.fromhex("0004000d"), b"\x00" * 13, BadMagicError),
    ("REQ_PAGES of 8 bytes", bytes.fromhex("00040008"), b"\x00" * 8, BadMagicError),
    ("SWITCHOVER_ACK with a body", bytes.fromhex("00070001"), b"\x00", BadMagicError),
    ("RESUME_ACK of 8 bytes", bytes.fromhex("00060008"), b"\x00" * 8, BadMagicError),
    ("REQ_PAGES_ID without a name", bytes.fromhex("0003000c"), b"\x00" * 12, TruncatedError),
    ("REQ_PAGES_ID of 0 bytes", bytes.fromhex("00030000"), b"", TruncatedError),
    ("REQ_PAGES_ID name longer than the body", *_req_pages_id(0, PAGE, b"pc.ram", name_len=7), BadMagicError),
    ("REQ_PAGES_ID name shorter than the body", *_req_pages_id(0, PAGE, b"pc.ram", name_len=5), BadMagicError),
    ("REQ_PAGES_ID name length 255, 1 byte", *_req_pages_id(0, PAGE, b"p", name_len=255), BadMagicError),
    ("SHUT body cut short", bytes.fromhex("00010004"), b"\x00\x00", TruncatedError),
    ("PONG body empty", bytes.fromhex("00020004"), b"", TruncatedError),
    ("REQ_PAGES body cut short", bytes.fromhex("0004000c"), b"\x00" * 11, TruncatedError),
    ("REQ_PAGES_ID body cut short", _req_pages_id(0, PAGE, b"pc.ram")[0], _req_pages_id(0, PAGE, b"pc.ram")[1][:-1],
     TruncatedError),
    ("body longer than the header says", bytes.fromhex("00010004"), b"\x00" * 5, TruncatedError),
    ("header of 3 bytes", bytes.fromhex("000100"), b"\x00" * 4, TruncatedError),
    ("header of 5 bytes", bytes.fromhex("0001000400"), b"\x00" * 4, TruncatedError),
    ("empty header", b"", b"", TruncatedError),
]


@pytest.mark.parametrize(("name", "header", "body", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_rp_hostile(name: str, header: bytes, body: bytes, error: type[FormatError]) -> None:
    """Every malformed return-path message raises a FormatError subclass, never another exception."""
    with pytest.raises(error) as info:
        pc.decode_rp_message(header, body)
    assert isinstance(info.value, FormatError)
    str(info.value)  # renders
    info.value.to_dict()


@pytest.mark.parametrize(
    "header",
    [bytes.fromhex("00000004"), bytes.fromhex("00010003"), bytes.fromhex("0002"), bytes.fromhex("0004000b")],
)
def test_rp_body_length_hostile(header: bytes) -> None:
    """rp_body_length refuses before a body is read: unknown type, wrong fixed length, short header."""
    with pytest.raises(FormatError):
        pc.rp_body_length(header)


def test_rp_req_pages_id_name_not_utf8() -> None:
    """A block name that is not UTF-8 still decodes (the caller finds no such block)."""
    header, body = _req_pages_id(PAGE, PAGE, b"\xff\xfe")
    msg = pc.decode_rp_message(header, body)
    assert msg.kind == pc.MIG_RP_MSG_REQ_PAGES_ID
    assert msg.start == PAGE and msg.length == PAGE
    assert msg.idstr is not None and len(msg.idstr) == 2


_header = st.one_of(
    st.binary(min_size=4, max_size=4),
    st.tuples(st.integers(0, 9), st.integers(0, 40)).map(lambda t: struct.pack(">HH", *t)),
)


@given(header=_header, body=st.binary(max_size=300), exact=st.booleans())
def test_rp_decoder_never_crashes(header: bytes, body: bytes, exact: bool) -> None:
    """Random headers and bodies only ever decode or raise a FormatError subclass."""
    if exact:
        n = struct.unpack(">H", header[2:])[0]
        body = (body * (n // max(len(body), 1) + 1))[:n] if body else bytes(n)
    try:
        n = pc.rp_body_length(header)
    except FormatError:
        n = None
    try:
        msg = pc.decode_rp_message(header, body)
    except FormatError:
        return
    assert n == len(body)
    assert msg.kind == struct.unpack(">H", header[:2])[0]
    # what decodes encodes back to the same bytes (for the types the encoder knows)
    if msg.kind in (pc.MIG_RP_MSG_SHUT, pc.MIG_RP_MSG_PONG, pc.MIG_RP_MSG_REQ_PAGES, pc.MIG_RP_MSG_RESUME_ACK):
        assert pc.encode_rp_message(msg) == header + body


# -- plan_stream ------------------------------------------------------------------------------

BLOCKS = [("pc.ram", 16 * PAGE), ("/rom@etc/acpi/tables", 2 * PAGE)]


def _spec(switchover_start: bool = True) -> tuple[StreamSpec, bytes, bytes]:
    blob, trailer = device_state()
    spec = StreamSpec(
        machine_type=MACHINE,
        capabilities=(),
        ram_section_id=2,
        switchover_start=switchover_start,
        device_state=blob,
        vmdesc=trailer[5:],
    )
    return spec, blob, trailer


def _decode(data: bytes) -> list[Event]:
    """Every event of ``data`` (fed in small pieces) up to and including DeviceStateStart."""
    dec = Decoder(0, len(data))
    events: list[Event] = []
    while True:
        event = dec.next_event()
        if event is NEED_DATA:
            at = dec.feed_offset
            dec.feed(data[at : at + 7])  # b"" at the end: end of stream
            continue
        assert not isinstance(event, type)
        events.append(event)
        if isinstance(event, DeviceStateStart):
            return events


def _commands(data: bytes) -> list[tuple[int, bytes]]:
    """Split ``data``, made of commands only, into (cmd, payload); PACKAGED's payload is its blob."""
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos] == QEMU_VM_COMMAND, f"not a command at {pos}"
        cmd, length = struct.unpack_from(">HH", data, pos + 1)
        payload = data[pos + 5 : pos + 5 + length]
        assert len(payload) == length
        pos += 5 + length
        if cmd == pc.MIG_CMD_PACKAGED:
            assert length == 4
            (size,) = struct.unpack(">I", payload)
            payload = data[pos : pos + size]
            assert len(payload) == size
            pos += size
        out.append((cmd, payload))
    return out


OPENING_TAIL = pc.encode_open_return_path() + pc.encode_ping(PING_OPENED)
ADVISE = pc.encode_postcopy_advise()


def test_plan_stream_opening_and_head() -> None:
    """The opening ends with OPEN_RETURN_PATH and PING 1; postcopy's head starts with ADVISE and
    is otherwise precopy's head."""
    spec, _, _ = _spec()
    pre = plan_stream(BLOCKS, spec, postcopy=False)
    post = plan_stream(BLOCKS, spec, postcopy=True)
    assert pre.opening == post.opening
    assert pre.opening.endswith(bytes.fromhex("0800010000" "080002000400000001"))
    assert pre.opening.startswith(b"QEVM\x00\x00\x00\x03")
    assert post.head == ADVISE + pre.head
    assert ADVISE.hex() == "080003001000000000000010000000000000001000"
    assert pre.part_head == post.part_head == bytes.fromhex("0200000002")
    assert pre.part_end == post.part_end == bytes.fromhex("0000000000000010" "7e00000002")


@pytest.mark.parametrize("switchover_start", [True, False])
def test_plan_stream_precopy_decodes(switchover_start: bool) -> None:
    """opening (without its two commands, which a file stream never has) + head + a PART with a
    few page records + precopy_tail decodes: configuration, block list, pages, END, device state."""
    spec, blob, _ = _spec(switchover_start)
    plan = plan_stream(BLOCKS, spec, postcopy=False)
    assert plan.opening.endswith(OPENING_TAIL)
    page = bytes(range(256)) * 16
    records = (
        encode_page_record("pc.ram", 3 * PAGE, page)
        + encode_page_record(None, 4 * PAGE, None)
        + encode_page_record("/rom@etc/acpi/tables", PAGE, page[::-1])
    )
    data = plan.opening[: -len(OPENING_TAIL)] + plan.head + plan.part_head + records + plan.part_end + plan.precopy_tail
    events = _decode(data)

    config = events[0]
    assert isinstance(config, Configuration)
    assert config.machine_type == MACHINE
    assert config.capabilities == ()
    entries = [e for e in events if isinstance(e, RamBlockEntry)]
    assert [(e.idstr, e.used_length) for e in entries] == BLOCKS
    assert [e.total for e in events if isinstance(e, MemSize)] == [sum(size for _, size in BLOCKS)]
    headers = [e for e in events if isinstance(e, SectionHeader)]
    assert [h.section_type for h in headers] == [SectionType.START, SectionType.PART, SectionType.END]
    assert {h.section_id for h in headers} == {2}
    assert headers[0].idstr == "ram" and headers[0].version_id == 4
    assert len([e for e in events if isinstance(e, RamEos)]) == 3
    assert [e.section_id for e in events if isinstance(e, SectionFooterEvent)] == [2, 2, 2]
    pages = [e for e in events if isinstance(e, RamPage)]
    assert [(p.idstr, p.addr, p.data_offset is None) for p in pages] == [
        ("pc.ram", 3 * PAGE, False),
        ("pc.ram", 4 * PAGE, True),
        ("/rom@etc/acpi/tables", PAGE, False),
    ]
    assert pages[0].data_offset is not None and data[pages[0].data_offset : pages[0].data_offset + PAGE] == page
    commands = [e for e in events if isinstance(e, Command)]
    assert [c.cmd for c in commands] == ([MIG_CMD_SWITCHOVER_START] if switchover_start else [])
    # SWITCHOVER_START (when sent) comes right before the END section
    if switchover_start:
        assert events.index(commands[0]) + 1 == events.index(headers[2])

    start = events[-1]
    assert isinstance(start, DeviceStateStart)
    tail = data[start.offset :]
    assert tail.startswith(blob)
    vmdesc = find_vmdesc(tail, start.offset)
    assert vmdesc is not None
    assert vmdesc.offset == start.offset + len(blob)
    sections = split_device_sections(tail[: len(blob)], start.offset, vmdesc.devices)
    assert [(s.idstr, s.instance_id, s.version_id) for s in sections] == [("timer", 0, 2)]
    assert vmdesc.data.get("page_size") == PAGE


def test_plan_stream_without_vmdesc() -> None:
    """A spec without vmdesc ends the precopy stream at the device state's EOF."""
    spec, blob, _ = _spec()
    spec = StreamSpec(machine_type=MACHINE, device_state=blob, vmdesc=None, capabilities=())
    plan = plan_stream(BLOCKS, spec, postcopy=False)
    assert plan.precopy_tail.endswith(blob)
    assert plan.precopy_tail[-1] == 0


@pytest.mark.parametrize("switchover_start", [True, False])
def test_plan_stream_postcopy_pieces(switchover_start: bool) -> None:
    """Postcopy: the package is [SWITCHOVER_START], a whole-block RAM_DISCARD per block, PING 2,
    PACKAGED(LISTEN, device sections, PING 3, RUN), PING 4; the tail is END + EOS + footer + EOF."""
    spec, blob, _ = _spec(switchover_start)
    plan = plan_stream(BLOCKS, spec, postcopy=True)
    cmds = _commands(plan.package)
    if switchover_start:
        assert cmds[0] == (MIG_CMD_SWITCHOVER_START, b"")
        cmds = cmds[1:]
    assert plan.package.startswith(encode_command(MIG_CMD_SWITCHOVER_START) if switchover_start else b"\x08\x00\x06")
    discards = cmds[: len(BLOCKS)]
    for (cmd, payload), (idstr, size) in zip(discards, BLOCKS, strict=True):
        assert cmd == pc.MIG_CMD_POSTCOPY_RAM_DISCARD
        name = idstr.encode()
        assert payload == bytes([0, len(name)]) + name + b"\x00" + struct.pack(">QQ", 0, size)
    rest = cmds[len(BLOCKS) :]
    assert [c for c, _ in rest] == [pc.MIG_CMD_PING, pc.MIG_CMD_PACKAGED, pc.MIG_CMD_PING]
    assert rest[0][1] == struct.pack(">I", PING_PACKAGE)
    assert rest[2][1] == struct.pack(">I", PING_STARTED)
    package = rest[1][1]
    listen, run_tail = pc.encode_postcopy_listen(), pc.encode_ping(PING_RUN) + pc.encode_postcopy_run()
    assert package.startswith(listen)
    assert package.endswith(run_tail)
    assert package[len(listen) : -len(run_tail)] == blob[:-1]  # device sections without their EOF
    assert plan.postcopy_tail == bytes.fromhex("0300000002" "0000000000000010" "7e00000002" "00")


def test_plan_stream_postcopy_decodes() -> None:
    """The postcopy stream but its commands (opening's two, ADVISE, the package) decodes: the
    block list, one PART and the END, then just EOF where precopy has the device state."""
    spec, _, _ = _spec()
    plan = plan_stream(BLOCKS, spec, postcopy=True)
    assert plan.head.startswith(ADVISE)
    records = encode_page_record("pc.ram", 15 * PAGE, b"\x01" * PAGE) + encode_page_record(None, 0, None)
    data = (
        plan.opening[: -len(OPENING_TAIL)]
        + plan.head[len(ADVISE) :]
        + plan.part_head
        + records
        + plan.part_end
        + plan.postcopy_tail
    )
    events = _decode(data)
    assert isinstance(events[0], Configuration) and events[0].machine_type == MACHINE
    assert [(e.idstr, e.used_length) for e in events if isinstance(e, RamBlockEntry)] == BLOCKS
    assert [(e.addr, e.data_offset is None) for e in events if isinstance(e, RamPage)] == [(15 * PAGE, False), (0, True)]
    start = events[-1]
    assert isinstance(start, DeviceStateStart)
    assert data[start.offset :] == b"\x00"


def test_plan_stream_refuses() -> None:
    """A live stream has no mapped-ram or x-ignore-shared, and its device state ends with EOF."""
    _, blob, _ = _spec()
    with pytest.raises(ValueError):
        plan_stream(BLOCKS, StreamSpec(machine_type=MACHINE, capabilities=("mapped-ram",)), postcopy=False)
    with pytest.raises(ValueError):
        plan_stream(BLOCKS, StreamSpec(machine_type=MACHINE, capabilities=("x-ignore-shared",)), postcopy=True)
    with pytest.raises(ValueError):
        plan_stream(BLOCKS, StreamSpec(machine_type=MACHINE, capabilities=(), device_state=blob + b"\x04"), postcopy=False)
    with pytest.raises(ValueError):
        plan_stream(BLOCKS, StreamSpec(machine_type=MACHINE, capabilities=(), device_state=b""), postcopy=True)

"""Sans-IO decoder of QEMU's migration stream: bytes in, events (:mod:`.events`) out.

The grammar, as QEMU writes it to a ``file:`` URI (qemu_savevm_state_* in savevm.c)::

    STREAM      ::= FILE_HEADER [CONFIGURATION] { SECTION | COMMAND } DEVICE_STATE [VMDESC]
    FILE_HEADER ::= be32 QEMU_VM_FILE_MAGIC, be32 QEMU_VM_FILE_VERSION
    CONFIGURATION ::= 0x07 be32 len machine[len] { 0x05 u8 len name[len] be32 version BODY }
    SECTION     ::= (0x01|0x04) be32 id u8 len idstr[len] be32 instance be32 version BODY FOOTER
                  | (0x02|0x03) be32 id BODY FOOTER
    FOOTER      ::= 0x7e be32 id
    COMMAND     ::= 0x08 be16 cmd be16 len data[len]
    DEVICE_STATE ::= { FULL device sections } 0x00            (opaque here; see vmstate.py)
    VMDESC      ::= 0x06 be32 len json[len]                   (ends the file)

and the RAM section body (ram_save_setup / ram_load_precopy in ram.c)::

    RAM_BODY    ::= { be64 (addr | flags) [ENTRIES | PAGE_RECORD] } be64 RAM_SAVE_FLAG_EOS
    ENTRIES     ::= (MEM_SIZE) { u8 len idstr be64 used_length [be64 gpa] [MappedRamHeader] }
    PAGE_RECORD ::= [u8 len idstr, unless CONTINUE] (PAGE: page bytes | ZERO: u8 0x00)

With mapped-ram, a block's entry is followed by a jump: the next entry (or the EOS)
starts at ``pages_offset + used_length`` (parse_ramblock_mapped_ram). The decoder
follows that jump itself; its caller only ever feeds bytes from :attr:`Decoder.feed_offset`.

With ``batch_pages=True`` a run of consecutive CONTINUE page records of one block comes as
one :class:`RamPageRun` (arrays of addresses and data offsets) instead of one
:class:`RamPage` per record: the scan of a legacy stream then costs a short loop per
record and no event. Any record the run's fast loop does not accept (another flag, a
page outside the block, a bad fill byte, the end of the buffer) ends the run and is read
by the general path, so errors and offsets are the same in both modes.

The decoder follows h11's contract: :meth:`Decoder.next_event` returns an event or
:data:`NEED_DATA`, or raises :class:`~mappedram.errors.FormatError`. Any other
exception on any input is a bug. All offsets in events are absolute file offsets.

References:
    QEMU migration/savevm.c (qemu_loadvm_state, qemu_loadvm_state_main,
    qemu_loadvm_section_start_full, check_section_footer, vmstate_configuration),
    migration/ram.c (ram_load_precopy, parse_ramblocks, parse_ramblock,
    parse_ramblock_mapped_ram, mapped_ram_read_header, ram_block_from_stream).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from mappedram.errors import BadMagicError, FormatError, LayoutError, TruncatedError, UnsupportedError

from .constants import (
    CAP_MAPPED_RAM,
    CAP_MAPPEDRAM_CHILD,
    CAP_MAPPEDRAM_ZSTD,
    MAPPED_RAM_HDR_VERSION,
    MAPPEDRAM_ZSTD_HDR_VERSION,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_NAMES,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION_ID,
    SECTION_NAMES,
    STREAM_CAPABILITIES,
)
from .events import (
    NEED_DATA,
    Command,
    Configuration,
    DeviceStateStart,
    Event,
    MemSize,
    RamBlockEntry,
    RamEos,
    RamPage,
    RamPageRun,
    SectionFooterEvent,
    SectionHeader,
    SectionType,
)
from .structs import BE16, BE32, BE64, MappedRamHeader, ZstdRegionHeader
from .zstdseek import MAX_FRAME_BYTES, MAX_FRAME_PAGES, MIN_FRAME_SIZE, seek_table_size

__all__ = ["Decoder", "MAX_MACHINE_NAME", "MAX_CAPABILITIES"]

#: Bounds on length fields read before anything is allocated. QEMU's names are far shorter.
MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 64

class _NeedData(Exception):
    def __init__(self, field: str, needed: int) -> None:
        self.field = field
        self.needed = needed


class _State(Enum):
    FILE_HEADER = "file header"
    CONFIGURATION = "configuration"
    SECTION = "section type"
    RAM_RECORD = "RAM record"
    MEM_SIZE_ENTRY = "RAM block entry"
    FOOTER = "section footer"
    DONE = "done"


@dataclass(slots=True)
class _RamState:
    section_id: int | None = None
    blocks: dict[str, int] = field(default_factory=dict)  # idstr -> used_length
    remaining: int = 0  # MEM_SIZE total not yet covered by entries
    started: bool = False
    ended: bool = False
    last_block: str | None = None  # for RAM_SAVE_FLAG_CONTINUE


class Decoder:
    """Pull decoder of a QEMU migration stream starting at absolute offset ``start_offset``.

    Feed it bytes starting at :attr:`feed_offset`; feed ``b""`` at end of file. With
    ``stream_end`` (the file size) it rejects a legacy block list that claims more pages
    than the file has bytes, before a caller sizes anything by the claim.
    """

    #: Most records one RamPageRun holds.
    MAX_RUN = 1 << 16

    def __init__(self, start_offset: int = 0, stream_end: int | None = None, *, batch_pages: bool = False) -> None:
        self._batch_pages = batch_pages
        self._buf = bytearray()
        self._base = start_offset  # absolute offset of _buf[0]
        self._pos = 0  # index in _buf of the next unconsumed byte
        self._eof = False
        self._state = _State.FILE_HEADER
        self._config: Configuration | None = None
        self._ram = _RamState()
        self._section: SectionHeader | None = None  # section whose body is being read
        self._sections: dict[int, str] = {}  # section_id -> idstr of START/FULL seen
        self._stream_end = stream_end  # the file's size, when known: bounds what a header may claim
        self._legacy_pages = 0

    # -- feeding -----------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Absolute offset of the next byte the decoder will look at."""
        return self._base + self._pos

    @property
    def feed_offset(self) -> int:
        """Absolute offset the next :meth:`feed` must start at."""
        return self._base + len(self._buf)

    @property
    def configuration(self) -> Configuration | None:
        return self._config

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
            return
        if self._pos > (1 << 20) and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    # -- reading primitives (raise _NeedData; commit by advancing a local cursor) -------

    def _take(self, cur: int, n: int, what: str) -> tuple[bytes, int]:
        if cur + n > len(self._buf):
            raise _NeedData(what, cur + n - len(self._buf))
        return bytes(self._buf[cur : cur + n]), cur + n

    def _u8(self, cur: int, what: str) -> tuple[int, int]:
        if cur + 1 > len(self._buf):
            raise _NeedData(what, 1)
        return self._buf[cur], cur + 1

    def _unpack(self, fmt: struct.Struct, cur: int, what: str) -> tuple[int, int]:
        if cur + fmt.size > len(self._buf):
            raise _NeedData(what, cur + fmt.size - len(self._buf))
        return fmt.unpack_from(self._buf, cur)[0], cur + fmt.size

    def _be16(self, cur: int, what: str) -> tuple[int, int]:
        return self._unpack(BE16, cur, what)

    def _be32(self, cur: int, what: str) -> tuple[int, int]:
        return self._unpack(BE32, cur, what)

    def _be64(self, cur: int, what: str) -> tuple[int, int]:
        return self._unpack(BE64, cur, what)

    def _counted_string(self, cur: int, what: str) -> tuple[str, int]:
        """u8 length + bytes (qemu_get_counted_string); must be 1..255 bytes of UTF-8."""
        start = cur
        n, cur = self._u8(cur, f"{what} length")
        raw, cur = self._take(cur, n, what)
        if n == 0:
            raise FormatError("empty name", offset=self._abs(start), field=what, expected="1..255 bytes", actual=0)
        if 0 in raw:
            raise FormatError(
                "name contains a NUL byte", offset=self._abs(start + 1), field=what, expected="a C string", actual=raw
            )
        try:
            return raw.decode("utf-8"), cur
        except UnicodeDecodeError:
            raise FormatError("name is not valid UTF-8", offset=self._abs(start + 1), field=what, actual=raw) from None

    def _abs(self, cur: int) -> int:
        return self._base + cur

    def _jump(self, absolute: int) -> None:
        """Continue decoding at ``absolute`` (forward only), dropping buffered bytes before it."""
        rel = absolute - self._base
        if rel <= len(self._buf):
            self._pos = rel
        else:
            self._buf.clear()
            self._base = absolute
            self._pos = 0

    # -- the event loop ----------------------------------------------------------------

    def next_event(self) -> Event | type[NEED_DATA]:
        if self._state is _State.DONE:
            raise RuntimeError("decoder is done: the device state follows")
        while True:
            start, state = self._pos, self._state
            try:
                event = self._step()
            except _NeedData as need:
                self._pos, self._state = start, state
                if self._eof:
                    raise TruncatedError(
                        f"stream ends inside the {need.field}",
                        offset=self._abs(start),
                        field=need.field,
                        expected=f"{need.needed} more bytes",
                        actual="end of file",
                    ) from None
                return NEED_DATA
            if event is not None:
                return event

    def _step(self) -> Event | None:
        state = self._state
        if state is _State.FILE_HEADER:
            self._read_file_header()
            return None
        if state is _State.CONFIGURATION:
            return self._read_configuration()
        if state is _State.SECTION:
            return self._read_section()
        if state is _State.RAM_RECORD:
            return self._read_ram_record()
        if state is _State.MEM_SIZE_ENTRY:
            return self._read_block_entry()
        if state is _State.FOOTER:
            return self._read_footer()
        raise AssertionError(state)

    # reference: qemu_loadvm_state (header checks)
    def _read_file_header(self) -> None:
        cur = self._pos
        magic, cur = self._be32(cur, "file magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadMagicError(
                "not a QEMU migration stream",
                offset=self._abs(self._pos),
                field="QEMU_VM_FILE_MAGIC",
                expected=b"QEVM",
                actual=struct.pack(">I", magic),
            )
        version, cur = self._be32(cur, "file version")
        if version != QEMU_VM_FILE_VERSION:
            msg = "SaveVM v2 format is obsolete" if version == QEMU_VM_FILE_VERSION_COMPAT else "unsupported version"
            raise UnsupportedError(
                msg,
                offset=self._abs(self._pos + 4),
                field="QEMU_VM_FILE_VERSION",
                expected=QEMU_VM_FILE_VERSION,
                actual=version,
            )
        self._pos = cur
        self._state = _State.CONFIGURATION
        return None

    # reference: qemu_loadvm_state (QEMU_VM_CONFIGURATION), vmstate_configuration
    def _read_configuration(self) -> Event:
        start = cur = self._pos
        kind, cur = self._u8(cur, "section type")
        if kind != QEMU_VM_CONFIGURATION:
            # send-configuration=off (Xen): sections follow the header directly.
            self._config = Configuration(offset=self._abs(start), machine_type=None, end_offset=self._abs(start))
            self._state = _State.SECTION
            return self._config
        name_len, cur = self._be32(cur, "machine type length")
        if name_len > MAX_MACHINE_NAME:
            raise LayoutError(
                "machine type name is too long",
                offset=self._abs(cur - 4),
                field="configuration.len",
                expected=f"<= {MAX_MACHINE_NAME}",
                actual=name_len,
            )
        raw, cur = self._take(cur, name_len, "machine type")
        try:
            machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(
                "machine type is not ASCII", offset=self._abs(cur - name_len), field="configuration.name"
            ) from None
        caps: tuple[str, ...] = ()
        page_bits: int | None = None
        uuid: bytes | None = None
        names: list[str] = []
        while True:
            if cur >= len(self._buf) and not self._eof:
                raise _NeedData("configuration subsection", 1)
            if cur >= len(self._buf) or self._buf[cur] != QEMU_VM_SUBSECTION:
                break
            sub_at = cur
            cur += 1
            sub, cur = self._counted_string(cur, "subsection name")
            version, cur = self._be32(cur, "subsection version")
            names.append(sub)
            if version != 1:
                raise UnsupportedError(
                    f"subsection {sub!r} has an unsupported version",
                    offset=self._abs(cur - 4),
                    field="version_id",
                    expected=1,
                    actual=version,
                )
            if sub == "configuration/target-page-bits":
                page_bits, cur = self._be32(cur, "target_page_bits")
                if not 10 <= page_bits <= 20:
                    raise FormatError(
                        "implausible target page size",
                        offset=self._abs(cur - 4),
                        field="target_page_bits",
                        expected="10..20",
                        actual=page_bits,
                    )
            elif sub == "configuration/capabilities":
                count, cur = self._be32(cur, "caps_count")
                if count > MAX_CAPABILITIES:
                    raise LayoutError(
                        "too many capabilities",
                        offset=self._abs(cur - 4),
                        field="caps_count",
                        expected=f"<= {MAX_CAPABILITIES}",
                        actual=count,
                    )
                found = []
                for _ in range(count):
                    cap, cur = self._counted_string(cur, "capability")
                    found.append(cap)
                caps = tuple(found)
                unknown = [c for c in caps if c not in STREAM_CAPABILITIES]
                if unknown:
                    raise UnsupportedError(
                        "unknown validated capability",
                        offset=self._abs(sub_at),
                        field="capabilities",
                        expected=" or ".join(STREAM_CAPABILITIES),
                        actual=unknown[0],
                    )
                ours = next((c for c in (CAP_MAPPEDRAM_ZSTD, CAP_MAPPEDRAM_CHILD) if c in caps), None)
                if ours is not None and CAP_MAPPED_RAM not in caps:
                    raise FormatError(
                        f"capability {ours} without {CAP_MAPPED_RAM}",
                        offset=self._abs(sub_at),
                        field="capabilities",
                        expected=f"{CAP_MAPPED_RAM} listed too",
                        actual=", ".join(caps),
                    )
            elif sub == "configuration/uuid":
                raw_uuid, cur = self._take(cur, 16, "uuid")
                uuid = raw_uuid
            else:
                raise UnsupportedError(
                    "unknown configuration subsection", offset=self._abs(sub_at), field="subsection", actual=sub
                )
        self._pos = cur
        self._config = Configuration(
            offset=self._abs(start),
            machine_type=machine,
            capabilities=caps,
            target_page_bits=page_bits,
            uuid=uuid,
            subsections=tuple(names),
            end_offset=self._abs(cur),
        )
        self._state = _State.SECTION
        return self._config

    # reference: qemu_loadvm_state_main, qemu_loadvm_section_start_full, qemu_loadvm_section_part_end
    def _read_section(self) -> Event:
        start = cur = self._pos
        kind, cur = self._u8(cur, "section type")
        ram = self._ram
        if kind == QEMU_VM_COMMAND:
            cmd, cur = self._be16(cur, "command")
            length, cur = self._be16(cur, "command length")
            if cmd != MIG_CMD_SWITCHOVER_START:
                raise UnsupportedError(
                    "command not expected in a file migration",
                    offset=self._abs(start + 1),
                    field="command",
                    expected=MIG_CMD_SWITCHOVER_START,
                    actual=cmd,
                )
            data, cur = self._take(cur, length, "command data")
            self._pos = cur
            return Command(offset=self._abs(start), cmd=cmd, data=data)
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            section_id, cur = self._be32(cur, "section_id")
            idstr, cur = self._counted_string(cur, "section idstr")
            instance_id, cur = self._be32(cur, "instance_id")
            version_id, cur = self._be32(cur, "version_id")
            if idstr != RAM_SECTION_IDSTR:
                if ram.ended:
                    return self._device_state(start)
                raise UnsupportedError(
                    f"section {idstr!r} before the end of the RAM section",
                    offset=self._abs(start),
                    field="idstr",
                    expected=RAM_SECTION_IDSTR,
                    actual=idstr,
                )
            if kind != QEMU_VM_SECTION_START or ram.started:
                raise FormatError(
                    "unexpected RAM section",
                    offset=self._abs(start),
                    field="section type",
                    expected="one START for 'ram'",
                    actual=SECTION_NAMES.get(kind, kind),
                )
            if instance_id != 0 or version_id != RAM_SECTION_VERSION_ID:
                raise UnsupportedError(
                    "unsupported RAM section version",
                    offset=self._abs(cur - 8),
                    field="version_id" if instance_id == 0 else "instance_id",
                    expected=RAM_SECTION_VERSION_ID if instance_id == 0 else 0,
                    actual=version_id if instance_id == 0 else instance_id,
                )
            ram.started = True
            ram.section_id = section_id
            self._sections[section_id] = idstr
            header = SectionHeader(
                offset=self._abs(start),
                section_type=SectionType(kind),
                section_id=section_id,
                idstr=idstr,
                instance_id=instance_id,
                version_id=version_id,
            )
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            section_id, cur = self._be32(cur, "section_id")
            if section_id not in self._sections or section_id != ram.section_id or ram.ended:
                raise FormatError(
                    "PART/END for an unknown section",
                    offset=self._abs(start + 1),
                    field="section_id",
                    expected=ram.section_id,
                    actual=section_id,
                )
            header = SectionHeader(
                offset=self._abs(start), section_type=SectionType(kind), section_id=section_id, idstr="ram"
            )
            if kind == QEMU_VM_SECTION_END:
                ram.ended = True
        elif kind == QEMU_VM_EOF and ram.ended:
            return self._device_state(start)
        else:
            expected = "a section, a command or EOF" if ram.ended else "a RAM section or a command"
            if kind in (QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION):
                raise FormatError(
                    "stream ends before the RAM section is complete",
                    offset=self._abs(start),
                    field="section type",
                    expected=expected,
                    actual=SECTION_NAMES[kind],
                )
            raise BadMagicError(
                "unknown section type",
                offset=self._abs(start),
                field="section type",
                expected=expected,
                actual=kind,
            )
        self._pos = cur
        self._section = header
        self._state = _State.RAM_RECORD
        return header

    def _device_state(self, start: int) -> DeviceStateStart:
        self._pos = start
        self._state = _State.DONE
        return DeviceStateStart(offset=self._abs(start))

    # reference: ram_load_precopy
    def _read_ram_record(self) -> Event | None:
        assert self._config is not None and self._section is not None
        config = self._config
        page_size = config.page_size
        start = cur = self._pos
        word, cur = self._be64(cur, "RAM record")
        flags = word & (page_size - 1)
        addr = word & ~(page_size - 1)
        if config.mapped_ram:
            # parse_ramblocks / ram_load_precopy: invalid_flags with mapped-ram
            if flags not in (RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_EOS):
                raise FormatError(
                    "Unexpected RAM flags in a mapped-ram stream",
                    offset=self._abs(start),
                    field="RAM_SAVE_FLAG",
                    expected="MEM_SIZE or EOS",
                    actual=_flag_names(flags),
                )
        base = flags & ~RAM_SAVE_FLAG_CONTINUE
        if base == RAM_SAVE_FLAG_EOS and flags == RAM_SAVE_FLAG_EOS:
            if addr != 0:
                raise FormatError("EOS record with an address", offset=self._abs(start), field="addr", actual=addr)
            self._pos = cur
            self._state = _State.FOOTER
            return RamEos(offset=self._abs(start))
        if base == RAM_SAVE_FLAG_MEM_SIZE and flags == RAM_SAVE_FLAG_MEM_SIZE:
            if self._section.section_type is not SectionType.START or self._ram.blocks:
                raise FormatError(
                    "MEM_SIZE outside the RAM START section",
                    offset=self._abs(start),
                    field="RAM_SAVE_FLAG_MEM_SIZE",
                    expected="once, in START",
                    actual=self._section.section_type.name,
                )
            self._pos = cur
            self._ram.remaining = addr
            if addr:
                self._state = _State.MEM_SIZE_ENTRY
            return MemSize(offset=self._abs(start), total=addr)
        if base in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
            return self._read_page(start, cur, addr, flags)
        if base == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            self._pos = cur  # a sync point of socket multifd: no payload, no event
            return None
        if base in (RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_HOOK):
            raise UnsupportedError(
                f"RAM_SAVE_FLAG_{RAM_SAVE_FLAG_NAMES[base]} pages are not supported",
                offset=self._abs(start),
                field="RAM_SAVE_FLAG",
                expected="PAGE or ZERO",
                actual=_flag_names(flags),
            )
        raise FormatError(
            "Unknown combination of migration flags",
            offset=self._abs(start),
            field="RAM_SAVE_FLAG",
            expected="one of MEM_SIZE, ZERO, PAGE, EOS (+CONTINUE)",
            actual=_flag_names(flags) if flags else "0",
        )

    def _read_page(self, start: int, cur: int, addr: int, flags: int) -> RamPage | RamPageRun:
        ram = self._ram
        at = self._abs(start)  # before any jump past the buffer moves the base
        assert self._config is not None
        page_size = self._config.page_size
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if ram.last_block is None:
                raise FormatError(
                    "CONTINUE page without a previous block",
                    offset=self._abs(start),
                    field="RAM_SAVE_FLAG_CONTINUE",
                    expected="an earlier page record naming its block",
                    actual="none",
                )
            idstr = ram.last_block
        else:
            name_at = cur
            idstr, cur = self._counted_string(cur, "page block idstr")
            if idstr not in ram.blocks:
                raise FormatError(
                    "page for an unknown RAM block",
                    offset=self._abs(name_at),
                    field="idstr",
                    expected="a block of the MEM_SIZE list",
                    actual=idstr,
                )
        used_length = ram.blocks[idstr]
        if addr + page_size > used_length:
            raise LayoutError(
                "page outside of the RAM block",
                offset=self._abs(start),
                field="addr",
                expected=f"< used_length {used_length:#x}",
                actual=addr,
                block=idstr,
            )
        if flags & RAM_SAVE_FLAG_PAGE:
            data_offset: int | None = self._abs(cur)
            self._require_then_skip(cur, page_size, "page data")
        else:
            fill, cur = self._u8(cur, "zero page fill byte")
            if fill != 0:
                raise FormatError(
                    "zero page with a non-zero fill byte",
                    offset=self._abs(cur - 1),
                    field="RAM_SAVE_FLAG_ZERO",
                    expected=0,
                    actual=fill,
                    block=idstr,
                )
            self._pos = cur
            data_offset = None
        ram.last_block = idstr
        if self._batch_pages:
            return self._page_run(at, idstr, used_length, addr, data_offset)
        return RamPage(offset=at, idstr=idstr, addr=addr, flags=flags, data_offset=data_offset)

    def _page_run(self, at: int, idstr: str, used_length: int, addr: int, data_offset: int | None) -> RamPageRun:
        """The record just read, and the clean CONTINUE page records of ``idstr`` after it that
        are buffered: one loop iteration per record (the hot path of a legacy file's scan)."""
        assert self._config is not None
        page_size = self._config.page_size
        addrs = [addr]
        offsets = [-1 if data_offset is None else data_offset]
        buf, end, base = self._buf, len(self._buf), self._base
        cur = self._pos
        mask = page_size - 1
        last_addr = used_length - page_size
        want_page = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
        want_zero = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
        unpack = BE64.unpack_from
        limit = self.MAX_RUN
        # the record just read may have jumped past the buffer (its data not buffered)
        while cur + 8 <= end and len(addrs) < limit:
            word = unpack(buf, cur)[0]
            flags = word & mask
            addr = word ^ flags
            if addr > last_addr:
                break  # the general path raises "page outside of the RAM block"
            if flags == want_page:
                if cur + 8 + page_size > end:
                    if self._eof:
                        break  # the general path raises: the page data is cut off
                    addrs.append(addr)
                    offsets.append(base + cur + 8)
                    self._jump(base + cur + 8 + page_size)
                    return self._run_event(at, idstr, addrs, offsets)
                addrs.append(addr)
                offsets.append(base + cur + 8)
                cur += 8 + page_size
            elif flags == want_zero:
                if cur + 9 > end or buf[cur + 8] != 0:
                    break  # the general path waits for the byte, or raises on a non-zero fill
                addrs.append(addr)
                offsets.append(-1)
                cur += 9
            else:
                break
        self._pos = cur
        return self._run_event(at, idstr, addrs, offsets)

    @staticmethod
    def _run_event(at: int, idstr: str, addrs: list[int], offsets: list[int]) -> RamPageRun:
        return RamPageRun(
            offset=at,
            idstr=idstr,
            addrs=np.array(addrs, dtype=np.int64),
            data_offsets=np.array(offsets, dtype=np.int64),
        )

    def _require_then_skip(self, cur: int, n: int, what: str) -> None:
        """Consume ``n`` bytes that need not be buffered: skip them (the caller reads page data)."""
        if cur + n <= len(self._buf):
            self._pos = cur + n
            return
        if self._eof:
            raise _NeedData(what, cur + n - len(self._buf))
        self._jump(self._abs(cur) + n)

    # reference: parse_ramblocks, parse_ramblock, parse_ramblock_mapped_ram
    def _read_block_entry(self) -> Event:
        assert self._config is not None
        config = self._config
        ram = self._ram
        page_size = config.page_size
        start = cur = self._pos
        idstr, cur = self._counted_string(cur, "RAM block idstr")
        used_length, cur = self._be64(cur, "used_length")
        if idstr in ram.blocks:
            raise FormatError(
                "RAM block listed twice", offset=self._abs(start), field="idstr", actual=idstr, block=idstr
            )
        if used_length == 0 or used_length % page_size:
            raise LayoutError(
                "used_length is not a positive multiple of the page size",
                offset=self._abs(cur - 8),
                field="used_length",
                expected=f"multiple of {page_size:#x}",
                actual=used_length,
                block=idstr,
            )
        if used_length > ram.remaining:
            raise LayoutError(
                "RAM blocks exceed the MEM_SIZE total",
                offset=self._abs(cur - 8),
                field="used_length",
                expected=f"<= {ram.remaining:#x} (what MEM_SIZE leaves)",
                actual=used_length,
                block=idstr,
            )
        if not config.mapped_ram and not config.ignore_shared and self._stream_end is not None:
            # A legacy stream sends every page at least once (a ZERO record is 9 bytes):
            # a list claiming more pages than the file has bytes is corrupt.
            self._legacy_pages += used_length // page_size
            if self._legacy_pages > self._stream_end - self._abs(cur):
                raise LayoutError(
                    f"RAM blocks claim more pages than the file's {self._stream_end:,} bytes can hold "
                    "(every page of a legacy stream takes at least one byte): truncated, or a corrupt block list",
                    offset=self._abs(cur - 8),
                    field="used_length",
                    expected=f"<= {self._stream_end - self._abs(cur)} pages in all",
                    actual=f"{self._legacy_pages} pages",
                    block=idstr,
                )
        gpa: int | None = None
        if config.ignore_shared:
            gpa, cur = self._be64(cur, "block GPA")
        header: MappedRamHeader | None = None
        header_offset: int | None = None
        if config.mapped_ram:
            header_offset = self._abs(cur)
            raw, cur = self._take(cur, MappedRamHeader.SIZE, "mapped-ram header")
            header = MappedRamHeader.unpack(raw, header_offset)
            self._check_header(header, header_offset, idstr)
        zstd: ZstdRegionHeader | None = None
        if config.zstd and header is not None:
            raw, cur = self._take(cur, ZstdRegionHeader.SIZE, "zstd region header")
            zstd = ZstdRegionHeader.unpack(raw, self._abs(cur) - ZstdRegionHeader.SIZE)
            self._check_zstd(zstd, header, used_length // page_size, self._abs(cur) - ZstdRegionHeader.SIZE, idstr)
        ram.blocks[idstr] = used_length
        ram.remaining -= used_length
        entry = RamBlockEntry(
            offset=self._abs(start),
            idstr=idstr,
            used_length=used_length,
            gpa=gpa,
            header=header,
            header_offset=header_offset,
            end_offset=self._abs(cur),
            zstd=zstd,
        )
        if header is not None and not (config.ignore_shared and entry.skipped):
            # The next entry (or the EOS) follows the block's page region.
            nxt = header.pages_offset + (used_length if zstd is None else zstd.region_length)
            if nxt < self._abs(cur):
                raise LayoutError(
                    "page region lies before its own header",
                    offset=header_offset,
                    field="pages_offset",
                    expected=f">= {self._abs(cur) - used_length:#x}",
                    actual=header.pages_offset,
                    block=idstr,
                )
            self._jump(nxt)
        else:
            self._pos = cur
        if ram.remaining == 0:
            self._state = _State.RAM_RECORD
        return entry

    def _check_zstd(self, z: ZstdRegionHeader, header: MappedRamHeader, num_pages: int, at: int, idstr: str) -> None:
        """A compressed block's region header: a sane frame size, one frame per run of
        ``frame_pages`` pages, and a region that can hold the seek table and lies in the file."""
        ps = header.page_size
        if not (1 <= z.frame_pages <= MAX_FRAME_PAGES and z.frame_pages & (z.frame_pages - 1) == 0
                and z.frame_pages * ps <= MAX_FRAME_BYTES):  # fmt: skip
            raise LayoutError(
                f"zstd frame size is not a power of two of at most {MAX_FRAME_PAGES} pages and 64 MiB",
                offset=at + 8, field="frame_pages",
                expected=f"1..{min(MAX_FRAME_PAGES, MAX_FRAME_BYTES // ps)}, a power of two",
                actual=z.frame_pages, block=idstr,
            )  # fmt: skip
        want = -(-num_pages // z.frame_pages)
        if z.frames != want:
            raise LayoutError(
                "zstd frame count does not cover the block",
                offset=at + 12, field="frames", expected=f"{want} (pages {num_pages} / frame_pages {z.frame_pages})",
                actual=z.frames, block=idstr,
            )  # fmt: skip
        least = seek_table_size(z.frames) + z.frames * MIN_FRAME_SIZE
        if z.region_length < least:
            raise LayoutError(
                "zstd region is too short for its frames and seek table",
                offset=at, field="region_length", expected=f">= {least}", actual=z.region_length, block=idstr,
            )  # fmt: skip
        if self._stream_end is not None and header.pages_offset + z.region_length > self._stream_end:
            raise TruncatedError(
                f"truncated: the file ends at byte {self._stream_end:,} ({self._stream_end:#x}), inside the "
                f"compressed page region of block {idstr!r}",
                offset=at, field="region_length",
                expected=f"a file of at least {header.pages_offset + z.region_length:,} bytes",
                actual=f"{self._stream_end:,} bytes", block=idstr,
            )  # fmt: skip

    # reference: mapped_ram_read_header, parse_ramblock_mapped_ram
    def _check_header(self, header: MappedRamHeader, at: int, idstr: str) -> None:
        assert self._config is not None
        version = MAPPEDRAM_ZSTD_HDR_VERSION if self._config.zstd else MAPPED_RAM_HDR_VERSION
        if header.version != version:
            raise UnsupportedError(
                "Migration mapped-ram capability version not supported",
                offset=at,
                field="MappedRamHeader.version",
                expected=f"{version:#x}" if self._config.zstd else "1",
                actual=header.version,
                block=idstr,
            )
        if header.page_size != self._config.page_size:
            raise LayoutError(
                "mapped-ram page size differs from the target page size",
                offset=at + 4,
                field="MappedRamHeader.page_size",
                expected=self._config.page_size,
                actual=header.page_size,
                block=idstr,
            )
        if header.pages_offset % self._config.page_size:
            # parse_ramblock_mapped_ram: "region has bad alignment" (a page-size sanity check)
            raise LayoutError(
                f"block {idstr!r}: its pages region has bad alignment",
                offset=at + 20,
                field="MappedRamHeader.pages_offset",
                expected=f"a multiple of the page size {self._config.page_size:#x}",
                actual=header.pages_offset,
                block=idstr,
            )

    # reference: check_section_footer
    def _read_footer(self) -> Event:
        assert self._section is not None
        start = cur = self._pos
        marker, cur = self._u8(cur, "section footer")
        if marker != QEMU_VM_SECTION_FOOTER:
            raise FormatError(
                "Missing section footer",
                offset=self._abs(start),
                field="QEMU_VM_SECTION_FOOTER",
                expected=QEMU_VM_SECTION_FOOTER,
                actual=marker,
            )
        section_id, cur = self._be32(cur, "footer section_id")
        if section_id != self._section.section_id:
            raise FormatError(
                "Mismatched section id in footer",
                offset=self._abs(start + 1),
                field="section_id",
                expected=self._section.section_id,
                actual=section_id,
            )
        self._pos = cur
        self._state = _State.SECTION
        return SectionFooterEvent(offset=self._abs(start), section_id=section_id)


def _flag_names(flags: int) -> str:
    names = [name for bit, name in RAM_SAVE_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(RAM_SAVE_FLAG_NAMES)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"



"""The one place where mapped-ram file offsets are computed and checked (pure, no I/O).

The writer asks :func:`plan_mapped_ram` where every block entry, header, bitmap and
page region goes; the reader builds the same :class:`BlockLayout` from the offsets a
file states and hands it to :func:`check_layout`, which rejects what no valid file
can hold (overlaps, misalignment, regions past the end of the file).

References:
    QEMU migration/ram.c (mapped_ram_setup_ramblock, ram_save_setup,
    parse_ramblock_mapped_ram), docs/devel/migration/mapped-ram.rst.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mappedram.errors import LayoutError
from mappedram.format.bitmap import HOST_WORD_SIZE, bitmap_size
from mappedram.format.chain import ParentRef, encode_parent
from mappedram.format.constants import (
    CAP_MAPPED_RAM,
    CAP_MAPPEDRAM_CHILD,
    CAP_MAPPEDRAM_ZSTD,
    CAP_X_IGNORE_SHARED,
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    MAPPEDRAM_ZSTD_HDR_VERSION,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_EOF,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION_ID,
    STREAM_CAPABILITIES,
    TARGET_PAGE_SIZE,
)
from mappedram.format.encoder import (
    encode_command,
    encode_configuration,
    encode_eos,
    encode_file_header,
    encode_footer,
    encode_mem_size,
    encode_ram_block_entry,
    encode_section_end,
    encode_section_part,
    encode_section_start,
    encode_vmdesc,
)
from mappedram.format.postcopy import (
    encode_open_return_path,
    encode_packaged,
    encode_ping,
    encode_postcopy_advise,
    encode_postcopy_listen,
    encode_postcopy_ram_discard,
    encode_postcopy_run,
)
from mappedram.format.structs import MappedRamHeader, ZstdRegionHeader
from mappedram.format.vmdesc import (
    CLEAN_ZERO_SLOTS,
    PARENT,
    SEAL,
    configuration_entry,
    describe_configuration,
    set_extension,
)

__all__ = [
    "BlockLayout",
    "RamLayout",
    "StreamSpec",
    "FilePlan",
    "LegacyPlan",
    "plan_legacy",
    "StreamPlan",
    "plan_stream",
    "PING_OPENED",
    "PING_PACKAGE",
    "PING_RUN",
    "PING_STARTED",
    "round_up",
    "plan_mapped_ram",
    "plan_file",
    "check_layout",
    "entry_size",
    "machine_has_switchover_start",
]


def round_up(value: int, alignment: int) -> int:
    """ROUND_UP(value, alignment) for a power-of-two or any positive alignment."""
    return (value + alignment - 1) // alignment * alignment


def entry_size(idstr: str, *, with_gpa: bool = False) -> int:
    """Bytes of a MEM_SIZE list entry before its MappedRamHeader: u8 len, idstr, be64 used_length."""
    return 1 + len(idstr.encode("utf-8")) + 8 + (8 if with_gpa else 0)


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Where one RAMBlock's pieces sit in the file (absolute offsets)."""

    idstr: str
    used_length: int
    page_size: int
    entry_offset: int
    header_offset: int
    bitmap_offset: int
    bitmap_size: int
    pages_offset: int
    zstd: ZstdRegionHeader | None = None  # a compressed block: its page region holds zstd frames

    @property
    def num_pages(self) -> int:
        return self.used_length // self.page_size

    @property
    def region_length(self) -> int:
        """Bytes of the page region: used_length, or the compressed region's length."""
        return self.used_length if self.zstd is None else self.zstd.region_length

    @property
    def end(self) -> int:
        """Where the next block entry (or the EOS) starts: pages_offset + the region's length."""
        return self.pages_offset + self.region_length

    @property
    def header_end(self) -> int:
        """The end of the MappedRamHeader (and of a compressed block's region header)."""
        return self.header_offset + MappedRamHeader.SIZE + (0 if self.zstd is None else ZstdRegionHeader.SIZE)

    def header(self) -> MappedRamHeader:
        version = MAPPED_RAM_HDR_VERSION if self.zstd is None else MAPPEDRAM_ZSTD_HDR_VERSION
        return MappedRamHeader(version, self.page_size, self.bitmap_offset, self.pages_offset)

    def entry_bytes(self) -> bytes:
        """The block's MEM_SIZE entry with its header(s), as written at ``entry_offset``."""
        out = encode_ram_block_entry(self.idstr, self.used_length, header=self.header())
        return out if self.zstd is None else out + self.zstd.pack()


@dataclass(frozen=True, slots=True)
class RamLayout:
    blocks: tuple[BlockLayout, ...]
    eos_offset: int  # the RAM START section's EOS, right after the last page region


# reference: ram_save_setup, mapped_ram_setup_ramblock
def plan_mapped_ram(
    blocks: Sequence[tuple[str, int]],
    *,
    entries_offset: int,
    page_size: int = TARGET_PAGE_SIZE,
    alignment: int = MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    word_size: int = HOST_WORD_SIZE,
    with_gpa: bool = False,
    zstd: Sequence[ZstdRegionHeader] | None = None,
) -> RamLayout:
    """Lay out ``blocks`` ((idstr, used_length), in stream order) as QEMU's writer does.

    ``entries_offset`` is the absolute offset of the first entry (right after the
    MEM_SIZE word). The bitmap follows the header; the page region starts at the next
    ``alignment`` boundary of the absolute offset; the next entry follows the page region.

    ``zstd`` lays out a compressed file (format/zstdseek.py): one region header per block
    after its MappedRamHeader, the region that long. A block's ``pages_offset`` does not
    depend on its own region's length, so a writer that compresses block by block plans
    with the lengths it knows and 0 for the rest.
    """
    if alignment % page_size:
        raise ValueError(f"alignment {alignment:#x} is not a multiple of the page size {page_size:#x}")
    pos = entries_offset
    out = []
    if zstd is not None and len(zstd) != len(blocks):
        raise ValueError("one zstd region header per block")
    for k, (idstr, used_length) in enumerate(blocks):
        if used_length <= 0 or used_length % page_size:
            raise ValueError(f"block {idstr!r}: used_length {used_length:#x} is not a multiple of {page_size:#x}")
        z = None if zstd is None else zstd[k]
        header_offset = pos + entry_size(idstr, with_gpa=with_gpa)
        bitmap_offset = header_offset + MappedRamHeader.SIZE + (0 if z is None else ZstdRegionHeader.SIZE)
        size = bitmap_size(used_length // page_size, word_size)
        pages_offset = round_up(bitmap_offset + size, alignment)
        block = BlockLayout(idstr, used_length, page_size, pos, header_offset, bitmap_offset, size, pages_offset, z)
        out.append(block)
        pos = block.end
    return RamLayout(blocks=tuple(out), eos_offset=pos)


# reference: parse_ramblock_mapped_ram (alignment), read_ramblock_mapped_ram (bounds)
def check_layout(blocks: Sequence[BlockLayout], *, stream_start: int, file_size: int) -> None:
    """Raise LayoutError unless every region is aligned, inside the file and disjoint.

    Regions are each block's entry + header, its bitmap and its page region; all of
    them must lie in ``[stream_start, file_size)``.
    """
    regions: list[tuple[int, int, str, str]] = []
    for b in blocks:
        if b.pages_offset % b.page_size:
            raise LayoutError(
                "region has bad alignment",
                offset=b.header_offset + 20,
                field="pages_offset",
                expected=f"multiple of {b.page_size:#x}",
                actual=b.pages_offset,
                block=b.idstr,
            )
        header_end = b.header_end
        regions.append((b.entry_offset, header_end, "header", b.idstr))
        regions.append((b.bitmap_offset, b.bitmap_offset + b.bitmap_size, "bitmap", b.idstr))
        regions.append((b.pages_offset, b.end, "pages", b.idstr))
        for start, end, name, field in (
            (b.bitmap_offset, b.bitmap_offset + b.bitmap_size, "bitmap", "bitmap_offset"),
            (b.pages_offset, b.end, "page region", "pages_offset"),
        ):
            if start < stream_start or end > file_size:
                raise LayoutError(
                    f"{name} lies outside the file",
                    offset=b.header_offset + (12 if field == "bitmap_offset" else 20),
                    field=field,
                    expected=f"{stream_start:#x} <= region, end <= file size {file_size:#x}",
                    actual=f"{start:#x}..{end:#x}",
                    block=b.idstr,
                )
    regions.sort()
    for (_, e1, n1, b1), (s2, e2, n2, b2) in itertools.pairwise(regions):
        if s2 < e1:
            raise LayoutError(
                f"{n2} of block {b2!r} overlaps the {n1} of block {b1!r}",
                offset=s2,
                field=f"{n2}",
                expected=f"to start at or after {e1:#x}",
                actual=f"{s2:#x}..{e2:#x}",
                block=b2,
            )


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What a mapped-ram file carries besides page data (a QEMU file's own values, to rewrite it)."""

    machine_type: str
    capabilities: tuple[str, ...] = (CAP_MAPPED_RAM,)
    ram_section_id: int = 1
    parts: int = 1  # PART sections (QEMU writes one per save iteration)
    switchover_start: bool = True
    device_state: bytes = bytes([QEMU_VM_EOF])  # FULL device sections + QEMU_VM_EOF
    vmdesc: bytes | None = None  # the JSON text; None writes none (suppress-vmdesc)
    parent: ParentRef | None = None  # an incremental snapshot's parent (with the mappedram-child capability)


@dataclass(frozen=True, slots=True)
class FilePlan:
    """Every byte of a mapped-ram file but the pages and bitmaps, and where each piece goes.

    Writing order that keeps a cut-off file recognisable as incomplete (never valid):
    ``head`` at ``start``, each entry, the pages, the bitmaps, then ``tail`` (whose
    vmdesc ends the file) at ``ram.eos_offset``.
    """

    start: int
    head: bytes
    entries: tuple[tuple[int, bytes], ...]
    ram: RamLayout
    tail: bytes

    @property
    def file_size(self) -> int:
        return self.ram.eos_offset + len(self.tail)


# reference: qemu_savevm_state_header, ram_save_setup, ram_save_iterate, ram_save_complete,
# qemu_savevm_state_complete_precopy (the order QEMU writes a file migration in)
def plan_file(
    blocks: Sequence[tuple[str, int]],
    spec: StreamSpec,
    *,
    start: int = 0,
    page_size: int = TARGET_PAGE_SIZE,
    alignment: int = MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    zstd: Sequence[ZstdRegionHeader] | None = None,
) -> FilePlan:
    """A mapped-ram file's plan; with ``zstd`` (and the mappedram-zstd capability in
    ``spec``) a compressed file's: its regions aligned to pages only, every slot's
    zero-ness in the bitmap (the trailer records no clean slots: there are none)."""
    if CAP_MAPPED_RAM not in spec.capabilities:
        raise ValueError("a mapped-ram file needs the mapped-ram capability")
    if (zstd is not None) != (CAP_MAPPEDRAM_ZSTD in spec.capabilities):
        raise ValueError("a compressed file lists the mappedram-zstd capability, and only it")
    if (spec.parent is not None) != (CAP_MAPPEDRAM_CHILD in spec.capabilities) or (
        spec.parent is not None and spec.vmdesc is None
    ):
        raise ValueError("a child file lists the mappedram-child capability and names its parent in a trailer")
    if CAP_X_IGNORE_SHARED in spec.capabilities:
        raise ValueError("x-ignore-shared files are not written (QEMU 10.x cannot load them)")
    sid = spec.ram_section_id
    head = (
        encode_file_header()
        + encode_configuration(spec.machine_type, spec.capabilities)
        + encode_section_start(sid, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION_ID)
        + encode_mem_size(sum(size for _, size in blocks))
    )
    if zstd is not None:
        alignment = page_size
    ram = plan_mapped_ram(blocks, entries_offset=start + len(head), page_size=page_size, alignment=alignment,
                          zstd=zstd)  # fmt: skip
    entries = tuple((b.entry_offset, b.entry_bytes()) for b in ram.blocks)
    tail = bytearray(encode_eos() + encode_footer(sid))
    for _ in range(spec.parts):
        tail += encode_section_part(sid) + encode_eos() + encode_footer(sid)
    if spec.switchover_start:
        tail += encode_command(MIG_CMD_SWITCHOVER_START)
    tail += encode_section_end(sid) + encode_eos() + encode_footer(sid)
    # a child's 0-bit slots may hold its parent's pages (a reflink clone shares them)
    tail += spec.device_state + _trailer(spec, clean_zero_slots=zstd is None and spec.parent is None)
    return FilePlan(start=start, head=head, entries=entries, ram=ram, tail=bytes(tail))


# reference: qemu_savevm_state_header (the "configuration" entry opens the trailer)
def _trailer(spec: StreamSpec, *, clean_zero_slots: bool = False) -> bytes:
    """The vmdesc trailer, its configuration entry describing the configuration section
    this plan writes (so QEMU's analyze-migration.py reads the stream), or b"" for none.

    ``clean_zero_slots`` records that every slot whose bit is 0 reads as zeros: true of
    every mapped-ram file this project writes (a fresh or truncated file is all holes; pass
    1 writes zeros or nothing; a live save punches the slots of pages that became zero).
    A planned trailer is never sealed (a seal copied from a source would not describe the
    new file): ops/seal.py seals a file once its pages are written.
    """
    if spec.vmdesc is None:
        return b""
    entry = configuration_entry(spec.machine_type, [c for c in STREAM_CAPABILITIES if c in spec.capabilities])
    text = set_extension(describe_configuration(spec.vmdesc, entry), SEAL, None)
    text = set_extension(text, PARENT, None if spec.parent is None else encode_parent(spec.parent))
    return encode_vmdesc(set_extension(text, CLEAN_ZERO_SLOTS, True if clean_zero_slots else None))


def machine_has_switchover_start(machine_type: str) -> bool:
    """Machine types >= 10.0 send MIG_CMD_SWITCHOVER_START (hw_compat_9_2 turns it off for
    older versioned types); unversioned types (microvm, isapc) are current and send it."""
    m = re.search(r"-(\d+)\.(\d+)$", machine_type)
    return m is None or (int(m.group(1)), int(m.group(2))) >= (10, 0)


@dataclass(frozen=True, slots=True)
class LegacyPlan:
    """The fixed parts of a legacy (streamed) file: everything before the first page record,
    and what follows the last. Page records are appended between them, in stream order.

    A save of several passes writes ``head``, the first pass's records, ``pass_end``; then
    for each further pass ``part_head``, its records, ``pass_end``; then ``end_head``, the
    last pass's records (sent while the guest is stopped), ``end_tail``.
    """

    start: int
    head: bytes  # header, configuration, RAM START (MEM_SIZE list, EOS, footer), PART header
    pass_end: bytes  # EOS + footer closing a PART section
    part_head: bytes  # the header of a further PART section
    end_head: bytes  # [SWITCHOVER_START], the RAM END section header
    end_tail: bytes  # EOS + footer closing RAM END, device state, vmdesc

    @property
    def tail(self) -> bytes:
        """What follows the last PART section when the END section carries no pages."""
        return self.end_head + self.end_tail


# reference: ram_save_setup, ram_save_iterate, ram_save_complete (legacy, without mapped-ram)
def plan_legacy(blocks: Sequence[tuple[str, int]], spec: StreamSpec, *, start: int = 0) -> LegacyPlan:
    if CAP_MAPPED_RAM in spec.capabilities or CAP_X_IGNORE_SHARED in spec.capabilities:
        raise ValueError("a legacy file is written without mapped-ram and x-ignore-shared")
    sid = spec.ram_section_id
    head = bytearray(
        encode_file_header()
        + encode_configuration(spec.machine_type, spec.capabilities)
        + encode_section_start(sid, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION_ID)
        + encode_mem_size(sum(size for _, size in blocks))
    )
    for idstr, size in blocks:
        head += encode_ram_block_entry(idstr, size)
    head += encode_eos() + encode_footer(sid) + encode_section_part(sid)
    end_head = encode_command(MIG_CMD_SWITCHOVER_START) if spec.switchover_start else b""
    end_head += encode_section_end(sid)
    end_tail = encode_eos() + encode_footer(sid) + spec.device_state + _trailer(spec)
    return LegacyPlan(
        start=start,
        head=bytes(head),
        pass_end=encode_eos() + encode_footer(sid),
        part_head=encode_section_part(sid),
        end_head=end_head,
        end_tail=end_tail,
    )


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """Every byte a source sends a live QEMU destination but the page records.

    Both start with ``opening`` (the destination answers its ping once it has read the
    configuration) and ``head``. Precopy: the PART section of every page (``part_head``, records,
    ``part_end``), then ``precopy_tail`` (RAM END, device state, EOF, vmdesc).
    Postcopy (``head`` advised it): ``package`` (the device state; the
    destination starts the guest when it has read it), ``part_head``, records sent as the
    destination asks and in the background, ``part_end``, then ``postcopy_tail``.
    Both open the return path, so the destination says when it is done (SHUT).
    """

    opening: bytes  # header, configuration, OPEN_RETURN_PATH, PING 1
    head: bytes  # [POSTCOPY_ADVISE], RAM START (MEM_SIZE, the block list, EOS, footer)
    part_head: bytes
    part_end: bytes  # EOS + footer
    precopy_tail: bytes  # [SWITCHOVER_START], RAM END (EOS, footer), device sections, EOF, vmdesc
    # [SWITCHOVER_START], a whole-block RAM_DISCARD per block, PING 2,
    # PACKAGED(POSTCOPY_LISTEN, device sections, PING 3, POSTCOPY_RUN), PING 4
    package: bytes
    postcopy_tail: bytes  # RAM END (EOS, footer), EOF


#: The pings a source sends: after opening the return path, before the package, inside it.
PING_OPENED, PING_PACKAGE, PING_RUN, PING_STARTED = 1, 2, 3, 4


# reference: migration_thread (qemu_savevm_state_header, qemu_savevm_send_open_return_path,
# qemu_savevm_send_ping, qemu_savevm_send_postcopy_advise, qemu_savevm_state_setup),
# postcopy_start (the package), qemu_savevm_state_complete_postcopy
def plan_stream(blocks: Sequence[tuple[str, int]], spec: StreamSpec, *, postcopy: bool) -> StreamPlan:
    if CAP_MAPPED_RAM in spec.capabilities or CAP_X_IGNORE_SHARED in spec.capabilities:
        raise ValueError("a live stream is sent without mapped-ram and x-ignore-shared")
    if not spec.device_state or spec.device_state[-1] != QEMU_VM_EOF:
        raise ValueError("the device state must end with QEMU_VM_EOF")
    sid = spec.ram_section_id
    opening = encode_file_header() + encode_configuration(spec.machine_type, spec.capabilities)
    opening += encode_open_return_path() + encode_ping(PING_OPENED)
    head = bytearray(encode_postcopy_advise() if postcopy else b"")
    head += encode_section_start(sid, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION_ID)
    head += encode_mem_size(sum(size for _, size in blocks))
    for idstr, size in blocks:
        head += encode_ram_block_entry(idstr, size)
    head += encode_eos() + encode_footer(sid)
    end = encode_section_end(sid) + encode_eos() + encode_footer(sid)
    switchover = encode_command(MIG_CMD_SWITCHOVER_START) if spec.switchover_start else b""
    devices = spec.device_state[:-1]  # FULL sections and their footers, without the EOF
    # nothing was sent before the switch, so every page is dirty: QEMU's source then
    # discards whole blocks (ram_postcopy_send_discard_bitmap)
    discards = b"".join(encode_postcopy_ram_discard(idstr, [(0, size)]) for idstr, size in blocks)
    package = discards + encode_ping(PING_PACKAGE)
    package += encode_packaged(encode_postcopy_listen() + devices + encode_ping(PING_RUN) + encode_postcopy_run())
    package += encode_ping(PING_STARTED)
    return StreamPlan(
        opening=opening,
        head=bytes(head),
        part_head=encode_section_part(sid),
        part_end=encode_eos() + encode_footer(sid),
        precopy_tail=switchover + end + spec.device_state + _trailer(spec),
        package=switchover + package,
        postcopy_tail=end + bytes([QEMU_VM_EOF]),
    )

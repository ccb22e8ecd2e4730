"""Read side: open a QEMU migration file (mapped-ram or legacy) and read its RAM lazily.

:func:`open_file` decodes the whole stream structure up front (headers, block list,
bitmaps or the legacy page index, device-state bounds, vmdesc) and checks it; page
data is read only on demand. The stream codec never sees a file: this module feeds it
bytes and attaches the path to its errors.

A libvirt save image (``virsh save``, managed save: libvirt's header and domain XML
before the QEMU stream) is recognised by its magic at the start offset; the QEMU stream
is then read where libvirt's header says it starts, and ``MigrationFile.libvirt`` holds
the decoded header.

References:
    QEMU migration/ram.c (ram_load_precopy, parse_ramblock_mapped_ram,
    read_ramblock_mapped_ram), migration/savevm.c (qemu_loadvm_state);
    libvirt src/qemu/qemu_saveimage.c (qemuSaveImageOpen, qemuSaveImageReadHeader).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from mappedram._runs import assign_last
from mappedram.engine.copy import gather_pages, gather_pages_at
from mappedram.engine.fileio import close_fd, data_extents, file_identity, file_size, open_read, pread_upto, prefetch
from mappedram.engine.pages import FilePages
from mappedram.engine.store import MAX_SOURCES, SOURCE_SHIFT, Source, Store, StoreSpec, ZstdFrames, open_store
from mappedram.errors import FormatError, IOEngineError, LayoutError, TruncatedError, UnsupportedError, UsageError
from mappedram.format.bitmap import HOST_BYTE_ORDER, HOST_WORD_SIZE, Bits, bitmap_size, decode_bitmap, padding_bits_set
from mappedram.format.chain import MAX_CHAIN, ParentRef, decode_parent
from mappedram.format.constants import QEMU_VM_EOF
from mappedram.format.decoder import Decoder
from mappedram.format.events import (
    NEED_DATA,
    Command,
    Configuration,
    DeviceStateStart,
    MemSize,
    RamBlockEntry,
    RamEos,
    RamPage,
    RamPageRun,
    SectionFooterEvent,
    SectionHeader,
)
from mappedram.format.libvirt import LibvirtSaveImage, VirQEMUSaveHeader, decode_save_data, is_libvirt_save
from mappedram.format.seal import Seal, decode_seal
from mappedram.format.vmdesc import CLEAN_ZERO_SLOTS, PARENT, SEAL, extension
from mappedram.format.vmstate import DeviceSection, VmDesc, find_vmdesc, split_device_sections
from mappedram.format.zstdseek import decode_seek_table, frame_lengths, seek_table_size
from mappedram.layout import BlockLayout, check_layout

__all__ = [
    "MigrationFile",
    "RamBlock",
    "SectionRecord",
    "PageListener",
    "open_file",
    "read_configuration",
    "MAX_DEVICE_STATE",
]

#: Device state (and vmdesc) is read into memory; anything larger is refused.
MAX_DEVICE_STATE = 256 << 20
_FEED_CHUNK = 1 << 20
#: While a legacy stream is scanned, the kernel is asked to read this far ahead of the decoder.
_SCAN_AHEAD = 32 << 20


@dataclass(frozen=True, slots=True)
class SectionRecord:
    """A RAM section or command of the stream, as listed by ``info``."""

    offset: int
    kind: str  # START, PART, END, COMMAND
    section_id: int | None
    idstr: str | None


@dataclass(slots=True)
class RamBlock:
    """One RAMBlock of the file.

    ``sources(first, count)`` gives the file offset of each page's bytes, -1 for a page
    that reads as zeros: a mapped-ram page whose bitmap bit is 0 (whatever its slot
    holds), or a legacy page last sent as ZERO or never sent.
    """

    idstr: str
    used_length: int
    page_size: int
    entry_offset: int
    gpa: int | None = None
    layout: BlockLayout | None = None  # mapped-ram only
    bitmap: Bits | None = None  # mapped-ram: the file's bitmap
    legacy_sources: npt.NDArray[np.int64] | None = None  # legacy: data offset per page or -1
    legacy_records: int = 0  # legacy: page records seen for this block, all passes
    skipped: bool = False  # x-ignore-shared block with no pages in the file
    zstd: ZstdFrames | None = None  # a compressed file's block: its frames (checked against the seek table)
    source: int = 0  # the block's pages in the file's StoreSpec (0: the file's own slots)
    parent: RamBlock | None = None  # a child's block: the parent's, for the pages this file does not hold
    parent_base: int = 0  # where the parent's sources start in this file's StoreSpec
    chain_present: Bits | None = None  # a child's block: its pages and its parents', taken once

    @property
    def compressed(self) -> bool:
        return self.zstd is not None

    @property
    def slots(self) -> bool:
        """Each page has a fixed slot of plain bytes in the file (mapped-ram, not compressed):
        the page region can be mapped or read by offset arithmetic."""
        return self.layout is not None and self.zstd is None and self.source == 0 and self.parent is None

    @property
    def num_pages(self) -> int:
        return self.used_length // self.page_size

    @property
    def present(self) -> Bits:
        """Pages whose bytes are in the file (in a chain: in the file or one of its parents)."""
        if self.chain_present is not None:
            return self.chain_present
        return self.own

    @property
    def own(self) -> Bits:
        """Pages whose bytes are in this file itself (a child: the pages it changed)."""
        if self.bitmap is not None:
            return self.bitmap
        if self.legacy_sources is not None:
            return self.legacy_sources >= 0
        return np.zeros(self.num_pages, dtype=np.bool_)

    @property
    def pages_present(self) -> int:
        return int(np.count_nonzero(self.present))

    @property
    def pages_zero(self) -> int:
        return self.num_pages - self.pages_present

    def sources_of(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """:meth:`sources` of the given page numbers only."""
        if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= self.num_pages):
            raise UsageError(f"pages outside block {self.idstr!r} of {self.num_pages} pages")
        if self.layout is not None and self.bitmap is not None:
            out = self._base() + pages.astype(np.int64) * self.page_size
            mine = self.bitmap[pages]
            if self.parent is not None:
                return np.where(mine, out, self._rebase(self.parent.sources_of(pages)))
            out[~mine] = -1
            return out
        if self.legacy_sources is not None:
            return self.legacy_sources[pages]
        return np.full(len(pages), -1, dtype=np.int64)

    def sources(self, first: int = 0, count: int | None = None) -> npt.NDArray[np.int64]:
        count = self.num_pages - first if count is None else count
        if first < 0 or count < 0 or first + count > self.num_pages:
            raise UsageError(f"pages {first}..{first + count} outside block {self.idstr!r} of {self.num_pages} pages")
        if self.layout is not None and self.bitmap is not None:
            idx = np.arange(first, first + count, dtype=np.int64)
            out = self._base() + idx * self.page_size
            mine = self.bitmap[first : first + count]
            if self.parent is not None:
                return np.where(mine, out, self._rebase(self.parent.sources(first, count)))
            out[~mine] = -1
            return out
        if self.legacy_sources is not None:
            return self.legacy_sources[first : first + count].copy()
        return np.full(count, -1, dtype=np.int64)


    def _rebase(self, src: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The parent's source offsets as offsets into this file's StoreSpec."""
        shift = np.int64(self.parent_base) << np.int64(SOURCE_SHIFT)
        return np.where(src >= 0, src + shift, -1)

    def _base(self) -> int:
        """The source offset of page 0: its slot in the file, or page 0 of its source."""
        assert self.layout is not None
        if self.zstd is None:  # the file's own slots (source 0)
            return self.layout.pages_offset
        return self.source << SOURCE_SHIFT


class PageListener(Protocol):
    """Told of a legacy stream's page records while :func:`open_file` scans them, in stream
    order, so a consumer can use each page as it goes by (a conversion that writes while it
    reads). The scan has read the pages' bytes just before, so they are in the page cache.
    Nothing is checked yet beyond the records themselves: a later error still fails the open."""

    def blocks(self, configuration: Configuration, ram_section_id: int, blocks: Sequence[RamBlock]) -> None:
        """The RAM block list, complete (called once, before the first ``pages``)."""

    def pages(self, block: int, pages: npt.NDArray[np.int64], data_offsets: npt.NDArray[np.int64]) -> None:
        """Records of ``blocks[block]``, in order: page numbers, and each page's data offset
        in the file or -1 (a ZERO record). A later record of a page overrides an earlier one."""


@dataclass(slots=True)
class MigrationFile:
    """A decoded migration file; page data stays on disk until read."""

    path: str
    start_offset: int
    file_size: int
    configuration: Configuration
    ram_section_id: int
    mem_size: int
    blocks: list[RamBlock]
    sections: list[SectionRecord]
    device_state_offset: int
    device_state_length: int
    vmdesc: VmDesc | None
    device_sections: list[DeviceSection] | None
    libvirt: LibvirtSaveImage | None = None  # the libvirt save image header, when the file is one
    seal: Seal | None = None  # the trailer's integrity manifest (checked against the blocks; data not read)
    extra_sources: tuple[Source, ...] = ()  # the StoreSpec's sources after the file itself (zstd runs, parents)
    parent: MigrationFile | None = None  # a child's parent, open (its own parent in turn, ...)
    parent_ref: ParentRef | None = None  # what the child's trailer says of its parent
    _fd: int = field(default=-1, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _stores: list[Store] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _spec: StoreSpec | None = field(default=None, repr=False)

    # -- properties ------------------------------------------------------------------

    @property
    def machine_type(self) -> str | None:
        return self.configuration.machine_type

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.configuration.capabilities

    @property
    def mapped_ram(self) -> bool:
        return self.configuration.mapped_ram

    @property
    def format_name(self) -> str:
        if self.compressed:
            return "mapped-ram+zstd"
        return "mapped-ram" if self.mapped_ram else "legacy"

    @property
    def compressed(self) -> bool:
        return self.configuration.zstd

    @property
    def chain(self) -> list[MigrationFile]:
        """This file, its parent, the parent's parent, ... down to the whole file."""
        out: list[MigrationFile] = []
        mf: MigrationFile | None = self
        while mf is not None:
            out.append(mf)
            mf = mf.parent
        return out

    @property
    def store(self) -> str | StoreSpec:
        """What a reader opens to read this file's pages (engine/store.py): the path, or a
        spec whose further sources are the compressed runs (or a chain's other files)."""
        if not self.extra_sources:
            return self.path
        spec = self._spec
        if spec is None:
            ids = tuple((m.path, *m.file_id) for m in self.chain)
            spec = self._spec = StoreSpec((self.path, *self.extra_sources), path=self.path, identities=ids)
        return spec

    @property
    def page_size(self) -> int:
        return self.configuration.page_size

    def block(self, idstr: str) -> RamBlock:
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        names = ", ".join(repr(b.idstr) for b in self.blocks)
        raise UsageError(f"{self.path}: no RAM block {idstr!r} (blocks: {names})")

    @property
    def main_block(self) -> RamBlock:
        """The guest's main RAM: the largest block (QEMU lists blocks largest first)."""
        return max(self.blocks, key=lambda b: b.used_length)

    # -- reading ---------------------------------------------------------------------

    def file_pages(self, block: RamBlock) -> FilePages:
        """The block's pages as a writer's page source (read through the store when needed)."""
        return FilePages(self.path, block.sources, None if isinstance(self.store, str) else self.store)

    def readinto(self, block: RamBlock | str, first_page: int, out: memoryview | bytearray) -> None:
        """Fill ``out`` (a whole number of pages) with the block's pages from ``first_page`` on."""
        b = self.block(block) if isinstance(block, str) else block
        view = memoryview(out).cast("B")
        if len(view) % b.page_size:
            raise UsageError(f"buffer of {len(view)} bytes is not a whole number of {b.page_size}-byte pages")
        count = len(view) // b.page_size
        self._gather(b.sources(first_page, count), b.page_size, view)

    def read_page_list(self, block: RamBlock | str, pages: npt.NDArray[np.int64], out: memoryview | bytearray) -> None:
        """Fill ``out`` with the block's ``pages`` (any page numbers, in that order), one after another."""
        b = self.block(block) if isinstance(block, str) else block
        view = memoryview(out).cast("B")
        if len(view) != len(pages) * b.page_size:
            raise UsageError(f"buffer of {len(view)} bytes for {len(pages)} pages of {b.page_size} bytes")
        self._gather(b.sources_of(pages), b.page_size, view)

    def read_pages_at(
        self, block: RamBlock | str, pages: npt.NDArray[np.int64], out: memoryview, at: npt.NDArray[np.int64]
    ) -> None:
        """Read the block's ``pages`` (each stored in the file) into ``out`` at offsets ``at``."""
        b = self.block(block) if isinstance(block, str) else block
        offsets = b.sources_of(pages)
        if len(offsets) and int(offsets.min()) < 0:
            raise UsageError(f"{self.path}: read_pages_at reads stored pages only (block {b.idstr!r})")
        if not self.extra_sources:
            gather_pages_at(self._fd, self.path, offsets, b.page_size, out, at)
            return
        ps = b.page_size
        tmp = bytearray(len(pages) * ps)
        self._gather(offsets, ps, memoryview(tmp))
        arr = np.frombuffer(out, dtype=np.uint8)
        windows = as_strided(arr, shape=(max(len(arr) - ps + 1, 0), ps), strides=(1, 1))
        windows[at] = np.frombuffer(tmp, dtype=np.uint8).reshape(len(pages), ps)

    def _gather(self, offsets: npt.NDArray[np.int64], page_size: int, out: memoryview) -> None:
        """Pages at source offsets into ``out``: straight from the file, or through this
        thread's store (decompressing frames, reading a chain's other files)."""
        if self._fd < 0:
            raise IOEngineError("read after the file was closed", path=self.path)
        if not self.extra_sources:
            gather_pages(self._fd, self.path, offsets, page_size, out)
            return
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = open_store(self.store)
            with self._lock:
                self._stores.append(store)
        store.gather(offsets, page_size, out)

    def read_pages(self, block: RamBlock | str, first_page: int, count: int = 1) -> bytes:
        b = self.block(block) if isinstance(block, str) else block
        buf = bytearray(count * b.page_size)
        self.readinto(b, first_page, buf)
        return bytes(buf)

    def iter_chunks(self, block: RamBlock | str, chunk_pages: int = 2048) -> Iterator[tuple[int, bytes]]:
        """Yield (first_page, bytes) over the whole block, ``chunk_pages`` pages at a time."""
        b = self.block(block) if isinstance(block, str) else block
        for first in range(0, b.num_pages, chunk_pages):
            yield first, self.read_pages(b, first, min(chunk_pages, b.num_pages - first))

    def device_state(self) -> bytes:
        """The device sections and the QEMU_VM_EOF byte, as one opaque blob."""
        data = pread_upto(self._fd, self.device_state_length, self.device_state_offset, self.path)
        if len(data) != self.device_state_length:
            raise TruncatedError("file shrank while open", offset=self.device_state_offset, path=self.path)
        return data

    @property
    def file_id(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the file decoded: a reader that opens the path again checks it."""
        return file_identity(self._fd, self.path)

    @property
    def clean_zero_slots(self) -> bool:
        """The trailer records that every slot whose bit is 0 reads as zeros (files this
        project writes); QEMU's files make no such promise."""
        return self.vmdesc is not None and extension(self.vmdesc.data, CLEAN_ZERO_SLOTS) is True

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` raw bytes of the file at ``offset`` (short at the end of the file)."""
        return pread_upto(self._fd, length, offset, self.path)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, end)`` that store data (the rest are holes)."""
        return data_extents(self._fd, start, end, self.path)

    def configuration_bytes(self) -> bytes:
        """The configuration section after its type byte (empty when the stream has none)."""
        c = self.configuration
        if c.machine_type is None:
            return b""
        length = c.end_offset - c.offset - 1
        data = pread_upto(self._fd, length, c.offset + 1, self.path)
        if len(data) != length:
            raise TruncatedError("file shrank while open", offset=c.offset, path=self.path)
        return data

    # -- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
            self._local = threading.local()
        for store in stores:
            store.close()
        if self.parent is not None:
            self.parent.close()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close_fd(fd, self.path)

    def __enter__(self) -> MigrationFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_file(
    path: str | os.PathLike[str],
    offset: int = 0,
    *,
    require_vmdesc: bool | None = None,
    listener: PageListener | None = None,
    progress: Callable[[int], None] | None = None,
) -> MigrationFile:
    """Open and decode the migration stream that starts at ``offset`` in ``path``.

    ``offset`` is the ``file:PATH,offset=N`` start; offsets inside the stream are
    absolute and are never shifted by it. A libvirt save image at ``offset`` is read
    through: its QEMU stream starts where libvirt's header says (``start_offset``), and
    ``libvirt`` holds the header and domain XML; a compressed one raises UnsupportedError.

    ``require_vmdesc`` (default: when the stream has a configuration section, as every
    x86 QEMU writes) rejects a file without the vmdesc trailer, which is how a cut-off
    device state shows.

    ``listener`` is told of a legacy stream's page records as the scan reads them;
    ``progress`` is called with the bytes of the file the decoder has passed since its
    last call (they add up to the file's size from ``offset``, page regions included).
    """
    return _open(os.fspath(path), offset, require_vmdesc, listener, progress, ())


def _open(
    path: str,
    offset: int,
    require_vmdesc: bool | None,
    listener: PageListener | None,
    progress: Callable[[int], None] | None,
    below: tuple[tuple[int, int], ...],
) -> MigrationFile:
    """:func:`open_file`; ``below`` are the identities of the children that led here."""
    fd = open_read(path)
    try:
        mf = _decode(fd, path, offset, require_vmdesc, listener, progress)
    except FormatError as exc:
        close_fd(fd, path)
        raise exc.with_path(path) from None
    except BaseException:
        close_fd(fd, path)
        raise
    mf._fd = fd
    if mf.configuration.child:
        try:
            _attach_parent(mf, (*below, file_identity(fd, path)))
        except FormatError as exc:
            mf.close()
            raise exc.with_path(path) if exc.fields.get("path") is None else exc from None
        except BaseException:
            mf.close()
            raise
    return mf


# the chain: format/chain.py
def _attach_parent(mf: MigrationFile, below: tuple[tuple[int, int], ...]) -> None:
    """Open the parent a child names and read the child's missing pages through it."""
    vm = mf.vmdesc
    value = None if vm is None else extension(vm.data, PARENT)
    if vm is None or value is None:
        raise FormatError("chain: a child file (capability mappedram-child) names no parent in its trailer",
                          offset=mf.configuration.offset, field="vmdesc mappedram.parent",
                          expected="the parent's path, size and digest", actual="none")  # fmt: skip
    at = vm.json_offset + max(vm.raw.rfind(b'"' + PARENT.encode("ascii") + b'"'), 0)
    ref = decode_parent(value, offset=at)
    if len(below) > MAX_CHAIN:
        raise FormatError(f"chain: more than {MAX_CHAIN} files deep (a cycle, or a chain to flatten)", offset=at,
                          field="vmdesc mappedram.parent", expected=f"<= {MAX_CHAIN} children",
                          actual=f"{len(below)} children")  # fmt: skip
    where = ref.path if os.path.isabs(ref.path) else os.path.join(os.path.dirname(mf.path) or ".", ref.path)
    try:
        st = os.stat(where)
    except OSError as exc:
        raise FormatError(f"chain: the parent {where} cannot be opened: {exc.strerror}", offset=at,
                          field="vmdesc mappedram.parent.path", expected="the parent file",
                          actual=ref.path) from None  # fmt: skip
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"chain: the parent {where} is not a regular file", offset=at,
                          field="vmdesc mappedram.parent.path", expected="a migration file",
                          actual=ref.path)  # fmt: skip
    if (st.st_dev, st.st_ino) in below:
        raise FormatError(f"chain: the parent {where} is the file itself or one of its children (a cycle)",
                          offset=at, field="vmdesc mappedram.parent.path", expected="an older file",
                          actual=ref.path)  # fmt: skip
    parent = _open(where, 0, None, None, None, below)
    try:
        held = parent.vmdesc.offset if parent.vmdesc is not None else parent.file_size
        if held != ref.stream_bytes:
            raise FormatError(f"chain: the parent {where} changed: its size before its trailer is not the one the "
                              "child recorded", offset=at, field="vmdesc mappedram.parent.stream_bytes",
                              expected=ref.stream_bytes, actual=held)  # fmt: skip
        mine = [(b.idstr, b.used_length) for b in mf.blocks]
        theirs = [(b.idstr, b.used_length) for b in parent.blocks]
        if mine != theirs or parent.page_size != mf.page_size:
            raise FormatError(f"chain: the parent {where} holds other RAM blocks than the child", offset=at,
                              field="RAM blocks", expected=theirs, actual=mine)  # fmt: skip
    except BaseException:
        parent.close()
        raise
    base = 1 + len(mf.extra_sources)
    if base + 1 + len(parent.extra_sources) > MAX_SOURCES:
        parent.close()
        raise FormatError(f"chain: more files and compressed blocks than the {MAX_SOURCES} a reader takes",
                          offset=at, field="vmdesc mappedram.parent", expected=f"<= {MAX_SOURCES} sources",
                          actual=f"{base + 1 + len(parent.extra_sources)} sources")  # fmt: skip
    for b, pb in zip(mf.blocks, parent.blocks):
        b.parent, b.parent_base = pb, base
        b.chain_present = b.own | pb.present  # the bitmaps never change once open
    mf.extra_sources = (*mf.extra_sources, parent.path, *parent.extra_sources)
    mf.parent, mf.parent_ref = parent, ref



def read_configuration(path: str | os.PathLike[str], offset: int = 0) -> Configuration | None:
    """The configuration section at the start of the stream at ``offset`` (through a
    libvirt header), or None if the stream has none; nothing after it is read."""
    path = os.fspath(path)
    fd = open_read(path)
    try:
        size = file_size(fd, path)
        start = offset
        if 0 <= start < size and is_libvirt_save(pread_upto(fd, 16, start, path)):
            start = _read_libvirt(fd, path, start, size).stream_offset
        dec = Decoder(start_offset=start, stream_end=size)
        while True:
            event = dec.next_event()
            if event is NEED_DATA:
                at = dec.feed_offset
                dec.feed(pread_upto(fd, 1 << 16, at, path) if at < size else b"")
            else:
                return event if isinstance(event, Configuration) else None
    except FormatError as exc:
        raise exc.with_path(path) from None
    finally:
        close_fd(fd, path)


def _decode(
    fd: int,
    path: str,
    start: int,
    require_vmdesc: bool | None,
    listener: PageListener | None = None,
    progress: Callable[[int], None] | None = None,
) -> MigrationFile:
    size = file_size(fd, path)
    passed = start  # how far progress has been told
    if start < 0 or start >= size:
        what = "the file is empty (0 bytes)" if size == 0 else f"the file ends at byte {size:,} ({size:#x})"
        raise TruncatedError(
            f"no migration stream at offset {start:#x}: {what} (truncated, or the wrong offset)",
            offset=min(max(start, 0), size),
            field="offset",
            expected=f"a stream start below the file size {size:#x}",
            actual=f"offset {start:#x}",
        )
    libvirt = None
    if is_libvirt_save(pread_upto(fd, 16, start, path)):
        libvirt = _read_libvirt(fd, path, start, size)
        start = libvirt.stream_offset
    dec = Decoder(start_offset=start, stream_end=size, batch_pages=True)
    config: Configuration | None = None
    ram_id: int | None = None
    mem_size = 0
    blocks: list[RamBlock] = []
    by_name: dict[str, RamBlock] = {}
    sections: list[SectionRecord] = []
    page_size = 0
    device_at: int | None = None
    ahead = start
    index: dict[str, int] = {}  # block idstr -> its place in ``blocks``, once the listener has them
    while device_at is None:
        try:
            event = dec.next_event()
        except TruncatedError as exc:
            raise _truncated(exc, size, blocks) from None
        if event is NEED_DATA:
            at = dec.feed_offset
            if at >= ahead and config is not None and not config.mapped_ram:
                # a legacy stream is read whole: keep the disk busy while the records are parsed
                ahead = at + _SCAN_AHEAD
                prefetch(fd, at + _FEED_CHUNK, _SCAN_AHEAD)
            dec.feed(pread_upto(fd, _FEED_CHUNK, at, path) if at < size else b"")
            if progress is not None and at > passed:
                progress(min(at, size) - passed)
                passed = min(at, size)
            continue
        if isinstance(event, RamPageRun):
            b = by_name[event.idstr]
            assert b.legacy_sources is not None
            pages = event.addrs // page_size
            assign_last(b.legacy_sources, pages, event.data_offsets)
            b.legacy_records += len(event.addrs)
            if listener is not None:
                _tell(listener, index, config, ram_id, blocks, b, pages, event.data_offsets)
        elif isinstance(event, RamPage):
            b = by_name[event.idstr]
            assert b.legacy_sources is not None
            data_offset = -1 if event.data_offset is None else event.data_offset
            b.legacy_sources[event.addr // page_size] = data_offset
            b.legacy_records += 1
            if listener is not None:
                one = np.array([event.addr // page_size], dtype=np.int64)
                _tell(listener, index, config, ram_id, blocks, b, one, np.array([data_offset], dtype=np.int64))
        elif isinstance(event, Configuration):
            config = event
            page_size = config.page_size
        elif isinstance(event, SectionHeader):
            sections.append(SectionRecord(event.offset, event.section_type.name, event.section_id, event.idstr))
            ram_id = event.section_id
        elif isinstance(event, MemSize):
            mem_size = event.total
        elif isinstance(event, RamBlockEntry):
            b = _block_from_entry(event, page_size, config)
            blocks.append(b)
            by_name[b.idstr] = b
        elif isinstance(event, Command):
            sections.append(SectionRecord(event.offset, "COMMAND", None, f"cmd {event.cmd}"))
        elif isinstance(event, DeviceStateStart):
            device_at = event.offset
        elif isinstance(event, (RamEos, SectionFooterEvent)):
            pass
    assert config is not None and ram_id is not None
    if progress is not None and size > passed:
        progress(size - passed)

    mapped = [b.layout for b in blocks if b.layout is not None]
    check_layout(mapped, stream_start=start, file_size=size)
    extra: list[Source] = []
    for b in blocks:
        if b.layout is not None:
            _load_bitmap(fd, path, b)
            if b.layout.zstd is not None:
                if len(extra) + 1 >= MAX_SOURCES:
                    raise LayoutError(f"more compressed blocks than the {MAX_SOURCES - 1} a reader takes",
                                      offset=b.entry_offset, field="RAM blocks", expected=f"<= {MAX_SOURCES - 1}",
                                      actual=f"block {len(extra) + 1}", block=b.idstr)  # fmt: skip
                b.zstd = _load_frames(fd, path, b)
                extra.append(b.zstd)
                b.source = len(extra)

    tail_len = size - device_at
    if tail_len > MAX_DEVICE_STATE:
        raise UnsupportedError(
            "device state and vmdesc are too large",
            offset=device_at,
            field="device state",
            expected=f"<= {MAX_DEVICE_STATE:#x} bytes",
            actual=tail_len,
        )
    tail = pread_upto(fd, tail_len, device_at, path)
    vmdesc = find_vmdesc(tail, device_at)
    device_sections: list[DeviceSection] | None = None
    if vmdesc is not None:
        blob = tail[: vmdesc.offset - device_at]
        device_sections = split_device_sections(blob, device_at, vmdesc.devices)
        device_len = len(blob)
    else:
        if require_vmdesc is None:
            require_vmdesc = config.machine_type is not None
        if require_vmdesc or not tail or tail[-1] != QEMU_VM_EOF:
            _cut_trailer(tail, device_at, size)
            raise TruncatedError(
                f"truncated: the file ends at byte {size:,} ({size:#x}), inside the device state that starts "
                f"at {device_at:#x}: no vmdesc trailer ends the file",
                offset=device_at,
                field="QEMU_VM_VMDESCRIPTION",
                expected="device sections, QEMU_VM_EOF, then 0x06 be32 len and the JSON text, ending the file",
                actual=f"end of file at {size:#x}",
            )
        device_len = tail_len
    seal = _decode_seal(vmdesc, blocks, page_size)
    return MigrationFile(
        path=path,
        start_offset=start,
        file_size=size,
        configuration=config,
        ram_section_id=ram_id,
        mem_size=mem_size,
        blocks=blocks,
        sections=sections,
        device_state_offset=device_at,
        device_state_length=device_len,
        vmdesc=vmdesc,
        device_sections=device_sections,
        libvirt=libvirt,
        seal=seal,
        extra_sources=tuple(extra),
    )


def _decode_seal(vmdesc: VmDesc | None, blocks: Sequence[RamBlock], page_size: int) -> Seal | None:
    """The trailer's seal, checked to cover exactly these blocks (FormatError if it does not)."""
    if vmdesc is None:
        return None
    value = extension(vmdesc.data, SEAL)
    if value is None:
        return None
    at = vmdesc.raw.rfind(b'"' + SEAL.encode("ascii") + b'"')
    offset = vmdesc.json_offset + max(at, 0)
    return decode_seal(value, [(b.idstr, b.used_length) for b in blocks], page_size, offset=offset)


def _truncated(exc: TruncatedError, size: int, blocks: Sequence[RamBlock]) -> TruncatedError:
    """The decoder's "stream ends inside ..." restated for a person: the file's size, the
    record or region the cut falls in, and what a whole file has there. Offsets in it lie
    inside the file: a mapped-ram stream resumes past the page regions, which a cut file
    may not reach."""
    if exc.field == "region_length":
        return exc  # the decoder's own account of a cut compressed region says it all
    at = size if exc.offset is None else exc.offset
    more = re.match(r"(\d+) more bytes", str(exc.expected or ""))
    needed = at + int(more.group(1)) if more else at + 1
    region = _region_at(size, blocks)
    if region is not None:
        where, start, end, block = region
        return TruncatedError(
            f"truncated: the file ends at byte {size:,} ({size:#x}), inside {where}",
            offset=start,
            field="file size",
            expected=f"a file of at least {max(end, needed):,} bytes (that region ends at {end:#x})",
            actual=f"{size:,} bytes",
            block=block,
        )
    if at > size:
        if any(b.layout is not None for b in blocks):
            where = f"the mapped-ram page regions, before the stream resumes at {at:#x}"
        else:  # a legacy scan steps over page data without reading it
            where = "the data of a RAM page record"
        return TruncatedError(
            f"truncated: the file ends at byte {size:,} ({size:#x}), inside {where}",
            offset=size,
            field="file size",
            expected=f"a file of at least {needed:,} bytes",
            actual=f"{size:,} bytes",
        )
    return TruncatedError(
        f"truncated: the file ends at byte {size:,} ({size:#x}), inside the {exc.field} at {at:#x}",
        offset=at,
        field=exc.field,
        expected=f"the whole {exc.field}",
        actual=f"end of file at {size:#x}",
        block=exc.block,
    )


def _cut_trailer(tail: bytes, device_at: int, size: int) -> None:
    """Raise the error for a trailer that is there but whose length does not end the file."""
    at = tail.rfind(b"\x06")
    while at >= 0 and tail[at + 5 : at + 7] != b'{"':
        at = tail.rfind(b"\x06", 0, at)
    if at < 0 or at + 5 > len(tail):
        return
    claimed = int.from_bytes(tail[at + 1 : at + 5], "big")
    held = len(tail) - at - 5
    where = device_at + at
    if claimed > held:
        raise TruncatedError(
            f"truncated: the file ends at byte {size:,} ({size:#x}), inside the vmdesc trailer at {where:#x} "
            f"({held:,} of its {claimed:,} bytes of JSON)",
            offset=where,
            field="vmdesc length",
            expected=f"a file of {where + 5 + claimed:,} bytes",
            actual=f"{size:,} bytes",
        )
    raise FormatError(
        f"the vmdesc trailer at {where:#x} claims {claimed:,} bytes of JSON, but {held:,} follow it to the end "
        "of the file",
        offset=where + 1,
        field="vmdesc length",
        expected=held,
        actual=claimed,
    )


def _region_at(size: int, blocks: Sequence[RamBlock]) -> tuple[str, int, int, str] | None:
    """The mapped-ram region (bitmap or pages) of a block that the end of the file cuts."""
    for b in blocks:
        lay = b.layout
        if lay is None:
            continue
        if lay.bitmap_offset <= size < lay.bitmap_offset + lay.bitmap_size:
            end = lay.bitmap_offset + lay.bitmap_size
            return f"the dirty bitmap of block {b.idstr!r}", lay.bitmap_offset, end, b.idstr
        if lay.pages_offset <= size < lay.end:
            page = (size - lay.pages_offset) // lay.page_size
            where = f"the page region of block {b.idstr!r} (page {page:,} of {lay.num_pages:,})"
            return where, lay.pages_offset, lay.end, b.idstr
        if lay.header_offset <= size < lay.end:
            what, first = min((r for r in (("bitmap", lay.bitmap_offset), ("pages", lay.pages_offset)) if r[1] > size),
                              key=lambda r: r[1])  # fmt: skip
            where = (f"the gap before block {b.idstr!r}'s {what}, which its mapped-ram header at "
                     f"{lay.header_offset:#x} places at {first:#x} (or that header is corrupt)")  # fmt: skip
            return where, lay.header_offset, lay.end, b.idstr
    return None


def _tell(
    listener: PageListener,
    index: dict[str, int],
    config: Configuration | None,
    ram_id: int | None,
    blocks: list[RamBlock],
    block: RamBlock,
    pages: npt.NDArray[np.int64],
    data_offsets: npt.NDArray[np.int64],
) -> None:
    if not index:
        # page records follow the block list (ram_save_setup): it is complete now
        assert config is not None and ram_id is not None
        listener.blocks(config, ram_id, blocks)
        index.update((b.idstr, i) for i, b in enumerate(blocks))
    listener.pages(index[block.idstr], pages, data_offsets)


# reference: qemuSaveImageOpen -> qemuSaveImageReadHeader, qemuSaveImageDecompressionStart
def _read_libvirt(fd: int, path: str, start: int, size: int) -> LibvirtSaveImage:
    header = VirQEMUSaveHeader.unpack(pread_upto(fd, VirQEMUSaveHeader.SIZE, start, path), start)
    image = decode_save_data(header, pread_upto(fd, header.data_len, start + header.SIZE, path), start)
    fmt = image.save_format
    if fmt.compressed:
        at = image.stream_offset
        raise UnsupportedError(
            f"libvirt save image is {fmt.label}-compressed: its QEMU stream must be decompressed first "
            f"(e.g. tail -c +{at + 1} FILE | {fmt.label} -dc > STREAM.mig)",
            offset=start + 28,
            field="format",
            expected="raw or sparse",
            actual=f"{fmt.value} ({fmt.label})",
        )
    if image.stream_offset >= size:
        raise TruncatedError(
            "libvirt save image ends before its QEMU stream",
            offset=size,
            field="data_len",
            expected=f"a QEMU stream at {image.stream_offset:#x}",
            actual=f"end of file at {size:#x}",
        )
    return image


def _block_from_entry(entry: RamBlockEntry, page_size: int, config: Configuration | None) -> RamBlock:
    b = RamBlock(
        idstr=entry.idstr,
        used_length=entry.used_length,
        page_size=page_size,
        entry_offset=entry.offset,
        gpa=entry.gpa,
    )
    if entry.header is None:
        b.legacy_sources = np.full(b.num_pages, -1, dtype=np.int64)
        return b
    if config is not None and config.ignore_shared and entry.skipped:
        b.skipped = True
        b.bitmap = np.zeros(b.num_pages, dtype=np.bool_)
        return b
    assert entry.header_offset is not None

    b.layout = BlockLayout(
        idstr=entry.idstr,
        used_length=entry.used_length,
        page_size=entry.header.page_size,
        entry_offset=entry.offset,
        header_offset=entry.header_offset,
        bitmap_offset=entry.header.bitmap_offset,
        bitmap_size=bitmap_size(entry.used_length // entry.header.page_size, HOST_WORD_SIZE),
        pages_offset=entry.header.pages_offset,
        zstd=entry.zstd,
    )
    return b


def _load_frames(fd: int, path: str, b: RamBlock) -> ZstdFrames:
    """A compressed block's frames, from the seek table that ends its region (checked
    against the region header and the block before anything is sized by it)."""
    lay = b.layout
    assert lay is not None and lay.zstd is not None
    z = lay.zstd
    table = seek_table_size(z.frames)
    at = lay.end - table
    raw = pread_upto(fd, table, at, path)
    lengths = frame_lengths(b.num_pages, z.frame_pages, b.page_size)
    sizes = decode_seek_table(raw, frames=z.frames, decompressed=lengths, region_length=z.region_length,
                              offset=at, block=b.idstr)  # fmt: skip
    offsets = lay.pages_offset + np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return ZstdFrames(path, b.idstr, b.page_size, z.frame_pages, offsets, sizes, lengths)


# reference: read_ramblock_mapped_ram ("Error reading dirty bitmap", "page outside of ramblock")
def _load_bitmap(fd: int, path: str, b: RamBlock) -> None:
    lay = b.layout
    assert lay is not None
    raw = pread_upto(fd, lay.bitmap_size, lay.bitmap_offset, path)
    if len(raw) != lay.bitmap_size:
        raise TruncatedError(
            "Error reading dirty bitmap",
            offset=lay.bitmap_offset,
            field="bitmap",
            expected=f"{lay.bitmap_size} bytes",
            actual=f"{len(raw)} bytes",
            block=b.idstr,
        )
    beyond = padding_bits_set(raw, b.num_pages, word_size=HOST_WORD_SIZE, byteorder=HOST_BYTE_ORDER)
    if beyond >= 0:
        raise LayoutError(
            "bitmap marks a page outside of the RAM block",
            offset=lay.bitmap_offset + beyond // 8,
            field="bitmap",
            expected=f"bits only below num_pages {b.num_pages}",
            actual=f"bit {beyond}",
            block=b.idstr,
        )
    b.bitmap = decode_bitmap(raw, b.num_pages, word_size=HOST_WORD_SIZE, byteorder=HOST_BYTE_ORDER)

"""Save RAM into a mapped-ram (or legacy) file that QEMU loads.

The layout planner places every piece (:func:`mappedram.layout.plan_file`); the head
and block entries are written on the main descriptor, pages by N channels
(:mod:`mappedram.engine.pages`), then the bitmaps, then the tail (END, device state,
vmdesc), so a file cut off at any point lacks its vmdesc and never verifies. Every
writer runs under the save protocol (:mod:`mappedram.ops.protocol`).

References:
    QEMU migration/ram.c (ram_save_setup, mapped_ram_setup_ramblock, ram_save_complete),
    migration/multifd-nocomp.c, migration/file.c.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.engine.autodirect import DirectChoice
from mappedram.engine.copy import nonzero_pages
from mappedram.engine.directio import DIRECT_ALIGN
from mappedram.engine.executor import run_tasks
from mappedram.engine.fileio import close_fd, close_quiet, map_file, open_write, pwrite_full, reads_fill_holes
from mappedram.engine.pages import FilePages, MemoryPages, PageReader, PageSource, PageWriteChannel, WriteTask
from mappedram.engine.sequential import SequentialWriter
from mappedram.errors import UsageError
from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import TARGET_PAGE_SIZE
from mappedram.format.encoder import encode_page_records_into, page_records_size
from mappedram.layout import StreamSpec, machine_has_switchover_start, plan_file, plan_legacy

from .options import DEFAULT_MACHINE, DEFAULTS, EngineOptions
from .protocol import CHUNK_PAGES, Written, commit, refuse_same_file, refuse_symlink, resolve_direct
from .seal import SealOptions, SealReport, sealed_body

__all__ = [
    "DEFAULT_MACHINE",
    "MACHINE_ALIASES",
    "LEGACY_STAGING",
    "TimedReport",
    "SaveReport",
    "Source",
    "save",
    "save_files",
    "memory_source",
    "save_sources",
    "save_legacy_sources",
    "save_report",
    "default_vmdesc",
    "block_view",
    "check_machine_type",
    "check_sources",
    "append_records",
]

#: Aliases QEMU resolves before writing the stream; a file must carry the resolved name.
MACHINE_ALIASES = {"pc": "pc-i440fx-10.0", "q35": "pc-q35-10.0"}
#: One RAM block to save: its idstr, its size in bytes, and where its pages come from.
Source = tuple[str, int, PageSource]


def default_vmdesc(page_size: int = TARGET_PAGE_SIZE) -> bytes:
    """The vmdesc of a file with no device sections, in QEMU's JSON style."""
    return b'{"page_size": %d, "devices": []}' % page_size


class TimedReport:
    """Per-phase seconds, their total, and RAM bytes per second over it (for the reports)."""

    __slots__ = ()
    seconds: dict[str, float]
    ram_bytes: int

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def gbps(self) -> float:
        return self.ram_bytes / self.total_seconds / 1e9 if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        d["total_seconds"] = self.total_seconds
        d["gbps"] = self.gbps
        return d


@dataclass(frozen=True, slots=True)
class SaveReport(TimedReport):
    path: str
    offset: int
    file_size: int
    machine_type: str
    ram_bytes: int
    pages_written: int
    pages_zero: int
    bytes_written: int
    channels: int
    direct_io: bool
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    format: str = "mapped-ram"
    direct_io_reason: str = ""  # what chose direct_io, and why (ops/protocol.py resolve_direct)
    seal: SealReport | None = None  # sealed before it got its name


def block_view(buffer: Any, *, writable: bool, name: str) -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise UsageError(f"block {name!r}: {type(buffer).__name__} is not a buffer") from None
    if not view.c_contiguous:
        raise UsageError(f"block {name!r}: buffer is not contiguous")
    if writable and view.readonly:
        raise UsageError(f"block {name!r}: destination buffer is read-only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view




def check_machine_type(machine_type: str) -> None:
    if machine_type in MACHINE_ALIASES:
        raise UsageError(
            f"machine type {machine_type!r} is an alias; QEMU compares the resolved name "
            f"(e.g. {MACHINE_ALIASES[machine_type]!r}, as `info` shows for a file QEMU saved)"
        )


def save(
    path: str | os.PathLike[str],
    blocks: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    machine_type: str = DEFAULT_MACHINE,
    offset: int | None = None,
    device_state: bytes | None = None,
    vmdesc: bytes | None = None,
    ram_section_id: int = 1,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """Save named RAM blocks (any buffers: mmap, numpy array, bytearray) as a mapped-ram file.

    Blocks are written in the order given (QEMU lists them largest first). ``offset``
    writes in place into ``path`` at that offset, as ``file:PATH,offset=N`` (the file is
    truncated there first); otherwise the file appears at ``path`` only once complete.
    ``device_state`` is QEMU's device sections and QEMU_VM_EOF (default: just EOF), with
    ``vmdesc`` its JSON text (default: one listing no devices). ``seal`` seals the file
    (ops/seal.py) before it appears at ``path``.
    """
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    return _save(os.fspath(path), [memory_source(name, buf) for name, buf in items], machine_type, offset,
                 device_state, vmdesc, ram_section_id, options, seal)  # fmt: skip


def memory_source(name: str, buffer: Any, file: str | None = None) -> Source:
    """A block whose pages are held in ``buffer``; ``file``: the file it maps, whose holes
    are zero pages that are never read (engine/pages.py MemoryPages)."""
    view = block_view(buffer, writable=False, name=name)
    if len(view) == 0 or len(view) % TARGET_PAGE_SIZE:
        raise UsageError(f"block {name!r}: size {len(view)} is not a positive multiple of {TARGET_PAGE_SIZE}")
    return (name, len(view), MemoryPages(view, file))


def _save(
    path: str, sources: list[Source], machine_type: str, offset: int | None, device_state: bytes | None,
    vmdesc: bytes | None, ram_section_id: int, options: EngineOptions, seal: SealOptions | None,
) -> SaveReport:  # fmt: skip
    check_machine_type(machine_type)
    spec = StreamSpec(
        machine_type=machine_type,
        ram_section_id=ram_section_id,
        switchover_start=machine_has_switchover_start(machine_type),
        device_state=b"\x00" if device_state is None else device_state,
        vmdesc=default_vmdesc() if vmdesc is None else vmdesc,
    )
    return save_sources(path, sources, spec, offset, options, seal)

def save_files(
    path: str | os.PathLike[str],
    blocks: Sequence[tuple[str, str]],
    *,
    machine_type: str = DEFAULT_MACHINE,
    offset: int | None = None,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """:func:`save` with each block's RAM taken from a raw image file (mapped, not copied).
    On tmpfs the pages in the file's holes are never read: reading them would allocate them."""
    refuse_symlink(os.fspath(path))
    for _, src in blocks:
        refuse_same_file(src, path, "save")
    maps = [(name, map_file(src, writable=False)) for name, src in blocks]
    try:
        sources = [memory_source(name, m, src if reads_fill_holes(src) else None)
                   for (name, m), (_, src) in zip(maps, blocks)]  # fmt: skip
        return _save(os.fspath(path), sources, machine_type, offset, None, None, 1, options, seal)
    finally:
        for _, m in maps:
            try:
                m.close()
            except BufferError:
                pass  # a view of it lives on in an error being raised; the mapping goes with it


def check_sources(target: str, sources: Sequence[Source]) -> None:
    """Raise UsageError unless ``sources`` can be saved to ``target`` (names unique, not onto itself)."""
    if not sources:
        raise UsageError("nothing to save: no RAM blocks")
    names = [n for n, _, _ in sources]
    if len(set(names)) != len(names):
        raise UsageError("block names must be unique")
    for _, _, src in sources:
        if isinstance(src, FilePages):
            refuse_same_file(src.path, target, "save")


def save_sources(
    target: str, sources: Sequence[Source], spec: StreamSpec, offset: int | None, options: EngineOptions,
    seal: SealOptions | None = None,
) -> SaveReport:
    """A mapped-ram save: pages by N channels at their slots, then bitmaps, then the tail."""
    check_sources(target, sources)
    notes: list[str] = []
    choice = resolve_direct(target, options, "write")
    direct = choice.direct
    start = offset or 0
    plan = plan_file([(n, size) for n, size, _ in sources], spec, start=start)
    ps = TARGET_PAGE_SIZE

    def body(fd: int, work: str) -> Written:
        t0 = time.perf_counter()
        pwrite_full(fd, plan.head, start, work)
        for at, data in plan.entries:
            pwrite_full(fd, data, at, work)
        bits = [np.zeros(size // ps, dtype=np.bool_) for _, size, _ in sources]
        tasks = [
            WriteTask(i, first, min(CHUNK_PAGES, len(bits[i]) - first), lay.pages_offset + first * ps,
                      bits[i][first : first + CHUNK_PAGES])
            for i, lay in enumerate(plan.ram.blocks)
            for first in range(0, len(bits[i]), CHUNK_PAGES)
        ]  # fmt: skip
        made: list[PageWriteChannel] = []

        def make_channel(_: int) -> PageWriteChannel:
            ch = PageWriteChannel(work, [s for _, _, s in sources], ps, CHUNK_PAGES, direct=direct)
            made.append(ch)
            return ch

        options.started(sum(size for _, size, _ in sources))
        t1 = time.perf_counter()
        run_tasks(tasks, make_channel, channels=max(1, min(options.channels, len(tasks))), progress=options.progress)
        t2 = time.perf_counter()
        # reference: ram_save_complete -> mapped_ram bitmaps written at completion
        for lay, b in zip(plan.ram.blocks, bits):
            pwrite_full(fd, encode_bitmap(b), lay.bitmap_offset, work)
        pwrite_full(fd, plan.tail, plan.ram.eos_offset, work)
        t3 = time.perf_counter()
        return Written(
            pages=sum(len(b) for b in bits),
            pages_written=sum(int(b.sum()) for b in bits),
            bytes_written=sum(ch.bytes_written for ch in made),
            channels=len(made),
            file_size=plan.file_size,
            seconds={"setup": t1 - t0, "pages": t2 - t1, "finalize": t3 - t2},
        )

    written = commit(target, offset, options.durable, notes, sealed_body(body, seal, start, options))
    return save_report(target, offset, written, spec.machine_type, choice, notes, "mapped-ram")


def save_legacy_sources(
    target: str, sources: Sequence[Source], spec: StreamSpec, offset: int | None, options: EngineOptions,
    seal: SealOptions | None = None,
) -> SaveReport:
    """A legacy (streamed) save: one pass of page records, PAGE or ZERO, in block order.

    Each chunk of pages is read (the next one is prefetched meanwhile), its records are
    encoded straight into the writer's staging buffer, and full buffers are written in one
    call; with ``direct_io`` through O_DIRECT, in whole aligned blocks.
    """
    check_sources(target, sources)
    notes: list[str] = []
    choice = resolve_direct(target, options, "write")
    start = offset or 0
    if choice.direct and start % DIRECT_ALIGN:
        choice = DirectChoice(False, f"offset {start:#x} is not {DIRECT_ALIGN}-aligned: the page cache")
    direct = choice.direct
    plan = plan_legacy([(n, size) for n, size, _ in sources], spec, start=start)
    ps = TARGET_PAGE_SIZE
    chunks = [(i, first, min(CHUNK_PAGES, size // ps - first))
              for i, (_, size, _) in enumerate(sources) for first in range(0, size // ps, CHUNK_PAGES)]  # fmt: skip

    def body(fd: int, work: str) -> Written:
        t0 = time.perf_counter()
        wfd = open_write(work, create=False, direct=True) if direct else fd
        out = SequentialWriter(wfd, work, start, buffer_bytes=LEGACY_STAGING, direct=direct)
        try:
            out.append(plan.head)
            options.started(sum(size for _, size, _ in sources))
            pages = written = 0
            with PageReader([s for _, _, s in sources], ps, CHUNK_PAGES) as reader:
                for k, (index, first, n) in enumerate(chunks):
                    # keep _PREFETCH_CHUNKS chunks in flight while this one is encoded and written
                    for ahead in range(1, _PREFETCH_CHUNKS + 1) if k == 0 else (_PREFETCH_CHUNKS,):
                        if k + ahead < len(chunks):
                            reader.prefetch(*chunks[k + ahead])
                    view = reader.pages(index, first, n)
                    written += _append_page_records(out, sources[index][0] if first == 0 else None, first, view, ps)
                    view.release()
                    pages += n
                    if options.progress is not None:
                        options.progress(n * ps)
            t1 = time.perf_counter()
            out.append(plan.pass_end + plan.tail)
        except BaseException:
            out.discard()
            if wfd != fd:
                close_quiet(wfd)
            raise
        try:
            out.close()
        except BaseException:
            if wfd != fd:
                close_quiet(wfd)
            raise
        if wfd != fd:
            close_fd(wfd, work)
        t2 = time.perf_counter()
        return Written(
            pages=pages,
            pages_written=written,
            bytes_written=written * ps,
            channels=1,
            file_size=out.offset,
            seconds={"setup": 0.0, "pages": t1 - t0, "finalize": t2 - t1},
        )

    written = commit(target, offset, options.durable, notes, sealed_body(body, seal, start, options))
    return save_report(target, offset, written, spec.machine_type, choice, notes, "legacy")


def save_report(
    target: str, offset: int | None, result: Written, machine_type: str, choice: DirectChoice, notes: list[str],
    fmt: str,
) -> SaveReport:
    """The report of a save whose body reported ``result``."""
    return SaveReport(
        path=target,
        offset=offset or 0,
        file_size=result.file_size,
        machine_type=result.machine_type or machine_type,
        ram_bytes=result.pages * TARGET_PAGE_SIZE,
        pages_written=result.pages_written,
        pages_zero=result.pages - result.pages_written,
        bytes_written=result.bytes_written,
        channels=result.channels,
        direct_io=choice.direct,
        direct_io_reason=choice.reason,
        seconds=result.seconds,
        notes=notes,
        format=fmt,
        seal=None if result.seal is None else dataclasses.replace(result.seal, path=target),
    )


#: Chunks the legacy writer asks the kernel to read ahead of the one it encodes.
_PREFETCH_CHUNKS = 3
#: The legacy writer's staging buffer: two chunks of records and some.
LEGACY_STAGING = 2 * CHUNK_PAGES * (TARGET_PAGE_SIZE + 8) + (1 << 20)


def _append_page_records(out: SequentialWriter, idstr: str | None, first: int, view: memoryview, ps: int) -> int:
    """Encode the legacy records of the pages in ``view`` into the writer; return how many are PAGE records."""
    n = len(view) // ps
    pages = np.frombuffer(view, dtype=np.uint8, count=n * ps).reshape(n, ps)
    nonzero = nonzero_pages(view, n, ps)
    append_records(out, idstr, first * ps, pages, nonzero)
    return int(np.count_nonzero(nonzero))


def append_records(
    out: SequentialWriter,
    idstr: str | None,
    addrs: int | npt.NDArray[np.uint64],
    pages: npt.NDArray[np.uint8],
    nonzero: npt.NDArray[np.bool_],
) -> int:
    """Encode legacy page records straight into the writer's staging buffer; return their bytes.

    ``addrs`` is the first page's offset in the block (consecutive pages), or each page's."""
    room = out.reserve(page_records_size(idstr, nonzero, pages.shape[1]))
    try:
        size = encode_page_records_into(idstr, addrs, pages, nonzero, np.frombuffer(room, dtype=np.uint8))
        out.commit(size)
    finally:
        room.release()
    return size

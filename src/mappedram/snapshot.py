"""Save RAM into a mapped-ram file that QEMU loads, restore it, and re-lay any QEMU file.

save: the layout planner places every piece (:func:`mappedram.layout.plan_file`); the
head and block entries are written on the main descriptor, pages by N channels
(:mod:`mappedram.engine.pages`), then the bitmaps, then the tail (END, device state,
vmdesc) — so a file cut off at any point lacks its vmdesc and never verifies. By
default the file is written under a temporary name beside the target, fsynced, renamed
over the target, and the directory fsynced: a failed save leaves nothing at the target.

restore: the whole file is decoded and checked before the first byte of destination
memory is written; then channels read straight into the destination buffers.

References:
    QEMU migration/ram.c (ram_save_setup, mapped_ram_setup_ramblock, ram_save_complete,
    read_ramblock_mapped_ram), migration/multifd-nocomp.c, migration/file.c.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram._runs import assign_last
from mappedram.engine.copy import nonzero_pages
from mappedram.engine.directio import DIRECT_ALIGN, probe_direct_io
from mappedram.engine.executor import Lanes, run_tasks
from mappedram.engine.fileio import (
    close_fd,
    fsync,
    fsync_dir,
    list_dir,
    lock_exclusive,
    map_file,
    open_write,
    pwrite_full,
    replace,
    truncate,
    unlink_quiet,
)
from mappedram.engine.pages import (
    FilePages,
    MemoryPages,
    PageReadChannel,
    PageReader,
    PageSource,
    PageWriteChannel,
    ReadTask,
    WriteTask,
)
from mappedram.engine.sequential import SequentialWriter
from mappedram.errors import IncompleteRestoreError, IOEngineError, UnsupportedError, UsageError
from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import CAP_MAPPED_RAM, CAP_X_IGNORE_SHARED, TARGET_PAGE_SIZE, VALIDATED_CAPABILITIES
from mappedram.format.stream import Configuration, encode_page_records_into, page_records_size
from mappedram.image import MigrationFile, RamBlock, open_file, read_configuration
from mappedram.layout import FilePlan, StreamSpec, machine_has_switchover_start, plan_file, plan_legacy

__all__ = [
    "DEFAULT_MACHINE",
    "SaveReport",
    "RestoreReport",
    "save",
    "restore",
    "rewrite",
    "convert",
    "save_files",
    "restore_files",
    "default_vmdesc",
    "append_records",
    "LEGACY_STAGING",
    "TEMP_MARKER",
]

Progress = Callable[[int], None]

DEFAULT_MACHINE = "pc-q35-10.0"
#: Aliases QEMU resolves before writing the stream; a file must carry the resolved name.
MACHINE_ALIASES = {"pc": "pc-i440fx-10.0", "q35": "pc-q35-10.0"}
#: Pages per channel task (8 MiB of 4 KiB pages).
CHUNK_PAGES = 2048
#: Temporary files of saves in progress are named ``.<target>.mappedram-<pid>-<token>.tmp``.
TEMP_MARKER = ".mappedram-"


def default_vmdesc(page_size: int = TARGET_PAGE_SIZE) -> bytes:
    """The vmdesc of a file with no device sections, in QEMU's JSON style."""
    return b'{"page_size": %d, "devices": []}' % page_size


class _Timed:
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
class SaveReport(_Timed):
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


@dataclass(frozen=True, slots=True)
class RestoreReport(_Timed):
    path: str
    blocks: list[str]
    skipped_blocks: list[str]
    ram_bytes: int
    pages_read: int
    pages_absent: int
    channels: int
    direct_io: bool
    zero_absent: bool
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)


def _as_bytes_view(buffer: Any, *, writable: bool, name: str) -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise UsageError(f"block {name!r}: {type(buffer).__name__} is not a buffer") from None
    if not view.c_contiguous:
        raise UsageError(f"block {name!r}: buffer is not contiguous")
    if writable and view.readonly:
        raise UsageError(f"block {name!r}: destination buffer is read-only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _resolve_direct(path: str, direct_io: bool, fallback: bool, notes: list[str]) -> bool:
    if not direct_io:
        return False
    reason = probe_direct_io(os.path.dirname(os.path.abspath(path)) or ".")
    if reason is None:
        return True
    if fallback:
        notes.append(f"{reason}: wrote through the page cache instead")
        return False
    raise IOEngineError(f"{reason} (use buffered I/O, or allow the fallback)", path=path)


def save(
    path: str | os.PathLike[str],
    blocks: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    machine_type: str = DEFAULT_MACHINE,
    channels: int = 4,
    direct_io: bool = False,
    direct_io_fallback: bool = False,
    offset: int | None = None,
    device_state: bytes | None = None,
    vmdesc: bytes | None = None,
    ram_section_id: int = 1,
    durable: bool = True,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SaveReport:
    """Save named RAM blocks (any buffers: mmap, numpy array, bytearray) as a mapped-ram file.

    Blocks are written in the order given (QEMU lists them largest first). ``offset``
    writes in place into ``path`` at that offset, as ``file:PATH,offset=N`` (the file is
    truncated there first); otherwise the file appears at ``path`` only once complete.
    ``device_state`` is QEMU's device sections and QEMU_VM_EOF (default: just EOF), with
    ``vmdesc`` its JSON text (default: one listing no devices).
    """
    if machine_type in MACHINE_ALIASES:
        raise UsageError(
            f"machine type {machine_type!r} is an alias; QEMU compares the resolved name "
            f"(e.g. {MACHINE_ALIASES[machine_type]!r}, as `info` shows for a file QEMU saved)"
        )
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    sources: list[tuple[str, int, PageSource]] = []
    for name, buf in items:
        view = _as_bytes_view(buf, writable=False, name=name)
        if len(view) == 0 or len(view) % TARGET_PAGE_SIZE:
            raise UsageError(f"block {name!r}: size {len(view)} is not a positive multiple of {TARGET_PAGE_SIZE}")
        sources.append((name, len(view), MemoryPages(view)))
    spec = StreamSpec(
        machine_type=machine_type,
        ram_section_id=ram_section_id,
        switchover_start=machine_has_switchover_start(machine_type),
        device_state=b"\x00" if device_state is None else device_state,
        vmdesc=default_vmdesc() if vmdesc is None else vmdesc,
    )
    return _save(
        os.fspath(path), sources, spec, offset, channels, direct_io, direct_io_fallback, durable, progress, on_start
    )


def rewrite(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    source_offset: int = 0,
    channels: int = 4,
    direct_io: bool = False,
    direct_io_fallback: bool = False,
    offset: int | None = None,
    durable: bool = True,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SaveReport:
    """Re-lay any QEMU file (mapped-ram or legacy) as mapped-ram through this writer.

    The machine type, capabilities (plus mapped-ram), RAM section id, section count,
    device state and vmdesc are kept, so QEMU loads the result (with mapped-ram on)
    into the same machine. This is also legacy -> mapped-ram conversion: a legacy stream
    is read once, each page written to its slot as the scan passes it.
    """
    config = read_configuration(source, source_offset)
    if config is not None and not config.mapped_ram:
        return _rewrite_legacy(
            os.fspath(source), os.fspath(path), source_offset, offset, channels, direct_io, direct_io_fallback,
            durable, progress, on_start,
        )  # fmt: skip
    with open_file(source, source_offset) as mf:
        spec = spec_from(mf)
        sources: list[tuple[str, int, PageSource]] = [
            (b.idstr, b.used_length, FilePages(mf.path, b.sources)) for b in mf.blocks
        ]
        report = _save(
            os.fspath(path), sources, spec, offset, channels, direct_io, direct_io_fallback, durable, progress, on_start
        )
        _note_libvirt(mf, report)
        return report


def convert(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    to: str,
    source_offset: int = 0,
    channels: int = 4,
    direct_io: bool = False,
    direct_io_fallback: bool = False,
    durable: bool = True,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SaveReport:
    """Write any QEMU file (mapped-ram or legacy, any number of passes) as ``to`` ("mapped-ram"
    or "legacy"), keeping machine type, section ids, device state and vmdesc. QEMU loads the
    result with the mapped-ram capability on or off to match."""
    if to == "mapped-ram":
        return rewrite(
            source,
            path,
            source_offset=source_offset,
            channels=channels,
            direct_io=direct_io,
            direct_io_fallback=direct_io_fallback,
            durable=durable,
            progress=progress,
            on_start=on_start,
        )
    if to != "legacy":
        raise UsageError(f"unknown format {to!r}: expected mapped-ram or legacy")
    with open_file(source, source_offset) as mf:
        spec = spec_from(mf)
        spec = StreamSpec(
            machine_type=spec.machine_type,
            capabilities=tuple(c for c in spec.capabilities if c != CAP_MAPPED_RAM),
            ram_section_id=spec.ram_section_id,
            parts=1,
            switchover_start=spec.switchover_start,
            device_state=spec.device_state,
            vmdesc=spec.vmdesc,
        )
        sources: list[tuple[str, int, PageSource]] = [
            (b.idstr, b.used_length, FilePages(mf.path, b.sources)) for b in mf.blocks
        ]
        report = _save_legacy(
            os.fspath(path), sources, spec, None, durable, progress, on_start, direct_io, direct_io_fallback
        )
        _note_libvirt(mf, report)
        return report


def _note_libvirt(mf: MigrationFile, report: SaveReport) -> None:
    if mf.libvirt is not None:
        report.notes.append(_libvirt_note(mf.path, report.path))


def _libvirt_note(source: str, target: str) -> str:
    return (
        f"{source} is a libvirt save image: {target} holds its QEMU stream alone, without "
        f"libvirt's header and domain XML (load it with QEMU, not with virsh restore)"
    )


def spec_from(mf: MigrationFile) -> StreamSpec:
    """The non-RAM content of ``mf``, to write it again as mapped-ram."""
    assert mf.configuration is not None
    return StreamSpec(
        machine_type=_rewrite_machine(mf.configuration, mf.path),
        capabilities=_rewrite_capabilities(mf.configuration, mf.path),
        ram_section_id=mf.ram_section_id,
        parts=sum(1 for s in mf.sections if s.kind == "PART"),
        switchover_start=any(s.kind == "COMMAND" for s in mf.sections),
        device_state=mf.device_state(),
        vmdesc=mf.vmdesc.raw if mf.vmdesc is not None else None,
    )


def _rewrite_machine(config: Configuration, path: str) -> str:
    if config.machine_type is None:
        raise UnsupportedError("file has no configuration section (machine type)", offset=config.offset, path=path)
    return config.machine_type


def _rewrite_capabilities(config: Configuration, path: str) -> tuple[str, ...]:
    """The capabilities a mapped-ram re-lay of a file with ``config`` carries."""
    if CAP_X_IGNORE_SHARED in config.capabilities:
        raise UnsupportedError(
            "x-ignore-shared files cannot be rewritten",
            offset=config.offset,
            path=path,
            field="capabilities",
            actual=CAP_X_IGNORE_SHARED,
        )
    return tuple(c for c in VALIDATED_CAPABILITIES if c in config.capabilities or c == CAP_MAPPED_RAM)


def _rewrite_legacy(
    source: str,
    target: str,
    source_offset: int,
    offset: int | None,
    channels: int,
    direct_io: bool,
    fallback: bool,
    durable: bool,
    progress: Progress | None,
    on_start: Callable[[int], None] | None,
) -> SaveReport:
    """Legacy -> mapped-ram in one read of the source: the scan (:func:`open_file` with a
    listener) hands each run of page records to the lanes that write them to their slots,
    while it reads on. Each 8 MiB chunk of a block always goes to the same lane, so a page
    sent again in a later pass is written after its earlier copy (last write wins); its bit
    ends as its last record says. Nothing of the source is trusted before the scan ends:
    a bad record fails the open, and the temporary file is discarded.
    """
    _check_sources(target, [("", 0, FilePages(source, _no_offsets))], offset is not None)
    notes: list[str] = []
    direct = _resolve_direct(target, direct_io, fallback, notes)

    def body(fd: int, work: str) -> _Written:
        t0 = time.perf_counter()
        writer = _SlotWriter(fd, work, source, source_offset, offset or 0, channels, direct, progress)
        if on_start is not None:
            on_start(os.path.getsize(source) - source_offset)
        with writer:
            with open_file(source, source_offset, listener=writer) as mf:
                t1 = time.perf_counter()
                written = writer.finish(mf)
        written.seconds = {"setup": 0.0, "pages": t1 - t0, "finalize": time.perf_counter() - t1}
        if mf.libvirt is not None:
            notes.append(_libvirt_note(mf.path, target))
        return written

    return _commit(target, offset, durable, notes, None, direct, body)


def _no_offsets(first: int, count: int) -> npt.NDArray[np.int64]:
    raise AssertionError("every task of a streamed rewrite carries its own offsets")


class _SlotWriter:
    """A :class:`~mappedram.image.PageListener` that writes the pages of a legacy stream to
    their mapped-ram slots while the stream is scanned (see :func:`_rewrite_legacy`)."""

    def __init__(
        self,
        fd: int,
        work: str,
        source: str,
        source_offset: int,
        start: int,
        channels: int,
        direct: bool,
        progress: Progress | None,
    ) -> None:
        self.fd, self.work, self.source, self.start = fd, work, source, start
        self.channels = max(1, channels)
        self.direct = direct
        self.progress = progress
        self.plan: FilePlan | None = None
        self.bits: list[npt.NDArray[np.bool_]] = []
        self.lane_base: list[int] = []  # first global chunk number of each block
        self.lanes: Lanes[WriteTask] | None = None
        self.made: list[PageWriteChannel] = []
        self.held: tuple[int, int] | None = None  # (block, chunk) of the records held
        self.held_pages: list[npt.NDArray[np.int64]] = []
        self.held_offsets: list[npt.NDArray[np.int64]] = []
        self.read_to = source_offset  # furthest offset of the source reported to ``progress``

    # -- PageListener ------------------------------------------------------------------

    def blocks(self, configuration: Configuration, ram_section_id: int, blocks: Sequence[RamBlock]) -> None:
        # The head and slots depend only on the configuration and the block list; the tail
        # (device state, vmdesc, PART count) is planned again once the scan has it.
        head_spec = StreamSpec(
            machine_type=_rewrite_machine(configuration, self.source),
            capabilities=_rewrite_capabilities(configuration, self.source),
            ram_section_id=ram_section_id,
        )
        self.plan = plan_file([(b.idstr, b.used_length) for b in blocks], head_spec, start=self.start)
        pwrite_full(self.fd, self.plan.head, self.start, self.work)
        for at, data in self.plan.entries:
            pwrite_full(self.fd, data, at, self.work)
        self.bits = [np.zeros(b.num_pages, dtype=np.bool_) for b in blocks]
        chunks = [-(-b.num_pages // CHUNK_PAGES) for b in blocks]
        self.lane_base = np.concatenate(([0], np.cumsum(chunks)[:-1])).astype(int).tolist()
        self.lanes = Lanes(self._make_channel, lanes=self.channels)

    def pages(self, block: int, pages: npt.NDArray[np.int64], data_offsets: npt.NDArray[np.int64]) -> None:
        chunk = pages // CHUNK_PAGES
        cuts = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(pages)]):
            key = (block, int(chunk[lo]))
            if key != self.held:
                self._flush()
                self.held = key
            self.held_pages.append(pages[lo:hi])
            self.held_offsets.append(data_offsets[lo:hi])
        if self.progress is not None:
            furthest = int(data_offsets.max())
            if furthest > self.read_to:
                self.progress(furthest - self.read_to)
                self.read_to = furthest

    # -- the writing side --------------------------------------------------------------

    def _make_channel(self, _: int) -> PageWriteChannel:
        ch = PageWriteChannel(
            self.work, [FilePages(self.source, _no_offsets)], TARGET_PAGE_SIZE, CHUNK_PAGES, direct=self.direct
        )
        self.made.append(ch)
        return ch

    def _flush(self) -> None:
        """Hand the records held (all of one chunk) to the chunk's lane as one task."""
        if self.held is None:
            return
        assert self.plan is not None and self.lanes is not None
        block, chunk = self.held
        pages = np.concatenate(self.held_pages) if len(self.held_pages) > 1 else self.held_pages[0]
        data = np.concatenate(self.held_offsets) if len(self.held_offsets) > 1 else self.held_offsets[0]
        self.held, self.held_pages, self.held_offsets = None, [], []
        first = chunk * CHUNK_PAGES
        n = min(CHUNK_PAGES, len(self.bits[block]) - first)
        offsets = np.full(n, -1, dtype=np.int64)
        assign_last(offsets, pages - first, data)
        mask = np.zeros(n, dtype=np.bool_)
        mask[pages - first] = True
        lay = self.plan.ram.blocks[block]
        task = WriteTask(
            0, first, n, lay.pages_offset + first * TARGET_PAGE_SIZE, self.bits[block][first : first + n],
            None if bool(mask.all()) else mask, offsets,
        )  # fmt: skip
        self.lanes.submit(self.lane_base[block] + chunk, task)

    def finish(self, mf: MigrationFile) -> _Written:
        """After a clean scan: the last task, then bitmaps and the tail planned from the whole file."""
        if self.plan is None:
            # a stream without page records: every page is a zero page
            assert mf.configuration is not None
            self.blocks(mf.configuration, mf.ram_section_id, mf.blocks)
        assert self.plan is not None and self.lanes is not None
        self._flush()
        self.lanes.close()
        if self.progress is not None:
            self.progress(mf.file_size - self.read_to)
        spec = spec_from(mf)
        plan = plan_file([(b.idstr, b.used_length) for b in mf.blocks], spec, start=self.start)
        if plan.head != self.plan.head or plan.entries != self.plan.entries or plan.ram != self.plan.ram:
            raise AssertionError("the planner placed the head or slots differently once the tail was known")
        for lay, b in zip(plan.ram.blocks, self.bits):
            pwrite_full(self.fd, encode_bitmap(b), lay.bitmap_offset, self.work)
        pwrite_full(self.fd, plan.tail, plan.ram.eos_offset, self.work)
        return _Written(
            pages=sum(len(b) for b in self.bits),
            pages_written=sum(int(b.sum()) for b in self.bits),
            bytes_written=sum(ch.bytes_written for ch in self.made),
            channels=len(self.made),
            file_size=plan.file_size,
            machine_type=spec.machine_type,
        )

    def __enter__(self) -> _SlotWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.lanes is not None:
            self.lanes.__exit__(exc_type, exc, tb)


def _temp_name(target: str) -> str:
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _lock_name(target: str) -> str:
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}{TEMP_MARKER}lock")


def _remove_leftovers(target: str) -> list[str]:
    """Delete temporary files that interrupted saves to ``target`` left (call with the lock held)."""
    head, tail = os.path.split(os.path.abspath(target))
    prefix = f".{tail}{TEMP_MARKER}"
    gone = []
    for name in list_dir(head):
        if name.startswith(prefix) and name.endswith(".tmp"):
            unlink_quiet(os.path.join(head, name))
            gone.append(name)
    return gone


@dataclass(slots=True)
class _Written:
    """What a format writer reports to the save protocol around it."""

    pages: int = 0
    pages_written: int = 0
    bytes_written: int = 0
    channels: int = 1
    file_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    machine_type: str | None = None  # when the writer learns it as it goes


Body = Callable[[int, str], _Written]


def _check_sources(target: str, sources: list[tuple[str, int, PageSource]], in_place: bool) -> None:
    if not sources:
        raise UsageError("nothing to save: no RAM blocks")
    names = [n for n, _, _ in sources]
    if len(set(names)) != len(names):
        raise UsageError("block names must be unique")
    if in_place and os.path.exists(target):
        for _, _, src in sources:
            if isinstance(src, FilePages) and os.path.exists(src.path) and os.path.samefile(src.path, target):
                raise UsageError(f"{target}: cannot write in place onto the file being read; write a new file")


def _save(
    target: str,
    sources: list[tuple[str, int, PageSource]],
    spec: StreamSpec,
    offset: int | None,
    channels: int,
    direct_io: bool,
    fallback: bool,
    durable: bool,
    progress: Progress | None,
    on_start: Callable[[int], None] | None,
) -> SaveReport:
    """A mapped-ram save: pages by N channels at their slots, then bitmaps, then the tail."""
    _check_sources(target, sources, offset is not None)
    notes: list[str] = []
    direct = _resolve_direct(target, direct_io, fallback, notes)
    start = offset or 0
    plan = plan_file([(n, size) for n, size, _ in sources], spec, start=start)
    ps = TARGET_PAGE_SIZE

    def body(fd: int, work: str) -> _Written:
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

        if on_start is not None:
            on_start(sum(size for _, size, _ in sources))
        t1 = time.perf_counter()
        run_tasks(tasks, make_channel, channels=max(1, min(channels, len(tasks))), progress=progress)
        t2 = time.perf_counter()
        # reference: ram_save_complete -> mapped_ram bitmaps written at completion
        for lay, b in zip(plan.ram.blocks, bits):
            pwrite_full(fd, encode_bitmap(b), lay.bitmap_offset, work)
        pwrite_full(fd, plan.tail, plan.ram.eos_offset, work)
        t3 = time.perf_counter()
        return _Written(
            pages=sum(len(b) for b in bits),
            pages_written=sum(int(b.sum()) for b in bits),
            bytes_written=sum(ch.bytes_written for ch in made),
            channels=len(made),
            file_size=plan.file_size,
            seconds={"setup": t1 - t0, "pages": t2 - t1, "finalize": t3 - t2},
        )

    return _commit(target, offset, durable, notes, spec, direct, body)


def _save_legacy(
    target: str,
    sources: list[tuple[str, int, PageSource]],
    spec: StreamSpec,
    offset: int | None,
    durable: bool,
    progress: Progress | None,
    on_start: Callable[[int], None] | None,
    direct_io: bool = False,
    fallback: bool = False,
) -> SaveReport:
    """A legacy (streamed) save: one pass of page records, PAGE or ZERO, in block order.

    Each chunk of pages is read (the next one is prefetched meanwhile), its records are
    encoded straight into the writer's staging buffer, and full buffers are written in one
    call; with ``direct_io`` through O_DIRECT, in whole aligned blocks.
    """
    _check_sources(target, sources, offset is not None)
    notes: list[str] = []
    direct = _resolve_direct(target, direct_io, fallback, notes)
    start = offset or 0
    if direct and start % DIRECT_ALIGN:
        notes.append(f"offset {start:#x} is not {DIRECT_ALIGN}-aligned: wrote through the page cache")
        direct = False
    plan = plan_legacy([(n, size) for n, size, _ in sources], spec, start=start)
    ps = TARGET_PAGE_SIZE
    chunks = [(i, first, min(CHUNK_PAGES, size // ps - first))
              for i, (_, size, _) in enumerate(sources) for first in range(0, size // ps, CHUNK_PAGES)]  # fmt: skip

    def body(fd: int, work: str) -> _Written:
        t0 = time.perf_counter()
        wfd = open_write(work, create=False, direct=True) if direct else fd
        out = SequentialWriter(wfd, work, start, buffer_bytes=LEGACY_STAGING, direct=direct)
        try:
            out.append(plan.head)
            if on_start is not None:
                on_start(sum(size for _, size, _ in sources))
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
                    if progress is not None:
                        progress(n * ps)
            t1 = time.perf_counter()
            out.append(plan.pass_end + plan.tail)
        except BaseException:
            out.discard()
            if wfd != fd:
                os.close(wfd)
            raise
        out.close()
        if wfd != fd:
            close_fd(wfd, work)
        t2 = time.perf_counter()
        return _Written(
            pages=pages,
            pages_written=written,
            bytes_written=written * ps,
            channels=1,
            file_size=out.offset,
            seconds={"setup": 0.0, "pages": t1 - t0, "finalize": t2 - t1},
        )

    return _commit(target, offset, durable, notes, spec, direct, body, "legacy")


#: Chunks the legacy writer asks the kernel to read ahead of the one it encodes.
_PREFETCH_CHUNKS = 3
#: The legacy writer's staging buffer: two chunks of records and some.
LEGACY_STAGING = 2 * CHUNK_PAGES * (TARGET_PAGE_SIZE + 8) + (1 << 20)


def _commit(
    target: str,
    offset: int | None,
    durable: bool,
    notes: list[str],
    spec: StreamSpec | None,
    direct: bool,
    body: Body,
    format_name: str = "mapped-ram",
) -> SaveReport:
    """Run a writer under the save protocol: lock the target, clean leftovers, write a temporary
    file (or in place at ``offset``), fsync, rename over the target, fsync the directory."""
    in_place = offset is not None
    start = offset or 0
    lock = lock_exclusive(_lock_name(target), target)
    try:
        leftovers = _remove_leftovers(target)
        if leftovers:
            notes.append(f"removed {len(leftovers)} temporary file(s) of interrupted saves")
        work = target if in_place else _temp_name(target)
        fd = open_write(work, exclusive=not in_place, mode=0o600)
        try:
            if in_place:
                # reference: file_connect_outgoing (truncate to the start offset, keep what lies before).
                # A new temporary file is empty already; truncating it would make ext4 flush it at close.
                truncate(fd, start, work)
            result = body(fd, work)
            t0 = time.perf_counter()
            if durable:
                fsync(fd, work)
            close_fd(fd, work)
            fd = -1
            if not in_place:
                replace(work, target)
                if durable:
                    fsync_dir(os.path.dirname(os.path.abspath(target)) or ".")
            result.seconds["sync"] = time.perf_counter() - t0
        except BaseException:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if in_place:
                _cut_back(target, start)
            else:
                unlink_quiet(work)
            raise
    finally:
        close_fd(lock, _lock_name(target))
    return SaveReport(
        path=target,
        offset=start,
        file_size=result.file_size,
        machine_type=result.machine_type or (spec.machine_type if spec is not None else ""),
        ram_bytes=result.pages * TARGET_PAGE_SIZE,
        pages_written=result.pages_written,
        pages_zero=result.pages - result.pages_written,
        bytes_written=result.bytes_written,
        channels=result.channels,
        direct_io=direct,
        seconds=result.seconds,
        notes=notes,
        format=format_name,
    )


def _cut_back(path: str, size: int) -> None:
    """After a failed in-place save, drop the partial stream (bytes before ``size`` stay)."""
    try:
        fd = open_write(path, create=False)
    except IOEngineError:
        return
    try:
        truncate(fd, size, path)
    except IOEngineError:
        pass
    finally:
        os.close(fd)


def restore(
    path: str | os.PathLike[str],
    blocks: Mapping[str, Any],
    *,
    offset: int = 0,
    channels: int = 4,
    direct_io: bool = False,
    direct_io_fallback: bool = False,
    zero_absent: bool = False,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RestoreReport:
    """Read the file's RAM blocks into writable buffers, by name.

    The whole file is decoded and checked, and every destination matched and sized,
    before anything is written. Pages whose bit is 0 (zero pages) are left untouched
    unless ``zero_absent`` (for destinations that are not fresh). Blocks of the file
    without a destination are skipped and listed in the report.
    """
    notes: list[str] = []
    t0 = time.perf_counter()
    with open_file(path, offset) as mf:
        dests: list[memoryview] = []
        chosen = []
        for name, buf in blocks.items():
            b = mf.block(name)
            view = _as_bytes_view(buf, writable=True, name=name)
            if len(view) < b.used_length:
                raise UsageError(
                    f"destination of block {name!r} holds {len(view)} bytes; the file's block has {b.used_length}"
                )
            dests.append(view)
            chosen.append(b)
        direct = _resolve_direct(mf.path, direct_io, direct_io_fallback, notes)
        if direct and not mf.mapped_ram:
            notes.append("legacy file: read through the page cache (its pages are not aligned)")
            direct = False
        tasks = [
            ReadTask(i, first, b.sources(first, min(CHUNK_PAGES, b.num_pages - first)), zero_absent)
            for i, b in enumerate(chosen)
            for first in range(0, b.num_pages, CHUNK_PAGES)
        ]
        total = sum(b.used_length for b in chosen)
        if on_start is not None:
            on_start(total)
        made: list[PageReadChannel] = []

        def make_channel(_: int) -> PageReadChannel:
            ch = PageReadChannel(mf.path, dests, mf.page_size, CHUNK_PAGES, direct=direct)
            made.append(ch)
            return ch

        t1 = time.perf_counter()
        done = np.zeros(len(tasks), dtype=np.bool_)
        try:
            if tasks:
                run_tasks(
                    tasks,
                    make_channel,
                    channels=max(1, min(channels, len(tasks))),
                    progress=progress,
                    on_done=lambda i: done.__setitem__(i, True),
                )
        except IOEngineError as exc:
            raise _incomplete(exc, tasks, done, chosen) from exc
        t2 = time.perf_counter()
        read = sum(ch.pages_read for ch in made)
        pages = sum(b.num_pages for b in chosen)
        return RestoreReport(
            path=mf.path,
            blocks=[b.idstr for b in chosen],
            skipped_blocks=[b.idstr for b in mf.blocks if b not in chosen],
            ram_bytes=total,
            pages_read=read,
            pages_absent=pages - read,
            channels=len(made),
            direct_io=direct,
            zero_absent=zero_absent,
            seconds={"validate": t1 - t0, "pages": t2 - t1},
            notes=notes,
        )


def save_files(path: str | os.PathLike[str], blocks: Sequence[tuple[str, str]], **options: Any) -> SaveReport:
    """:func:`save` with each block's RAM taken from a raw image file (mapped, not copied)."""
    maps = [(name, map_file(src, writable=False)) for name, src in blocks]
    try:
        return save(path, maps, **options)
    finally:
        for _, m in maps:
            m.close()


def restore_files(
    path: str | os.PathLike[str], blocks: Sequence[tuple[str, str]], *, offset: int = 0, **options: Any
) -> RestoreReport:
    """:func:`restore` into raw image files (created sparse, or grown, to the block's size)."""
    with open_file(path, offset) as mf:
        sizes = {name: mf.block(name).used_length for name, _ in blocks}
    maps = {name: map_file(dest, writable=True, size=sizes[name]) for name, dest in blocks}
    try:
        report = restore(path, maps, offset=offset, **options)
        for m in maps.values():
            m.flush()
        return report
    finally:
        for m in maps.values():
            m.close()


def _incomplete(
    exc: IOEngineError, tasks: Sequence[ReadTask], done: npt.NDArray[np.bool_], blocks: Sequence[RamBlock]
) -> IncompleteRestoreError:
    """Name the page ranges a failed restore may have left half-written (all others are complete)."""
    ranges: list[dict[str, Any]] = []
    for i in np.flatnonzero(~done).tolist():
        t = tasks[i]
        name, first, count = blocks[t.dest].idstr, t.first_page, len(t.src_offsets)
        last = ranges[-1] if ranges else None
        if last is not None and last["block"] == name and last["first_page"] + last["pages"] == first:
            last["pages"] += count
        else:
            ranges.append({"block": name, "first_page": first, "pages": count})
    where = "; ".join(f"{r['block']} pages {r['first_page']}..{r['first_page'] + r['pages'] - 1}" for r in ranges)
    return IncompleteRestoreError(
        f"restore failed ({exc}); destination may be incomplete in: {where}",
        path=exc.path,
        offset=exc.offset,
        errno=exc.errno,
        incomplete=ranges,
    )


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

"""Re-lay any QEMU file (mapped-ram or legacy) as mapped-ram, and convert between the formats.

The machine type, capabilities, RAM section id, section count, device state and vmdesc
are kept, so QEMU loads the result into the same machine. A legacy source is read once:
the scan (:func:`mappedram.image.open_file` with a listener) hands each run of page
records to lanes that write them to their mapped-ram slots (:class:`SlotWriter`).

References:
    QEMU migration/ram.c (ram_save_setup, mapped_ram_setup_ramblock, ram_load_precopy),
    migration/savevm.c (qemu_savevm_state_header, qemu_loadvm_state).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from mappedram._runs import assign_last
from mappedram.engine.executor import Lanes
from mappedram.engine.fileio import pwrite_full
from mappedram.engine.pages import FilePages, PageWriteChannel, WriteTask
from mappedram.errors import UnsupportedError, UsageError
from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import CAP_MAPPED_RAM, CAP_X_IGNORE_SHARED, TARGET_PAGE_SIZE, VALIDATED_CAPABILITIES
from mappedram.format.events import Configuration
from mappedram.image import MigrationFile, RamBlock, open_file, read_configuration
from mappedram.layout import FilePlan, StreamSpec, plan_file

from .options import CONVERT_FORMATS, DEFAULTS, EngineOptions, Progress
from .protocol import (
    CHUNK_PAGES,
    Written,
    commit,
    refuse_chain_file,
    refuse_same_file,
    refuse_symlink,
    resolve_direct,
)
from .seal import SealOptions, check_chain, sealed_body
from .writer import SaveReport, Source, check_sources, save_legacy_sources, save_report, save_sources

__all__ = ["CONVERT_FORMATS", "rewrite", "convert", "spec_from", "streamed_spec", "SlotWriter"]



def rewrite(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    source_offset: int = 0,
    offset: int | None = None,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """Re-lay any QEMU file (mapped-ram or legacy) as mapped-ram through this writer.

    The machine type, capabilities (plus mapped-ram), RAM section id, section count,
    device state and vmdesc are kept, so QEMU loads the result (with mapped-ram on)
    into the same machine. This is also legacy -> mapped-ram conversion: a legacy stream
    is read once, each page written to its slot as the scan passes it. A seal the source
    has is not copied (it would not describe the new file); ``seal`` seals the output.
    """
    refuse_symlink(os.fspath(path))
    refuse_same_file(source, path, "rewrite")
    config = read_configuration(source, source_offset)
    if config is not None and not config.mapped_ram:
        return _rewrite_legacy(os.fspath(source), os.fspath(path), source_offset, offset, options, seal)
    with open_file(source, source_offset) as mf:
        refuse_chain_file(mf, path, "rewrite")
        check_chain(mf, options.replace(progress=None, on_start=None))
        spec = spec_from(mf)
        sources: list[Source] = [
            (b.idstr, b.used_length, mf.file_pages(b)) for b in mf.blocks
        ]
        report = save_sources(os.fspath(path), sources, spec, offset, options, seal)
        _note_libvirt(mf, report)
        return report


def convert(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    to: str,
    source_offset: int = 0,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """Write any QEMU file (mapped-ram or legacy, any number of passes) as ``to`` ("mapped-ram"
    or "legacy"), keeping machine type, section ids, device state and vmdesc. QEMU loads the
    result with the mapped-ram capability on or off to match."""
    if to == "mapped-ram":
        return rewrite(source, path, source_offset=source_offset, options=options, seal=seal)
    if to not in CONVERT_FORMATS:
        raise UsageError(f"unknown format {to!r}: expected mapped-ram or legacy")
    refuse_symlink(os.fspath(path))
    refuse_same_file(source, path, "convert")
    with open_file(source, source_offset) as mf:
        refuse_chain_file(mf, path, "convert")
        check_chain(mf, options.replace(progress=None, on_start=None))
        spec = streamed_spec(mf)
        sources: list[Source] = [
            (b.idstr, b.used_length, mf.file_pages(b)) for b in mf.blocks
        ]
        report = save_legacy_sources(os.fspath(path), sources, spec, None, options, seal)
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


def streamed_spec(mf: MigrationFile) -> StreamSpec:
    """What ``mf`` carries besides pages, as one streamed pass: its machine type, section id,
    device state and vmdesc, its capabilities but mapped-ram (a stream has no slots)."""
    spec = spec_from(mf)
    return StreamSpec(
        machine_type=spec.machine_type,
        capabilities=tuple(c for c in spec.capabilities if c != CAP_MAPPED_RAM),
        ram_section_id=spec.ram_section_id,
        parts=1,
        switchover_start=spec.switchover_start,
        device_state=spec.device_state,
        vmdesc=spec.vmdesc,
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
    options: EngineOptions,
    seal: SealOptions | None = None,
) -> SaveReport:
    """Legacy -> mapped-ram in one read of the source: the scan (:func:`open_file` with a
    listener) hands each run of page records to the lanes that write them to their slots,
    while it reads on. Each 8 MiB chunk of a block always goes to the same lane, so a page
    sent again in a later pass is written after its earlier copy (last write wins); its bit
    ends as its last record says. Nothing of the source is trusted before the scan ends:
    a bad record fails the open, and the temporary file is discarded.
    """
    check_sources(target, [("", 0, FilePages(source, _no_offsets))])
    notes: list[str] = []
    choice = resolve_direct(target, options, "write")
    direct = choice.direct

    def body(fd: int, work: str) -> Written:
        t0 = time.perf_counter()
        writer = SlotWriter(fd, work, source, source_offset, offset or 0, options.channels, direct, options.progress)
        options.started(os.path.getsize(source) - source_offset)
        with writer:
            with open_file(source, source_offset, listener=writer) as mf:
                t1 = time.perf_counter()
                written = writer.finish(mf)
        written.seconds = {"setup": 0.0, "pages": t1 - t0, "finalize": time.perf_counter() - t1}
        if mf.libvirt is not None:
            notes.append(_libvirt_note(mf.path, target))
        return written

    written = commit(target, offset, options.durable, notes, sealed_body(body, seal, offset or 0, options))
    return save_report(target, offset, written, "", choice, notes, "mapped-ram")


def _no_offsets(first: int, count: int) -> npt.NDArray[np.int64]:
    raise AssertionError("every task of a streamed rewrite carries its own offsets")


class SlotWriter:
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

    def finish(self, mf: MigrationFile) -> Written:
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
        return Written(
            pages=sum(len(b) for b in self.bits),
            pages_written=sum(int(b.sum()) for b in self.bits),
            bytes_written=sum(ch.bytes_written for ch in self.made),
            channels=len(self.made),
            file_size=plan.file_size,
            machine_type=spec.machine_type,
        )

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.lanes is not None:
            self.lanes.__exit__(exc_type, exc, tb)



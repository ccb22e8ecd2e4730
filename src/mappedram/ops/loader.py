"""Restore RAM from any file mappedram reads into buffers or raw image files.

The whole file is decoded and checked (:func:`mappedram.image.open_file`) before the
first byte of destination memory is written; every destination is matched and sized
first too. Then N channels read straight into the destination buffers. A file opened
once is passed along: :func:`restore` takes an open :class:`MigrationFile` as well as a
path, so a caller that inspected the file first (the vm restore) does not decode it again.

References:
    QEMU migration/ram.c (ram_load_precopy, read_ramblock_mapped_ram), migration/file.c.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.engine.autodirect import DirectChoice
from mappedram.engine.executor import run_tasks
from mappedram.engine.fileio import map_file
from mappedram.engine.pages import PageReadChannel, ReadTask
from mappedram.errors import IncompleteRestoreError, IOEngineError, UsageError
from mappedram.image import MigrationFile, RamBlock, open_file

from .options import DEFAULTS, EngineOptions
from .protocol import CHUNK_PAGES, refuse_chain_file, refuse_symlink, resolve_direct
from .seal import NO_CHECK, SEAL_CHECK, SealCheck, SealOptions, checked
from .writer import TimedReport, block_view

__all__ = ["RestoreReport", "restore", "restore_files", "opened"]

#: A file to read: a path, or a file already open (decoded and checked).
Source = str | os.PathLike[str] | MigrationFile



@dataclass(frozen=True, slots=True)
class RestoreReport(TimedReport):
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
    seal: SealCheck | None = None  # the seal checked before the first destination byte (None: not checked)
    direct_io_reason: str = ""  # what chose direct_io, and why (ops/protocol.py resolve_direct)


@contextmanager
def opened(source: Source, offset: int = 0) -> Iterator[MigrationFile]:
    """``source`` open: as given if it is open already (the caller closes it), else opened here."""
    if isinstance(source, MigrationFile):
        yield source
        return
    with open_file(source, offset) as mf:
        yield mf


def restore(
    source: Source,
    blocks: Mapping[str, Any],
    *,
    offset: int = 0,
    zero_absent: bool = False,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions = SEAL_CHECK,
) -> RestoreReport:
    """Read the file's RAM blocks into writable buffers, by name.

    ``source`` is a path (with the stream at ``offset``) or an open file. The whole file
    is decoded and checked, and every destination matched and sized,
    before anything is written. Pages whose bit is 0 (zero pages) are left untouched
    unless ``zero_absent`` (for destinations that are not fresh). Blocks of the file
    without a destination are skipped and listed in the report. A sealed file's digests
    are all checked first (:func:`~mappedram.ops.seal.check_seal`; ``seal`` gives the key,
    or ``verify=False`` skips it): a mismatch raises IntegrityError before anything is written.
    """
    notes: list[str] = []
    t0 = time.perf_counter()
    with opened(source, offset) as mf:
        dests: list[memoryview] = []
        chosen = []
        for name, buf in blocks.items():
            b = mf.block(name)
            view = block_view(buf, writable=True, name=name)
            if len(view) < b.used_length:
                raise UsageError(
                    f"destination of block {name!r} holds {len(view)} bytes; the file's block has {b.used_length}"
                )
            dests.append(view)
            chosen.append(b)
            del view
        check = checked(mf, seal, options)
        if mf.mapped_ram:
            choice = resolve_direct(mf.path, options, "read")
        else:
            choice = DirectChoice(False, "legacy file: the page cache (its pages are not aligned)")
        direct = choice.direct
        tasks = [
            ReadTask(i, first, functools.partial(b.sources, first, min(CHUNK_PAGES, b.num_pages - first)), zero_absent)
            for i, b in enumerate(chosen)
            for first in range(0, b.num_pages, CHUNK_PAGES)
        ]
        total = sum(b.used_length for b in chosen)
        options.started(total)
        made: list[PageReadChannel] = []

        def make_channel(_: int) -> PageReadChannel:
            ch = PageReadChannel(mf.store, dests, mf.page_size, CHUNK_PAGES, direct=direct)
            made.append(ch)
            return ch

        t1 = time.perf_counter()
        done = np.zeros(len(tasks), dtype=np.bool_)
        try:
            if tasks:
                run_tasks(
                    tasks,
                    make_channel,
                    channels=max(1, min(options.channels, len(tasks))),
                    progress=options.progress,
                    on_done=lambda i: done.__setitem__(i, True),
                )
        except IOEngineError as exc:
            raise _incomplete(exc, tasks, done, chosen) from exc
        finally:
            # the destinations' views go now, not when the error's traceback does: a caller
            # that mapped them must be able to close the mappings
            for ch in made:
                ch.dests = ()
            dests.clear()
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
            direct_io_reason=choice.reason,
            zero_absent=zero_absent,
            seconds={"validate": t1 - t0, "pages": t2 - t1},
            notes=notes,
            seal=check,
        )


def restore_files(
    source: Source,
    blocks: Sequence[tuple[str, str]],
    *,
    offset: int = 0,
    zero_absent: bool = False,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions = SEAL_CHECK,
) -> RestoreReport:
    """:func:`restore` into raw image files (created sparse, or grown, to the block's size);
    the seal is checked before a destination file is created or opened."""
    with opened(source, offset) as mf:
        for name, _ in blocks:
            mf.block(name)
        check = checked(mf, seal, options)
        existing = []
        for _, dest in blocks:
            refuse_symlink(dest)
            refuse_chain_file(mf, dest, "restore")
            if os.path.exists(dest):
                existing.append(f"{dest}: an existing file, written in place (its owner and mode "
                                f"{os.stat(dest).st_mode & 0o777:o} kept)")  # fmt: skip
        sizes = {name: mf.block(name).used_length for name, _ in blocks}
        maps = {name: map_file(dest, writable=True, size=sizes[name]) for name, dest in blocks}
        try:
            report = restore(mf, maps, zero_absent=zero_absent, options=options, seal=NO_CHECK)
            report = dataclasses.replace(report, seal=check)
            report.notes.extend(existing)
            for m in maps.values():
                m.flush()
            return report
        except BaseException as exc:
            _release(exc)  # its frames hold views of the maps, which could not be closed
            raise
        finally:
            for m in maps.values():
                m.close()


def _release(exc: BaseException) -> None:
    """Clear the locals of the finished frames of ``exc``'s traceback, and of its causes'."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__


def _incomplete(
    exc: IOEngineError, tasks: Sequence[ReadTask], done: npt.NDArray[np.bool_], blocks: Sequence[RamBlock]
) -> IncompleteRestoreError:
    """Name the page ranges a failed restore may have left half-written (all others are complete)."""
    ranges: list[dict[str, Any]] = []
    for i in np.flatnonzero(~done).tolist():
        t = tasks[i]
        name, first = blocks[t.dest].idstr, t.first_page
        count = min(CHUNK_PAGES, blocks[t.dest].num_pages - first)
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



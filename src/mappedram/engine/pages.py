"""Page channels for save and restore: large positioned writes and reads, zero pages as holes.

Write side (:class:`PageWriteChannel`): a task is a range of pages of one source (a
buffer in memory, or pages read from a file); the channel finds the zero pages with
numpy, records which pages it wrote in the task's ``bits`` view, and writes the
non-zero runs with ``os.pwrite`` straight from the source memory. A source in memory that
maps a file (``MemoryPages.file``) has the file's holes found first (SEEK_HOLE): their pages
are zero pages, never read (on tmpfs a read through the mapping would allocate and clear
each one, the source growing by its holes). Buffered, every zero
page stays a hole. With O_DIRECT it writes whole extents instead (runs merged across
gaps of up to ``merge_gap`` pages, zero pages included: a slot whose bit is 0 may hold
anything), each copied first into a buffer of huge pages (directio.HugeBuffer: few
block-layer segments per request, where the source's own pages would give one per page).
A task with a ``mask`` (a later pass of a live save: its dirty pages) goes through the
page cache, one write per run, unless the channel is ``dense``: then the runs of the
mask are merged into O_DIRECT extents too, the clean pages between them rewritten as the
source holds them now. A ``volatile`` source (RAM a guest keeps writing) has every page
of such an extent whose bit ends 0 written as zeros, not as read: a page found zero may
have been written since, and a slot whose bit is 0 must read as zeros (clean-zero-slots).

Read side (:class:`PageReadChannel`): a task names a destination range and the file
offset of each page (-1 for a page that reads as zeros). When the pages sit in
consecutive slots (mapped-ram) one ``os.preadv`` reads an extent with one iovec per
run: present runs land in the destination, absent runs in a scratch buffer, so the
destination never receives a stale slot. With O_DIRECT an extent is read into a buffer of
huge pages instead and its present pages copied over. Absent pages are left untouched, or zeroed.

The channels know nothing of RAM blocks or QEMU; the caller plans the tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs

from .copy import gather_pages, nonzero_pages, nonzero_pages_at
from .directio import HugeBuffer, aligned_buffer
from .fileio import DataCursor, close_fd, open_read, open_write, preadv_exact, prefetch, punch_hole, pwrite_full
from .store import Store, StoreSpec, open_store, spec_path

__all__ = [
    "MemoryPages",
    "FilePages",
    "PageSource",
    "PageReader",
    "WriteTask",
    "PageWriteChannel",
    "ReadTask",
    "PageReadChannel",
    "merge_runs",
]

#: Absent gaps longer than this (pages) split a read extent, so large holes are not read.
READ_SPLIT_GAP = 256
#: Pages copied from a huge-page read buffer to the destination at a time.
_COPY_PAGES = 256
#: Pages gathered at a time for the zero scan of a source's pages between its file's holes.
_GATHER_PAGES = 256


@dataclass(frozen=True, slots=True)
class MemoryPages:
    """Pages held in memory (any buffer: mmap, numpy array, bytearray); ``file``, the file
    the view maps from its start, if it is one whose holes should not be read (on tmpfs a
    read fills them: engine/fileio.py reads_fill_holes): the pages in its holes are not read."""

    view: memoryview
    file: str | None = None


@dataclass(frozen=True, slots=True)
class FilePages:
    """Pages read from a file: ``offsets(first, count)`` gives each page's source offset or -1
    (a file offset, or with ``store`` an offset into its sources: engine/store.py)."""

    path: str
    offsets: Callable[[int, int], npt.NDArray[np.int64]]
    store: StoreSpec | None = None


PageSource = MemoryPages | FilePages


@dataclass(frozen=True, slots=True)
class WriteTask:
    source: int  # index into the channel's sources
    first_page: int
    npages: int
    file_offset: int  # where page ``first_page`` goes
    bits: npt.NDArray[np.bool_]  # out: True where a page was written (a view of the bitmap)
    # Only these pages (True) are considered; the others keep their bit. None: all of them
    # (a later pass of a live save sends only the pages dirtied since the previous one).
    mask: npt.NDArray[np.bool_] | None = None
    # A file source's page offsets for this task (-1: reads as zeros), instead of the
    # source's own: a conversion writes each pass of a legacy stream as it is read.
    offsets: npt.NDArray[np.int64] | None = None
    # With ``mask``: every chosen page gets its bit, a zero one too, and its slot is made to
    # read as zeros (an incremental snapshot: the bit says the page is this file's, not the parent's).
    defined: bool = False


def merge_runs(
    starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], gap: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Merge runs separated by at most ``gap`` pages (vectorised)."""
    if len(starts) == 0 or gap <= 0:
        return starts, lengths
    ends = starts + lengths
    split = np.flatnonzero(starts[1:] - ends[:-1] > gap) + 1
    first = np.concatenate(([0], split))
    last = np.concatenate((split - 1, [len(starts) - 1]))
    return starts[first], ends[last] - starts[first]


class PageReader:
    """Pages of the sources as memory: a view of a memory source, or a file source's pages
    read into this reader's (reused) buffer. Use as a context manager."""

    def __init__(self, sources: Sequence[PageSource], page_size: int, max_pages: int) -> None:
        self.sources = sources
        self.page_size = page_size
        self.buffer = aligned_buffer(max_pages * page_size)
        self.read_fds: dict[str, int] = {}
        self.stores: dict[int, Store] = {}
        self.cursors: dict[str, DataCursor] = {}

    def pages(
        self, source: int, first: int, count: int, offsets: npt.NDArray[np.int64] | None = None
    ) -> memoryview:
        """Pages ``first`` .. ``first + count`` of a source (of a file source, the pages at
        ``offsets`` when given)."""
        src = self.sources[source]
        ps = self.page_size
        if isinstance(src, MemoryPages):
            return src.view[first * ps : (first + count) * ps]
        out = memoryview(self.buffer)[: count * ps]
        where = src.offsets(first, count) if offsets is None else offsets
        if src.store is not None:
            store = self.stores.get(source)
            if store is None:
                store = self.stores[source] = open_store(src.store)
            store.gather(where, ps, out)
            return out
        fd = self.read_fds.get(src.path)
        if fd is None:
            fd = self.read_fds[src.path] = open_read(src.path)
        gather_pages(fd, src.path, where, ps, out)
        return out

    def data(self, source: int, first: int, count: int) -> npt.NDArray[np.bool_] | None:
        """Which of pages ``first`` .. ``first + count`` of a memory source that maps a file may
        hold data (False: the page lies in a hole of the file and reads as zeros), found with
        SEEK_DATA/SEEK_HOLE, one call pair per data extent; None where all of them may."""
        src = self.sources[source]
        if not isinstance(src, MemoryPages) or src.file is None:
            return None
        cursor = self.cursors.get(src.file)
        if cursor is None:
            fd = self.read_fds.get(src.file)
            if fd is None:
                fd = self.read_fds[src.file] = open_read(src.file)
            cursor = self.cursors[src.file] = DataCursor(fd, src.file)
        ps = self.page_size
        extents = cursor.extents(first * ps, (first + count) * ps)
        if extents == [(first * ps, (first + count) * ps)]:
            return None
        edges = np.zeros(count + 1, dtype=np.int32)
        if extents:
            at = np.array(extents, dtype=np.int64) - first * ps
            np.add.at(edges, at[:, 0] // ps, 1)  # a page partly in an extent counts as data
            np.add.at(edges, -(-at[:, 1] // ps), -1)
        return np.cumsum(edges[:count]) > 0

    def prefetch(self, source: int, first: int, count: int) -> None:
        """Start reading pages of a file source into the page cache, for a later :meth:`pages`."""
        src = self.sources[source]
        if isinstance(src, MemoryPages) or src.store is not None or count <= 0:
            return
        offsets = src.offsets(first, count)
        present = offsets[offsets >= 0]
        if present.size:
            fd = self.read_fds.get(src.path)
            if fd is None:
                fd = self.read_fds[src.path] = open_read(src.path)
            lo, hi = int(present.min()), int(present.max()) + self.page_size
            prefetch(fd, lo, hi - lo)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        for fd in self.read_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.buffer.close()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PageWriteChannel:
    """One writer: its own descriptor on the target (O_DIRECT or not), and its own buffers."""

    def __init__(
        self,
        path: str,
        sources: Sequence[PageSource],
        page_size: int,
        max_pages: int,
        *,
        direct: bool = False,
        merge_gap: int = 64,
        on_write: Callable[[int], None] | None = None,
        dense: bool = False,
        volatile: bool = False,
    ) -> None:
        self.path = path
        self.dense = dense  # with ``direct``: masked tasks are written in merged O_DIRECT extents
        self.volatile = volatile  # the sources may change while they are written
        self.on_write = on_write  # called with the bytes of each write (a bandwidth limit)
        self.page_size = page_size
        self.direct = direct
        self.merge_gap = merge_gap
        self.fd = open_write(path, create=False, direct=direct)
        self.reader = PageReader(sources, page_size, max_pages)
        self.buffer = self.reader.buffer
        self._buffered = -1  # a page-cache descriptor for sparse dirty sets, opened when needed
        self._huge: HugeBuffer | None = None  # what O_DIRECT writes from, made when first needed
        self.pages_written = 0
        self.bytes_written = 0
        self.pages_punched = 0  # slots of pages that became zero, made to read as zeros again

    def run(self, task: WriteTask) -> int:
        ps = self.page_size
        view = self.reader.pages(task.source, task.first_page, task.npages, task.offsets)
        # The dirty pages of a later pass of a live save are scattered: O_DIRECT would write
        # each run synchronously, so they go through the page cache (the save's fsync makes
        # them durable), unless the pass is dense enough to rewrite the clean pages between them.
        direct = self.direct and (task.mask is None or self.dense)
        # pages not in the holes of the file a memory source maps (None: all may hold data)
        held = self.reader.data(task.source, task.first_page, task.npages) if task.mask is None else None
        if task.mask is None:
            keep = nonzero_pages(view, task.npages, ps) if held is None else self._nonzero_data(view, held)
            task.bits[:] = keep
            content = keep  # what the slots must hold from the source; the rest reads as zeros
            starts, lengths = bit_runs(keep)
        else:
            chosen = np.flatnonzero(task.mask)
            keep = np.zeros(task.npages, dtype=np.bool_)
            keep[chosen] = nonzero_pages_at(view, chosen, ps)
            # A page written before that is zero now: its bit goes to 0, and its slot must
            # read as zeros again (a slot whose bit is 0 never holds stale bytes), so it is
            # punched, or written as zeros inside an extent.
            gone = np.zeros(task.npages, dtype=np.bool_)
            gone[chosen] = (True if task.defined else task.bits[chosen]) & ~keep[chosen]
            task.bits[chosen] = True if task.defined else keep[chosen]
            content = keep | (~task.mask & task.bits)
            if direct:
                starts, lengths = bit_runs(task.mask)  # every chosen slot is rewritten: no punch
            else:
                if gone.any():
                    self._punch(gone, task.file_offset)
                starts, lengths = bit_runs(keep)
        fd = self.fd if direct or not self.direct else self._buffered_fd()
        zero_rest = direct and (self.volatile or task.mask is not None)
        if direct:
            starts, lengths = merge_runs(starts, lengths, self.merge_gap)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            data = view[s * ps : (s + n) * ps]
            if direct:
                # O_DIRECT from huge pages, not from the source's scattered pages (HugeBuffer)
                bounce = self._bounce().view[: n * ps]
                if held is not None and not held[s : s + n].all():
                    self._copy_data(bounce, data, held[s : s + n])
                else:
                    bounce[:] = data
                if zero_rest:
                    rest = ~content[s : s + n]
                    if rest.any():
                        np.frombuffer(bounce, dtype=np.uint64).reshape(n, ps // 8)[rest] = 0
                data = bounce
            pwrite_full(fd, data, task.file_offset + s * ps, self.path)
            self.bytes_written += n * ps
            if self.on_write is not None:
                self.on_write(n * ps)
        self.pages_written += int(np.count_nonzero(keep))
        return (task.npages if task.mask is None else len(chosen)) * ps  # RAM bytes this task covered

    def _nonzero_data(self, view: memoryview, data: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """:func:`nonzero_pages` of the pages where ``data`` is True; the others are zero pages."""
        ps = self.page_size
        keep = np.zeros(len(data), dtype=np.bool_)
        starts, lengths = bit_runs(data)
        if len(starts) * _GATHER_PAGES <= len(data):  # few long extents: scanned in place
            for s, n in zip(starts.tolist(), lengths.tolist()):
                keep[s : s + n] = nonzero_pages(view[s * ps : (s + n) * ps], n, ps)
        else:  # many short ones: gathered, a few hundred pages at a time (a bounded copy)
            at = np.flatnonzero(data)
            for i in range(0, len(at), _GATHER_PAGES):
                keep[at[i : i + _GATHER_PAGES]] = nonzero_pages_at(view, at[i : i + _GATHER_PAGES], ps)
        return keep

    def _copy_data(self, bounce: memoryview, data: memoryview, held: npt.NDArray[np.bool_]) -> None:
        """An extent's pages copied into ``bounce``, those in the source file's holes written
        as zeros instead of read."""
        ps = self.page_size
        starts, lengths = bit_runs(held)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            bounce[s * ps : (s + n) * ps] = data[s * ps : (s + n) * ps]
        np.frombuffer(bounce, dtype=np.uint64).reshape(len(held), ps // 8)[~held] = 0

    def _bounce(self) -> HugeBuffer:
        if self._huge is None:
            self._huge = HugeBuffer(len(self.buffer))
        return self._huge

    def _punch(self, gone: npt.NDArray[np.bool_], file_offset: int) -> None:
        ps = self.page_size
        starts, lengths = bit_runs(gone)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            # punch on a buffered descriptor: where punching is not supported, zeros are
            # written instead, which O_DIRECT would refuse from an unaligned buffer
            punch_hole(self._buffered_fd() if self.direct else self.fd, file_offset + s * ps, n * ps, self.path)
        self.pages_punched += int(np.count_nonzero(gone))

    def _buffered_fd(self) -> int:
        if self._buffered < 0:
            self._buffered = open_write(self.path, create=False)
        return self._buffered

    def close(self) -> None:
        try:
            close_fd(self.fd, self.path)
            if self._buffered >= 0:
                close_fd(self._buffered, self.path)
        finally:
            if self._huge is not None:
                self._huge.close()
            self.reader.close()


@dataclass(frozen=True, slots=True)
class ReadTask:
    dest: int  # index into the channel's destinations
    first_page: int
    # file offset of each page, -1 = reads as zeros; or what computes them when the task runs
    # (a restore's tasks then hold no offsets until run: 8 bytes a page, 32 MiB for 16 GiB)
    src_offsets: npt.NDArray[np.int64] | Callable[[], npt.NDArray[np.int64]]
    zero_absent: bool = False

    def offsets(self) -> npt.NDArray[np.int64]:
        return self.src_offsets() if callable(self.src_offsets) else self.src_offsets


class PageReadChannel:
    """One reader: its own descriptor on the file, a scratch buffer for absent slots."""

    def __init__(
        self,
        path: str | StoreSpec,
        destinations: Sequence[memoryview],
        page_size: int,
        max_pages: int,
        *,
        direct: bool = False,
    ) -> None:
        self.path = spec_path(path)
        # a spec of several sources (a compressed file, a chain) is read through a store
        self.store = None if isinstance(path, str) else open_store(path)
        self.dests = destinations
        self.page_size = page_size
        self.direct = direct and self.store is None
        self.fd = open_read(self.path, direct=self.direct)
        self.scratch = aligned_buffer(max_pages * page_size)
        self._huge: HugeBuffer | None = None
        self.pages_read = 0

    def run(self, task: ReadTask) -> int:
        ps = self.page_size
        src = task.offsets()
        n = len(src)
        dest = self.dests[task.dest][task.first_page * ps : (task.first_page + n) * ps]
        present = src >= 0
        idx = np.flatnonzero(present)
        if task.zero_absent:
            pages = np.frombuffer(dest, dtype=np.uint8).reshape(n, ps)
            pages[~present] = 0
        if idx.size == 0:
            return n * ps
        if self.store is not None:
            self._read_bounced(dest, src, present)
            self.pages_read += int(idx.size)
            return n * ps
        base = int(src[idx[0]]) - int(idx[0]) * ps
        contiguous = np.array_equal(src[idx], base + idx.astype(np.int64) * ps)
        if contiguous and self.direct:
            self._read_huge(dest, present, base)  # O_DIRECT into huge pages, then copied
        elif contiguous:
            self._read_extents(dest, present, base)  # through the page cache, straight in
        else:
            self._read_bounced(dest, src, present)  # slow path
        self.pages_read += int(idx.size)
        return n * ps

    def _read_extents(self, dest: memoryview, present: npt.NDArray[np.bool_], base: int) -> None:
        ps = self.page_size
        scratch = memoryview(self.scratch)
        p_starts, p_lens = bit_runs(present)
        # One extent per group of present runs separated by short absent gaps.
        e_starts, e_lens = merge_runs(p_starts, p_lens, READ_SPLIT_GAP)
        k = 0
        for es, el in zip(e_starts.tolist(), e_lens.tolist()):
            iov: list[memoryview] = []
            pos = es
            while k < len(p_starts) and p_starts[k] < es + el:
                s, ln = int(p_starts[k]), int(p_lens[k])
                if s > pos:
                    iov.append(scratch[: (s - pos) * ps])  # absent slots: discarded
                iov.append(dest[s * ps : (s + ln) * ps])
                pos = s + ln
                k += 1
            preadv_exact(self.fd, iov, base + es * ps, self.path)

    def _read_huge(self, dest: memoryview, present: npt.NDArray[np.bool_], base: int) -> None:
        """O_DIRECT: each extent into a buffer of huge pages (few block-layer segments; see
        directio.HugeBuffer), then its present pages copied to the destination (numpy)."""
        ps = self.page_size
        if self._huge is None:
            self._huge = HugeBuffer(len(self.scratch))
        p_starts, p_lens = bit_runs(present)
        e_starts, e_lens = merge_runs(p_starts, p_lens, READ_SPLIT_GAP)
        out = np.frombuffer(dest, dtype=np.uint8).reshape(-1, ps)
        buf = np.frombuffer(self._huge.view, dtype=np.uint8).reshape(-1, ps)
        for es, el in zip(e_starts.tolist(), e_lens.tolist()):
            preadv_exact(self.fd, [self._huge.view[: el * ps]], base + es * ps, self.path)
            for at in range(0, el, _COPY_PAGES):  # numpy's gathered copy is a temporary: keep it small
                idx = at + np.flatnonzero(present[es + at : es + min(at + _COPY_PAGES, el)])
                out[es + idx] = buf[idx]

    def _read_bounced(self, dest: memoryview, src: npt.NDArray[np.int64], present: npt.NDArray[np.bool_]) -> None:
        ps = self.page_size
        n = len(src)
        buf = memoryview(self.scratch)[: n * ps]
        if self.store is not None:
            self.store.gather(src, ps, buf)
        else:
            gather_pages(self.fd, self.path, src, ps, buf)
        out = np.frombuffer(dest, dtype=np.uint8).reshape(n, ps)
        out[present] = np.frombuffer(buf, dtype=np.uint8).reshape(n, ps)[present]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.store is not None:
            self.store.close()
        if self._huge is not None:
            self._huge.close()
        self.scratch.close()

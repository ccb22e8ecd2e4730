"""Copy pages between files, or into memory, in large reads; zero pages stay holes.

A task names where each destination page comes from: ``src_offsets[i]`` is the file
offset of page i's bytes, or -1 for a page that reads as zeros. The channel reads
whole extents (holes and stale slots included: they cost no disk I/O or are
discarded), zeroes the pages marked -1 in its own buffer, and writes only the runs
of non-zero pages, so the destination file stays sparse.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from mappedram._runs import bit_runs
from mappedram.errors import IOEngineError

from .executor import run_tasks
from .fileio import close_fd, create_sparse, open_write, pread_upto, preadv_exact, pwrite_full

if TYPE_CHECKING:
    from .store import StoreSpec

__all__ = [
    "GATHER_SPLIT_GAP",
    "PageCopy",
    "SparseCopyChannel",
    "PageCompare",
    "CompareChannel",
    "gather_pages",
    "gather_pages_at",
    "nonzero_pages",
    "nonzero_pages_at",
    "sparse_copy",
    "write_sparse_file",
]

#: Absent runs longer than this (pages) split a read: they are not read at all.
GATHER_SPLIT_GAP = 16


@dataclass(frozen=True, slots=True)
class PageCopy:
    """Copy ``len(src_offsets)`` pages to ``dst_offset`` onwards."""

    dst_offset: int
    src_offsets: npt.NDArray[np.int64]


def _contiguous(src: npt.NDArray[np.int64], present: npt.NDArray[np.bool_], page_size: int) -> int | None:
    """If every present page i sits at ``base + i * page_size``, return base (mapped-ram's case)."""
    idx = np.flatnonzero(present)
    base = int(src[idx[0]]) - int(idx[0]) * page_size
    if np.array_equal(src[idx], base + idx.astype(np.int64) * page_size):
        return base
    return None


def gather_pages(
    fd: int,
    path: str,
    src_offsets: npt.NDArray[np.int64],
    page_size: int,
    out: memoryview,
) -> npt.NDArray[np.bool_]:
    """Fill ``out`` (len(src_offsets) pages) from ``fd``; -1 pages become zeros.

    Returns the mask of pages that came from the file. Raises IOEngineError on a read
    error, or where the file ends before a page (callers validate bounds first).
    """
    n = len(src_offsets)
    pages = np.frombuffer(out, dtype=np.uint8, count=n * page_size).reshape(n, page_size)
    present = src_offsets >= 0
    if not present.any():
        pages[:] = 0
        return present
    base = _contiguous(src_offsets, present, page_size)
    if base is not None:
        # fast path (mapped-ram): one read per extent of present pages; absent runs longer
        # than GATHER_SPLIT_GAP pages are not read (a slot whose bit is 0 may hold stale data
        # on disk), shorter ones are read with their neighbours and zeroed
        starts, lengths = bit_runs(present)
        ends = starts + lengths
        split = np.flatnonzero(starts[1:] - ends[:-1] > GATHER_SPLIT_GAP) + 1
        e_starts = starts[np.concatenate(([0], split))].tolist()
        e_ends = ends[np.concatenate((split - 1, [len(starts) - 1]))].tolist()
        for s, e in zip(e_starts, e_ends):
            preadv_exact(fd, [out[s * page_size : e * page_size]], base + s * page_size, path)
        pages[~present] = 0
        return present
    # slow path (legacy streams): pages scattered through the file (each after its record
    # header), read in clusters; one vectorised gather per cluster copies every page out
    pages[~present] = 0
    idx = np.flatnonzero(present)
    order = idx[np.argsort(src_offsets[idx], kind="stable")]
    offs = src_offsets[order]
    breaks = np.flatnonzero(np.diff(offs) > 2 * page_size) + 1
    lo_at = np.concatenate(([0], breaks))
    hi_at = np.concatenate((breaks, [len(order)]))
    for a, b in zip(lo_at.tolist(), hi_at.tolist()):
        lo = int(offs[a])
        hi = int(offs[b - 1]) + page_size
        data = pread_upto(fd, hi - lo, lo, path)
        if len(data) != hi - lo:
            raise IOEngineError(
                f"file ended early: read {len(data)} of {hi - lo} bytes",
                path=path,
                offset=lo + len(data),
                errno=errno.EIO,
            )
        buf = np.frombuffer(data, dtype=np.uint8)
        # every page-sized window of the cluster, as rows (a view: nothing is copied)
        windows = as_strided(buf, shape=(len(buf) - page_size + 1, page_size), strides=(1, 1), writeable=False)
        pages[order[a:b]] = windows[offs[a:b] - lo]
    return present


def gather_pages_at(
    fd: int,
    path: str,
    src_offsets: npt.NDArray[np.int64],
    page_size: int,
    out: memoryview,
    dst_offsets: npt.NDArray[np.int64],
) -> None:
    """Read page i (from ``src_offsets[i]``, every one >= 0) into ``out`` at ``dst_offsets[i]``.

    Pages consecutive in the file (a mapped-ram page run) go straight to their places, one
    ``preadv`` of many iovecs per run; pages scattered through the file (a legacy stream)
    are read with :func:`gather_pages` and copied into place.
    """
    n = len(src_offsets)
    if n == 0:
        return
    if int(src_offsets.min()) < 0:
        raise ValueError("gather_pages_at reads pages that are in the file only")
    breaks = np.flatnonzero(np.diff(src_offsets) != page_size) + 1
    if len(breaks) > n // 8:
        tmp = bytearray(n * page_size)
        gather_pages(fd, path, src_offsets, page_size, memoryview(tmp))
        arr = np.frombuffer(out, dtype=np.uint8)
        windows = as_strided(arr, shape=(len(arr) - page_size + 1, page_size), strides=(1, 1))
        windows[dst_offsets] = np.frombuffer(tmp, dtype=np.uint8).reshape(n, page_size)
        return
    lo = np.concatenate(([0], breaks)).tolist()
    hi = np.concatenate((breaks, [n])).tolist()
    dst = dst_offsets.tolist()
    for a, b in zip(lo, hi):
        preadv_exact(fd, [out[d : d + page_size] for d in dst[a:b]], int(src_offsets[a]), path)


def nonzero_pages(buf: memoryview, npages: int, page_size: int) -> npt.NDArray[np.bool_]:
    """Vectorised zero-page detection over ``npages`` pages of ``buf``."""
    words = np.frombuffer(buf, dtype=np.uint64, count=npages * page_size // 8).reshape(npages, page_size // 8)
    # OR the words (any() casts each word to bool first: 20 % slower)
    return np.asarray(np.bitwise_or.reduce(words, axis=1) != 0, dtype=np.bool_)


def nonzero_pages_at(buf: memoryview, pages: npt.NDArray[np.intp], page_size: int) -> npt.NDArray[np.bool_]:
    """Zero-page detection for the pages numbered ``pages`` of ``buf`` only (vectorised gather)."""
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, page_size // 8)
    return np.asarray(np.bitwise_or.reduce(words[pages], axis=1) != 0, dtype=np.bool_)


class SparseCopyChannel:
    """One channel of a file-to-file page copy; owns its descriptors and one buffer."""

    def __init__(self, src_path: str | StoreSpec, dst_path: str, page_size: int, max_pages: int) -> None:
        from .store import Store, spec_path  # store.py reads through this module's gather_pages

        self.src_path = spec_path(src_path)
        self.dst_path = dst_path
        self.page_size = page_size
        self.src = Store(src_path)
        try:
            self.dst = open_write(dst_path, create=False)
        except BaseException:
            self.src.close()
            raise
        # MAP_SHARED keeps the buffer safe for direct I/O if another thread forks.
        self.buffer = mmap.mmap(-1, max_pages * page_size, mmap.MAP_SHARED)
        self.written = 0

    def run(self, task: PageCopy) -> int:
        n = len(task.src_offsets)
        view = memoryview(self.buffer)[: n * self.page_size]
        try:
            present = self.src.gather(task.src_offsets, self.page_size, view)
            keep = present & nonzero_pages(view, n, self.page_size)
            starts, lengths = bit_runs(keep)
            ps = self.page_size
            for s, ln in zip(starts.tolist(), lengths.tolist()):
                pwrite_full(self.dst, view[s * ps : (s + ln) * ps], task.dst_offset + s * ps, self.dst_path)
                self.written += ln * ps
        finally:
            view.release()
        return n * self.page_size

    def close(self) -> None:
        try:
            close_fd(self.dst, self.dst_path)  # a destination close error is fatal
        finally:
            self.src.close()  # a source close error loses nothing
            self.buffer.close()


def sparse_copy(
    src_path: str | StoreSpec,
    dst_path: str,
    tasks: Sequence[PageCopy],
    *,
    page_size: int,
    max_pages: int,
    channels: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run ``tasks`` (each at most ``max_pages`` pages) over up to ``channels`` SparseCopyChannels.

    ``dst_path`` must exist (see :func:`write_sparse_file`). Tasks without a present page
    are not run: their pages are zeros, already holes in the destination; ``progress``
    is still told of them. Returns the bytes written (non-zero pages only).
    """
    work = [t for t in tasks if np.any(t.src_offsets >= 0)]
    skipped = sum(len(t.src_offsets) for t in tasks) - sum(len(t.src_offsets) for t in work)
    if progress is not None and skipped:
        progress(skipped * page_size)
    made: list[SparseCopyChannel] = []

    def make_channel(_: int) -> SparseCopyChannel:
        ch = SparseCopyChannel(src_path, dst_path, page_size, max_pages)
        made.append(ch)
        return ch

    run_tasks(work, make_channel, channels=max(1, min(channels, len(work))), progress=progress)
    return sum(ch.written for ch in made)


def write_sparse_file(path: str, size: int, pieces: Sequence[tuple[int, bytes]] = ()) -> None:
    """Create (or truncate) ``path`` as a hole of ``size`` bytes, then write each (offset, bytes) piece."""
    create_sparse(path, size)
    if not pieces:
        return
    fd = open_write(path, create=False)
    try:
        for offset, data in pieces:
            pwrite_full(fd, data, offset, path)
    except BaseException:
        os.close(fd)
        raise
    close_fd(fd, path)


@dataclass(frozen=True, slots=True)
class PageCompare:
    """Compare pages: ``a_offsets``/``b_offsets`` in each file (-1: zeros); ``differ`` is filled in."""

    a_offsets: npt.NDArray[np.int64]
    b_offsets: npt.NDArray[np.int64]
    differ: npt.NDArray[np.bool_]


class CompareChannel:
    """One channel of a page comparison between two files, in large reads."""

    def __init__(self, a_path: str | StoreSpec, b_path: str | StoreSpec, page_size: int, max_pages: int) -> None:
        from .store import Store

        self.page_size = page_size
        self.stores = (Store(a_path), Store(b_path))
        self.buffers = (mmap.mmap(-1, max_pages * page_size), mmap.mmap(-1, max_pages * page_size))

    def run(self, task: PageCompare) -> int:
        n = len(task.a_offsets)
        ps = self.page_size
        views = [memoryview(buf)[: n * ps] for buf in self.buffers]
        try:
            self.stores[0].gather(task.a_offsets, ps, views[0])
            self.stores[1].gather(task.b_offsets, ps, views[1])
            a = np.frombuffer(views[0], dtype=np.uint64).reshape(n, ps // 8)
            b = np.frombuffer(views[1], dtype=np.uint64).reshape(n, ps // 8)
            task.differ[:] = (a != b).any(axis=1)
            del a, b
        finally:
            for v in views:
                v.release()
        return n * ps

    def close(self) -> None:
        for store in self.stores:
            store.close()
        for buf in self.buffers:
            buf.close()

"""Compress runs of pages into zstd frames on N threads, written in order.

A task is one frame: the source offset of each of its pages (engine/store.py; -1 for a
page that reads as zeros). Each thread reads its frame's pages through its own
:class:`~mappedram.engine.store.Store` and compresses them with its own zstd context
(zstd releases the interpreter lock, so the threads compress at once); the caller's
thread writes the frames back to back from ``at`` on, in task order, in large writes.
A frame with no page in the file is never read: its bytes are one frame of zeros of its
length, compressed once. The engine knows no format: the caller plans the tasks and
writes what comes after the frames.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zstandard

from .executor import ReadAhead
from .fileio import pwritev_full
from .store import Store, StoreSpec

__all__ = ["CompressStats", "compress_frames", "WRITE_BATCH"]

#: Compressed frames gathered into one pwritev.
WRITE_BATCH = 8 << 20


@dataclass(slots=True)
class CompressStats:
    sizes: npt.NDArray[np.int64]  # each frame's compressed size
    bytes_read: int = 0  # page bytes read from the source (zero frames are not read)
    zero_frames: int = 0  # frames with no page in the source
    extra: dict[str, float] = field(default_factory=dict)


def compress_frames(
    spec: str | StoreSpec,
    tasks: Sequence[npt.NDArray[np.int64]],
    *,
    page_size: int,
    level: int,
    threads: int,
    fd: int,
    path: str,
    at: int,
    progress: Callable[[int], None] | None = None,
) -> CompressStats:
    """Compress each task's pages into one frame (content size and checksum in its header)
    and write the frames from ``at`` on; return their sizes."""
    local = threading.local()
    opened: list[Store] = []
    lock = threading.Lock()
    zeros: dict[int, bytes] = {}

    def produce(src: npt.NDArray[np.int64]) -> tuple[bytes, int]:
        n = len(src)
        if not np.any(src >= 0):
            with lock:
                hit = zeros.get(n)
            if hit is None:
                hit = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(bytes(n * page_size))
                with lock:
                    zeros[n] = hit
            return hit, 0
        store: Store | None = getattr(local, "store", None)
        if store is None:
            store = local.store = Store(spec)
            local.cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
            local.buf = bytearray(max(len(t) for t in tasks) * page_size)
            with lock:
                opened.append(store)
        view = memoryview(local.buf)[: n * page_size]
        present = store.gather(src, page_size, view)
        return local.cctx.compress(view), int(np.count_nonzero(present)) * page_size

    sizes = np.zeros(len(tasks), dtype=np.int64)
    stats = CompressStats(sizes)
    pending: list[memoryview] = []
    held = 0
    pos = at
    try:
        with ReadAhead(tasks, produce, channels=max(threads, 1), window=4 * max(threads, 1)) as ahead:
            for i in range(len(tasks)):
                frame, read = _next(ahead)
                sizes[i] = len(frame)
                stats.bytes_read += read
                stats.zero_frames += read == 0
                pending.append(memoryview(frame))
                held += len(frame)
                if held >= WRITE_BATCH:
                    pos += pwritev_full(fd, pending, pos, path)
                    pending, held = [], 0
                if progress is not None:
                    progress(len(tasks[i]) * page_size)
        if pending:
            pwritev_full(fd, pending, pos, path)
    finally:
        for store in opened:
            store.close()
    return stats


def _next(ahead: ReadAhead[npt.NDArray[np.int64], tuple[bytes, int]]) -> tuple[bytes, int]:
    got = ahead.next()
    assert got is not None  # next() without a timeout waits for the result
    return got

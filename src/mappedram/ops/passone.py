"""Pass 1's dirty pages, less those pass 1 itself wrote after they were dirtied.

Pass 1 writes every page in file order while the guest runs; a single sync at its end
names every page dirtied meanwhile, and pass 2 rewrites them all. But a page dirtied
*ahead* of pass 1, before its chunk was read, went out with its new bytes: rewriting it is
waste. Syncing the trackers several times during pass 1 tells the two apart: what a sync
names in a chunk that no channel had started when the sync returned is written later by
pass 1 itself, after the sync, so after the write the sync saw (Rule 1 of :mod:`.live`,
sync then send, holds chunk by chunk). The rest is kept for pass 2. With a writer
dirtying pages at random, about half of what pass 1 saw dirtied is kept, so pass 2, the
passes after it and the closing fsync of the pages they wrote through the page cache all
shrink by about half.

The order is what makes it safe: a channel marks a chunk started *before* it reads the
chunk's pages, and a sync is taken *before* the marks are read. A chunk seen unmarked
was therefore read after the sync (its dirt is dropped); a chunk marked a moment after
the sync is kept, which is only conservative.

Only trackers whose sync is cheap take part (:func:`~.trackers.syncs_cheaply`: the KVM
dirty log, an owner's marks); a comparing tracker reads all of memory at each sync and
is synced once, at the end, as before.

Reference: QEMU's clear-log (migration/ram.c migration_clear_memory_region_dirty_bitmap,
KVM_CLEAR_DIRTY_LOG): it re-arms dirty logging of a chunk only just before sending it,
so that writes between the sync and the send do not make the page dirty twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from mappedram.engine.executor import Channel

from .trackers import DirtyTracker, syncs_cheaply

__all__ = ["SYNCS", "Chunk", "PassOneSync"]

Bits = npt.NDArray[np.bool_]
T = TypeVar("T")

#: Syncs during pass 1 (the last one is the sync after it): with k of them, about
#: (k + 1) / 2k of the pages a random writer dirties are kept.
SYNCS = 16


@dataclass(frozen=True, slots=True)
class Chunk:
    """The pages one task of pass 1 reads: ``count`` pages of block ``block`` from ``first``."""

    block: int
    first: int
    count: int


class _Marking(Generic[T]):
    """A channel that marks each task started before it runs it."""

    def __init__(self, inner: Channel[T], owner: PassOneSync) -> None:
        self.inner = inner
        self.owner = owner

    def run(self, task: T) -> int:
        self.owner.started[self.owner.index[id(task)]] = True  # before any page is read
        return self.inner.run(task)

    def close(self) -> None:
        self.inner.close()


class PassOneSync:
    """Syncs ``trackers`` during pass 1 and keeps what pass 1 will not write again.

    ``tasks`` are pass 1's tasks, ``chunks[k]`` the pages task ``k`` reads; wrap each
    channel with :meth:`channel` and call :meth:`progress` with the bytes each task moved
    (``total`` in all): every ``total / syncs`` bytes it syncs. :meth:`finish` merges the
    sync after pass 1.
    """

    def __init__(
        self, trackers: Sequence[DirtyTracker], tasks: Sequence[object], chunks: Sequence[Chunk], total: int,
        syncs: int = SYNCS,
    ) -> None:  # fmt: skip
        self.trackers = trackers
        self.chunks = chunks
        self.index = {id(t): k for k, t in enumerate(tasks)}
        self.started = np.zeros(len(tasks), dtype=np.bool_)
        self.step = max(1, total // max(1, syncs))
        self.last_at = self.step * (syncs - 1)  # the last sync during the pass; :meth:`finish` takes one more
        self.moved = 0
        self.next_at = self.step
        self.kept = [np.zeros(t.npages, dtype=np.bool_) for t in trackers]
        self.seen = [np.zeros(t.npages, dtype=np.bool_) for t in trackers]
        self.syncs = 0
        self._lock = threading.Lock()

    def channel(self, inner: Channel[T]) -> Channel[T]:
        return _Marking(inner, self)

    def with_progress(self, also: Callable[[int], None] | None) -> Callable[[int], None]:
        """:meth:`progress`, then ``also`` (the caller's progress), for the executor."""
        if also is None:
            return self.progress

        def both(moved: int) -> None:
            self.progress(moved)
            also(moved)

        return both

    def progress(self, moved: int) -> None:
        """A task covered ``moved`` bytes of RAM (the executor serialises these calls)."""
        self.moved += moved
        if self.moved >= self.next_at and self.next_at <= self.last_at:
            while self.next_at <= self.moved:
                self.next_at += self.step
            self._take()

    def finish(self, last: Sequence[Bits]) -> tuple[list[Bits], list[Bits]]:
        """Merge the sync after pass 1 (``last``): what pass 2 must send, and every page
        pass 1 saw dirtied (its dirty rate counts them all)."""
        with self._lock:
            for kept, seen, bits in zip(self.kept, self.seen, last):
                kept |= bits
                seen |= bits
            return self.kept, self.seen

    def _take(self) -> None:
        with self._lock:
            dirty = [t.sync() for t in self.trackers]  # the sync first ...
            ahead = [np.zeros(t.npages, dtype=np.bool_) for t in self.trackers]
            for k in np.flatnonzero(~self.started).tolist():  # ... then the marks
                c = self.chunks[k]
                ahead[c.block][c.first : c.first + c.count] = True
            for kept, seen, bits, later in zip(self.kept, self.seen, dirty, ahead):
                kept |= bits & ~later
                seen |= bits
            self.syncs += 1

    @staticmethod
    def applies(trackers: Sequence[DirtyTracker]) -> bool:
        return bool(trackers) and all(syncs_cheaply(t) for t in trackers)

"""Dirty tracking: which pages of a buffer were written since the last look.

Every tracker answers one call, :meth:`DirtyTracker.sync`: a bool array with one entry
per page, True for each page written since the previous ``sync`` (or since the tracker
was made, for the first). A live save syncs, then reads the pages it was given; a
write that lands after the sync shows up in the next one. Three sources:

* the KVM dirty log of a memslot (the built-in KVM guest, :class:`mappedram.vm.microvm.MicroVM`, exposes it as
  ``dirty_pages()``; :class:`CallbackTracker` adapts any such callable);
* :class:`OwnerTracker`: the code that writes the buffer marks what it wrote, as an
  emulator's memory API would. Rule: mark *after* the write completes, so a mark that
  the current sync still sees always covers finished data;
* :class:`CompareTracker`: any buffer, no cooperation from the writer: each sync
  compares every page with a shadow copy (exact) or with per-page digests (a random odd
  64-bit weight per word, summed mod 2**64: any change to one word changes the digest;
  several changes cancel out with probability about 2**-64), vectorised over large chunks.

References:
    Linux Documentation/virt/kvm/api.rst (KVM_GET_DIRTY_LOG, KVM_MEM_LOG_DIRTY_PAGES);
    QEMU migration/ram.c (migration_bitmap_sync: the same sync-then-send contract).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["DirtyTracker", "OwnerTracker", "CompareTracker", "CallbackTracker", "syncs_cheaply"]

Bits = npt.NDArray[np.bool_]


class DirtyTracker(Protocol):
    """Pages written since the previous sync, one bool per page."""

    @property
    def npages(self) -> int: ...

    def sync(self) -> Bits: ...


def syncs_cheaply(tracker: object) -> bool:
    """Whether a sync costs little next to the pages it names (its class says ``cheap_sync``):
    a live save may then sync it during pass 1 too (:mod:`.passone`)."""
    return bool(getattr(tracker, "cheap_sync", False))


class CallbackTracker:
    """A tracker over a callable returning the dirty pages and clearing them (KVM_GET_DIRTY_LOG)."""

    cheap_sync = True  # a dirty log: a bitmap read and the pages it names write-protected again

    def __init__(self, npages: int, get: Callable[[], Bits]) -> None:
        self._npages = npages
        self._get = get

    @property
    def npages(self) -> int:
        return self._npages

    def sync(self) -> Bits:
        bits = np.asarray(self._get(), dtype=np.bool_)
        if bits.shape != (self._npages,):
            raise ValueError(f"dirty log has {bits.shape} entries, expected {self._npages}")
        return bits


class OwnerTracker:
    """The writer marks the pages it wrote (after writing them); ``sync`` takes the marks."""

    cheap_sync = True  # an array swapped under a lock

    def __init__(self, npages: int, page_size: int = 4096) -> None:
        self._npages = npages
        self.page_size = page_size
        self._bits = np.zeros(npages, dtype=np.bool_)
        self._lock = threading.Lock()

    @property
    def npages(self) -> int:
        return self._npages

    def mark(self, first: int, count: int = 1) -> None:
        with self._lock:
            self._bits[first : first + count] = True

    def mark_pages(self, pages: npt.ArrayLike) -> None:
        index = np.asarray(pages, dtype=np.intp)
        with self._lock:
            self._bits[index] = True

    def mark_bytes(self, offset: int, length: int) -> None:
        if length > 0:
            first = offset // self.page_size
            self.mark(first, (offset + length - 1) // self.page_size - first + 1)

    def sync(self) -> Bits:
        fresh = np.zeros(self._npages, dtype=np.bool_)
        with self._lock:
            bits, self._bits = self._bits, fresh
        return bits


class CompareTracker:
    """Dirty pages of any buffer, found by comparing with the state seen at the previous sync."""

    def __init__(
        self,
        buffer: Any,
        *,
        page_size: int = 4096,
        method: Literal["shadow", "digest"] = "shadow",
        chunk_pages: int = 8192,
        seed: int = 0x6D617070,
    ) -> None:
        view = memoryview(buffer).cast("B")
        if len(view) % page_size:
            raise ValueError(f"buffer of {len(view)} bytes is not a whole number of {page_size}-byte pages")
        self._words = np.frombuffer(view, dtype=np.uint64).reshape(-1, page_size // 8)
        self.method = method
        self.chunk_pages = chunk_pages
        self._shadow: npt.NDArray[np.uint64] | None = None
        self._digests: npt.NDArray[np.uint64] | None = None
        self._weights = np.random.default_rng(seed).integers(0, 2**63, size=page_size // 8, dtype=np.uint64)
        self._weights = self._weights * np.uint64(2) + np.uint64(1)  # odd: invertible mod 2**64
        if method == "shadow":
            self._shadow = self._words.copy()
        elif method == "digest":
            self._digests = np.concatenate(
                [self._digest(lo, hi) for lo, hi in self._chunks()] or [np.zeros(0, np.uint64)]
            )
        else:
            raise ValueError(f"unknown method {method!r}: expected 'shadow' or 'digest'")

    @property
    def npages(self) -> int:
        return len(self._words)

    def _chunks(self) -> list[tuple[int, int]]:
        n = len(self._words)
        return [(lo, min(lo + self.chunk_pages, n)) for lo in range(0, n, self.chunk_pages)]

    def _digest(self, lo: int, hi: int) -> npt.NDArray[np.uint64]:
        with np.errstate(over="ignore"):
            digest: npt.NDArray[np.uint64] = (self._words[lo:hi] * self._weights).sum(axis=1, dtype=np.uint64)
        return digest

    def sync(self) -> Bits:
        out = np.zeros(len(self._words), dtype=np.bool_)
        for lo, hi in self._chunks():
            if self._shadow is not None:
                current = self._words[lo:hi].copy()  # one snapshot, so compare and update agree
                changed = (current != self._shadow[lo:hi]).any(axis=1)
                self._shadow[lo:hi][changed] = current[changed]
            else:
                assert self._digests is not None
                digest = self._digest(lo, hi)
                changed = digest != self._digests[lo:hi]
                self._digests[lo:hi] = digest
            out[lo:hi] = changed
        return out

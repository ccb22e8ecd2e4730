"""Lazy restore: the guest runs on RAM that fills in behind it (userfaultfd), at disk speed.

Theory of operation:
    * The guest's RAM is fresh private anonymous memory registered with a userfaultfd in
      MISSING mode: a page nobody installed yet stops whoever touches it (the vCPU, inside
      KVM_RUN) until it is installed.
    * One fault thread reads the fault messages and serves each at once from its slot
      (``pages_offset + page * page_size``): UFFDIO_COPY from its own bounce buffer, or
      UFFDIO_ZEROPAGE for a page whose bit is 0. Faults never queue behind prefetch work.
    * N prefetch threads walk the block in large chunks, in order, each with its own
      descriptor and bounce buffer: one ``preadv`` per run of present pages, one
      UFFDIO_COPY per run, one UFFDIO_ZEROPAGE per run of zero pages.
    * A page is installed once: whoever installs it claims it first, under one lock, in a
      bitmap; a fault on a page a prefetcher claimed is left to it (its UFFDIO_COPY wakes
      the faulting vCPU). The handler threads never touch guest memory themselves.
    * A read that fails stops the guest instead of hanging it: the pages it should have
      filled are made inaccessible (mprotect PROT_NONE) and woken, so the vCPU's access
      fails (KVM_RUN returns EFAULT), and the error is kept for the caller.
    * Once every page is installed, the memory is unregistered: the guest's RAM is plain
      anonymous memory from then on (dirty logging, saves, repeat restores).
    * Host code must not read a page before it is installed while holding the interpreter
      lock (the fault thread needs it): the pages the VMM itself reads while the guest runs
      (the status and params pages) are installed before the guest starts, and checks of
      the RAM wait for :meth:`LazyLoader.wait_resident`.

References:
    Linux Documentation/admin-guide/mm/userfaultfd.rst; Firecracker's uffd handler;
    QEMU migration/postcopy-ram.c (postcopy_ram_fault_thread, postcopy_place_page).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs
from mappedram.engine.fileio import close_fd, open_read, preadv_full
from mappedram.engine.store import Store
from mappedram.errors import IOEngineError, MappedRamError, UsageError
from mappedram.image import MigrationFile, RamBlock

from .kvm import memory_address
from .uffd import Userfaultfd

__all__ = ["LazyOptions", "LazyStats", "LazyLoader"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE = 0
_CLAIM_PAGES = 256  # pages a prefetcher claims at a time (1 MiB): what a fault may wait behind


@dataclass(frozen=True, slots=True)
class LazyOptions:
    """``prefetch_threads`` readers of ``chunk_pages`` pages at a time; ``start_prefetch``
    False leaves them idle until :meth:`LazyLoader.start_prefetch` (faults only until then)."""

    prefetch_threads: int = 4
    chunk_pages: int = 2048
    start_prefetch: bool = True
    fault_cluster: int = 16  # a fault installs the unclaimed pages of its aligned group of this many
    direct_io: bool = False  # prefetch reads with O_DIRECT (disk to bounce buffer, no page-cache copy)


@dataclass(frozen=True, slots=True)
class LazyStats:
    pages: int
    pages_faulted: int  # installed by the fault thread, for a vCPU waiting on it
    pages_prefetched: int  # installed by the prefetch threads, with data
    pages_zero: int  # installed as zero pages (bit 0), by either
    pages_early: int  # installed before the guest ran: the pages the VMM itself reads
    installed: int
    seconds_to_resident: float | None  # from start() to every page installed
    fill_gbps: float | None  # RAM bytes installed per second, start() to resident
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LazyLoader:
    """Serves ``block`` of ``mf`` into ``memory`` on demand and in the background (module docstring)."""

    def __init__(
        self, mf: MigrationFile, block: RamBlock, memory: mmap.mmap, options: LazyOptions | None = None
    ) -> None:
        options = options or LazyOptions()
        if block.layout is None or block.bitmap is None:
            raise UsageError(f"{mf.path}: a legacy stream cannot be restored lazily (its pages have no fixed slots)")
        if options.prefetch_threads < 0 or options.chunk_pages < 1 or options.fault_cluster < 1:
            raise UsageError("prefetch_threads must be >= 0, chunk_pages and fault_cluster >= 1")
        self.path, self.block, self.options = mf.path, block, options
        self._file_id = mf.file_id
        self.ps = block.page_size
        self.n = block.num_pages
        self.pages_offset = block.layout.pages_offset
        # a compressed block (or a chain's) is read through a store per thread: one frame
        # decompressed per fault group or prefetch run, the neighbours' frames kept
        self.spec = None if block.slots else mf.store
        self._local = threading.local()
        self._stores: list[Store] = []
        self.present: npt.NDArray[np.bool_] = np.asarray(block.present, dtype=np.bool_)
        self.memory = memory
        self.base = memory_address(memory)
        self._claimed = np.zeros(self.n, dtype=np.bool_)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._installed = self._faulted = self._prefetched = self._zero = self._early = 0
        self._next_chunk = 0
        self._gate = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0: float | None = None
        self._closed = False
        self._resident_at: float | None = None
        self.error: MappedRamError | None = None
        self.uffd = Userfaultfd()
        try:
            self.uffd.register(self.base, self.n * self.ps)
        except BaseException:
            self.uffd.close()
            raise

    # -- control

    def install_now(self, pages: list[int]) -> None:
        """Install ``pages`` at once, from this thread (the pages the VMM reads itself);
        a failure raises here, before the guest exists."""
        fd = self._open()
        buf = mmap.mmap(-1, self.ps)
        try:
            for page in pages:
                if self._claim_one(page):
                    self._install(fd, buf, page, 1, "early")
        finally:
            buf.close()
            close_fd(fd, self.path)
        if self.error is not None:
            raise self.error

    def _open(self, *, direct: bool = False) -> int:
        """A descriptor on the file, which must still be the one decoded (not replaced meanwhile)."""
        fd = open_read(self.path, direct=direct)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._file_id:
            close_fd(fd, self.path)
            raise IOEngineError("was replaced since it was opened and checked: not restoring from another file",
                                path=self.path)  # fmt: skip
        return fd

    def start(self) -> None:
        """Start the fault thread and the prefetch threads (idle until released, if asked)."""
        self._t0 = time.perf_counter()
        self._threads.append(threading.Thread(target=self._fault_loop, name="mappedram-uffd-faults", daemon=True))
        for k in range(self.options.prefetch_threads):
            self._threads.append(threading.Thread(target=self._prefetch_loop, name=f"mappedram-prefetch-{k}",
                                                  daemon=True))  # fmt: skip
        for t in self._threads:
            t.start()
        if self.options.start_prefetch:
            self._gate.set()
        self._check_resident()

    def start_prefetch(self) -> None:
        self._gate.set()

    def wait_resident(self, timeout: float | None = None) -> bool:
        """True once every page is installed (or an error ended the fill: see :attr:`error`)."""
        with self._done:
            return self._done.wait_for(lambda: self._resident_at is not None or self.error is not None, timeout)

    def stats(self) -> LazyStats:
        with self._lock:
            t = None if self._resident_at is None or self._t0 is None else self._resident_at - self._t0
            gbps = None if not t else self.n * self.ps / t / 1e9
            return LazyStats(self.n, self._faulted, self._prefetched, self._zero, self._early, self._installed, t, gbps,
                             None if self.error is None else str(self.error))  # fmt: skip

    def close(self) -> None:
        """Stop the threads and close the userfaultfd (pages not installed then read as zeros:
        only close a loader whose guest is stopped, or that is resident)."""
        if self._closed:
            return
        self._gate.set()
        with self._lock:
            self._next_chunk = self.n  # no more prefetch work
        self.uffd.interrupt()
        alive = False
        for t in self._threads:
            t.join(30)
            alive = alive or t.is_alive()
        self._closed = True
        if not alive:  # a thread still at work would use the descriptor: leave it to the process
            self.uffd.close()
            for store in self._stores:
                store.close()

    def _store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            assert self.spec is not None
            store = self._local.store = Store(self.spec)
            with self._lock:
                self._stores.append(store)
        return store

    # -- claiming and installing

    def _claim_one(self, page: int) -> bool:
        with self._lock:
            if self._claimed[page]:
                return False
            self._claimed[page] = True
            return True

    def _claim_cluster(self, page: int) -> list[tuple[int, int]]:
        """Claim the unclaimed pages of ``page``'s aligned group (the faulting page first in
        line: one read brings its neighbours, which a guest usually touches next)."""
        k = self.options.fault_cluster
        lo = page - page % k
        hi = min(lo + k, self.n)
        with self._lock:
            if self._claimed[page]:
                return []
            mine = ~self._claimed[lo:hi]
            self._claimed[lo:hi] = True
        starts, lengths = bit_runs(mine)
        return [(lo + s, n) for s, n in zip(starts.tolist(), lengths.tolist())]

    def _install(self, fd: int, buf: mmap.mmap, first: int, count: int, who: str) -> None:
        """Install pages ``first .. first + count - 1`` (claimed by the caller)."""
        ps = self.ps
        bits = self.present[first : first + count]
        starts, lengths = bit_runs(bits)
        at = 0
        zero = 0
        try:
            for s, k in zip(starts.tolist(), lengths.tolist()):
                if s > at:
                    self.uffd.zeropage(self.base + (first + at) * ps, (s - at) * ps)
                    zero += s - at
                view = memoryview(buf)[: k * ps]
                if self.spec is not None:
                    self._store().gather(self.block.sources(first + s, k), ps, view)
                    got = k * ps
                else:
                    got = preadv_full(fd, [view], self.pages_offset + (first + s) * ps, self.path)
                if got < k * ps:  # the layout was checked inside the file: it shrank since
                    raise IOEngineError("file shrank while restoring", path=self.path,
                                        offset=self.pages_offset + (first + s) * ps + got)  # fmt: skip
                self.uffd.copy(self.base + (first + s) * ps, memory_address(buf), k * ps)
                at = s + k
            if at < count:
                self.uffd.zeropage(self.base + (first + at) * ps, (count - at) * ps)
                zero += count - at
        except MappedRamError as exc:
            self._fail(exc, first, count)
            return
        except BaseException as exc:  # a bug or a resource error: the guest must not hang on it
            self._fail(IOEngineError(f"{type(exc).__name__}: {exc}", path=self.path), first, count)
            return
        with self._done:
            self._installed += count
            self._zero += zero
            if who == "fault":
                self._faulted += count - zero
            elif who == "early":
                self._early += count - zero
            else:
                self._prefetched += count - zero
        self._check_resident()

    def _fail(self, exc: MappedRamError, first: int, count: int) -> None:
        """A read failed: keep the error and make the pages fail the vCPU's access."""
        offset = exc.fields.get("offset")
        err = exc if isinstance(exc, IOEngineError) else IOEngineError(
            str(exc), path=self.path, offset=offset if isinstance(offset, int) else None)  # fmt: skip
        with self._done:
            if self.error is None:
                self.error = IOEngineError(
                    f"lazy restore of block {self.block.idstr!r} failed at page {first}: {err.message}; "
                    "the guest was stopped", path=self.path, offset=err.offset, errno=err.errno,
                )  # fmt: skip
            self._done.notify_all()
        address, length = self.base + first * self.ps, count * self.ps
        if self._closed:
            return
        _libc.mprotect(address, length, _PROT_NONE)
        try:
            self.uffd.wake(address, length)
        except MappedRamError:
            pass

    def _check_resident(self) -> None:
        with self._done:
            if self._installed == self.n and self._resident_at is None:
                self._resident_at = time.perf_counter()
                self._done.notify_all()
            else:
                return
        self.uffd.unregister(self.base, self.n * self.ps)
        self.uffd.interrupt()  # the fault thread has nothing more to serve

    # -- the threads

    def _fault_loop(self) -> None:
        try:
            self._serve_faults()
        except BaseException as exc:  # nobody serves faults any more: fail every page not yet claimed
            self._fail_unclaimed(exc)

    def _fail_unclaimed(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, MappedRamError) else IOEngineError(f"{type(exc).__name__}: {exc}", path=self.path)
        with self._lock:
            left = ~self._claimed
            self._claimed[:] = True
        starts, lengths = bit_runs(left)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            self._fail(err, s, n)

    def _serve_faults(self) -> None:
        fd = self._open()
        buf = mmap.mmap(-1, self.options.fault_cluster * self.ps)
        try:
            while True:
                addrs = self.uffd.faults()
                if addrs is None:
                    return
                for address in addrs:
                    page = (address - self.base) // self.ps
                    if not 0 <= page < self.n:
                        continue
                    for first, count in self._claim_cluster(page):
                        if self.error is not None:
                            self._fail(self.error, first, count)
                        else:
                            self._install(fd, buf, first, count, "fault")
        finally:
            buf.close()
            close_fd(fd, self.path)

    def _prefetch_loop(self) -> None:
        self._gate.wait()
        try:
            fd = self._open(direct=self.options.direct_io)
        except BaseException as exc:  # this thread cannot read: the others and the fault thread go on
            with self._done:
                if self.error is None:
                    self.error = exc if isinstance(exc, MappedRamError) else IOEngineError(str(exc), path=self.path)
                self._done.notify_all()
            return
        buf = mmap.mmap(-1, self.options.chunk_pages * self.ps)
        step = _CLAIM_PAGES
        try:
            while self.error is None:
                with self._lock:
                    first = self._next_chunk
                    if first >= self.n:
                        return
                    count = min(self.options.chunk_pages, self.n - first)
                    self._next_chunk = first + count
                # claim a little at a time, just before reading it: a fault on a page of the
                # chunk not claimed yet is served by the fault thread at once
                for at in range(first, first + count, step):
                    k = min(step, first + count - at)
                    with self._lock:
                        mine = ~self._claimed[at : at + k]
                        self._claimed[at : at + k] = True
                    starts, lengths = bit_runs(mine)
                    for s, n in zip(starts.tolist(), lengths.tolist()):
                        self._install(fd, buf, at + s, n, "prefetch")
        finally:
            buf.close()
            close_fd(fd, self.path)


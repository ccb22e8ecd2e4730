"""A software guest: a thread that runs a vectorised workload over a RAM buffer.

Where /dev/kvm is absent, the built-in guest's workload runs here instead of on a vCPU:
the same iterations, page for page, computed in batches with numpy. It writes through
an :class:`~mappedram.engine.trackers.OwnerTracker` (marking each batch's pages after
writing them), so a live save sees its writes as it would see KVM's dirty log. It stops
only between batches, so a paused guest's state (the iteration counter and its running
checksum) is always one point of the workload.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .trackers import OwnerTracker

__all__ = ["SoftState", "SoftGuest", "Advance"]

#: ``advance(words, counter, count, checksum) -> (pages written, new checksum)``: runs
#: iterations ``counter .. counter+count-1`` of the workload on ``words`` (the RAM as
#: (pages, words-per-page) uint64) and returns the pages it wrote.
Advance = Callable[[npt.NDArray[np.uint64], int, int, int], tuple[npt.NDArray[np.int64], int]]
#: ``fill(words)``: the workload's start-up phase; returns the pages it wrote.
Fill = Callable[[npt.NDArray[np.uint64]], npt.NDArray[np.int64]]


@dataclass(frozen=True, slots=True)
class SoftState:
    """Where a paused software guest stands: its next iteration and the checksum so far."""

    counter: int
    checksum: int
    filled: bool


class SoftGuest:
    """Runs ``advance`` in batches of ``batch`` iterations on a thread, at most ``rate`` per second."""

    def __init__(
        self,
        mem_bytes: int,
        advance: Advance,
        fill: Fill,
        *,
        page_size: int = 4096,
        batch: int = 4096,
        rate: float | None = None,
        state: SoftState | None = None,
    ) -> None:
        self.memory = mmap.mmap(-1, mem_bytes)
        self.page_size = page_size
        self.words = np.frombuffer(self.memory, dtype=np.uint64).reshape(-1, page_size // 8)
        self.tracker = OwnerTracker(len(self.words), page_size)
        self._advance = advance
        self._fill = fill
        self.batch = batch
        self.rate = rate
        self._state = state or SoftState(0, 0, False)
        self._lock = threading.Lock()
        self._run = threading.Event()
        self._quit = False
        self._idle = threading.Event()
        self._idle.set()
        self._filled = threading.Event()
        if self._state.filled:
            self._filled.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._clock = (time.monotonic(), self._state.counter)

    @property
    def state(self) -> SoftState:
        with self._lock:
            return self._state

    def start(self) -> None:
        """Start (or resume) the workload on its thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mappedram-softguest", daemon=True)
            self._thread.start()
        self._clock = (time.monotonic(), self._state.counter)
        self._idle.clear()
        self._run.set()

    def wait_filled(self, timeout: float) -> None:
        if not self._filled.wait(timeout):
            raise TimeoutError(f"the software guest did not finish filling its RAM in {timeout} s")

    def pause(self) -> SoftState:
        """Stop between two batches; returns the state at that point."""
        self._run.clear()
        self._idle.wait()
        self._raise()
        return self.state

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        try:
            while True:
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait()
                    if self._quit:
                        return
                    continue
                st = self._state
                if not st.filled:
                    pages = self._fill(self.words)
                    self.tracker.mark_pages(pages)
                    with self._lock:
                        self._state = SoftState(st.counter, st.checksum, True)
                    self._filled.set()
                    continue
                pages, checksum = self._advance(self.words, st.counter, self.batch, st.checksum)
                self.tracker.mark_pages(pages)  # after the writes
                with self._lock:
                    self._state = SoftState(st.counter + self.batch, checksum, True)
                if self.rate:
                    t0, c0 = self._clock
                    ahead = (self._state.counter - c0) / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(min(ahead, 0.05))
        except BaseException as exc:
            self._error = exc
            self._filled.set()
            self._idle.set()

    def close(self) -> None:
        if self._thread is not None:
            self._quit = True
            self._run.set()
            self._thread.join()
            self._thread = None
        del self.words
        try:
            self.memory.close()
        except BufferError:
            pass  # views of it are alive elsewhere; the mapping goes with the last of them

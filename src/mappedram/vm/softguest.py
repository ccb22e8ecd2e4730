"""A software guest: a thread that runs a vectorised workload over a RAM buffer.

Where /dev/kvm is absent, the built-in guest's workload runs here instead of on a vCPU:
the same iterations, page for page, computed in batches with numpy. It writes through
an :class:`~mappedram.ops.trackers.OwnerTracker` (marking each batch's pages after
writing them), so a live save sees its writes as it would see KVM's dirty log. It stops
only between batches, so a paused guest's state (the iteration counter and its running
checksum) is always one point of the workload.

Between two batches the thread applies, as the micro-VM's VMM does at its exits: the
throttle (auto-converge: sleep ``pct / (100 - pct)`` of the batch's run time), the rate
limit, and a stop point (:meth:`SoftGuest.run_until`). Every sleep is cut short by a pause.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mappedram.ops.converge import throttle_sleep
from mappedram.ops.trackers import OwnerTracker

__all__ = ["SoftState", "SoftGuest", "Advance", "Fill"]

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
        memory: mmap.mmap | None = None,
    ) -> None:
        self.memory = memory if memory is not None else mmap.mmap(-1, mem_bytes)
        if len(self.memory) != mem_bytes:
            raise ValueError(f"guest memory of {len(self.memory)} bytes for {mem_bytes}")
        self.first_entry: float | None = None  # perf_counter() when the guest first ran
        self.page_size = page_size
        self.words = np.frombuffer(self.memory, dtype=np.uint64).reshape(-1, page_size // 8)
        self.tracker = OwnerTracker(len(self.words), page_size)
        self._advance = advance
        self._fill = fill
        self.batch = batch
        self.rate = rate
        self.throttle = 0  # percent (auto-converge)
        self.ran = 0.0  # seconds spent computing batches (sleeps and pauses excluded)
        self.slept = 0.0  # seconds of throttle sleep asked for
        self._state = state or SoftState(0, 0, False)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._run = False  # asked to run
        self._quit = False
        self._idle = True  # the thread is between batches and will not start one
        self._filled = threading.Event()
        if self._state.filled:
            self._filled.set()
        self._stop_at: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._clock = (time.monotonic(), self._state.counter)

    @property
    def state(self) -> SoftState:
        with self._lock:
            return self._state

    def set_state(self, state: SoftState) -> None:
        """Put a paused (or new) guest's registers back to ``state``."""
        with self._cond:
            if self._run:
                raise RuntimeError("the software guest is running: pause it first")
            self._state = state

    def start(self) -> None:
        """Start (or resume) the workload on its thread."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mappedram-softguest", daemon=True)
                self._thread.start()
            self._clock = (time.monotonic(), self._state.counter)
            self._idle = False
            self._run = True
            self._cond.notify_all()

    def run_until(self, counter: int, timeout: float | None = None) -> SoftState:
        """Run until at least ``counter`` iterations are done (the fill first), then pause;
        with ``counter`` a multiple of the batch from a batch boundary, exactly there."""
        with self._cond:
            self._stop_at = counter
        try:
            self.start()
            with self._cond:
                if not self._cond.wait_for(lambda: self._idle or self._error is not None, timeout):
                    raise TimeoutError(f"the software guest did not reach iteration {counter} in {timeout} s")
        finally:
            with self._cond:
                self._stop_at = None
        self._raise()
        return self.state

    def wait_filled(self, timeout: float) -> None:
        if not self._filled.wait(timeout):
            raise TimeoutError(f"the software guest did not finish filling its RAM in {timeout} s")
        self._raise()

    def pause(self) -> SoftState:
        """Stop between two batches; returns the state at that point."""
        with self._cond:
            self._run = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._idle)
        self._raise()
        return self.state

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _sleep(self, seconds: float) -> None:
        """Sleep, unless (or until) a pause or a stop is asked for."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._run and not self._quit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _loop(self) -> None:
        self.first_entry = time.perf_counter()
        try:
            while True:
                with self._cond:
                    if self._stop_at is not None and self._state.filled and self._state.counter >= self._stop_at:
                        self._run = False
                    if not self._run or self._quit:
                        self._idle = True
                        self._cond.notify_all()
                        # start() clears _idle; then look again from the top, since a pause or
                        # a stop point may have come before this thread woke
                        self._cond.wait_for(lambda: not self._idle or self._quit)
                        if self._quit:
                            return
                        continue
                    st = self._state
                t0 = time.monotonic()
                if not st.filled:
                    pages = self._fill(self.words)
                    self.tracker.mark_pages(pages)
                    with self._lock:
                        self._state = SoftState(st.counter, st.checksum, True)
                    self._filled.set()
                    self.ran += time.monotonic() - t0
                    continue
                pages, checksum = self._advance(self.words, st.counter, self.batch, st.checksum)
                self.tracker.mark_pages(pages)  # after the writes
                with self._lock:
                    self._state = SoftState(st.counter + self.batch, checksum, True)
                ran = time.monotonic() - t0
                self.ran += ran
                delay = throttle_sleep(ran, self.throttle)
                self.slept += delay
                if self.rate:
                    c0_time, c0 = self._clock
                    delay = max(delay, (self._state.counter - c0) / self.rate - (time.monotonic() - c0_time))
                if delay > 0:
                    self._sleep(delay)
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._idle = True
                self._cond.notify_all()
            self._filled.set()

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._quit = True
                self._run = False
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
        del self.words
        try:
            self.memory.close()
        except BufferError:
            pass  # views of it are alive elsewhere; the mapping goes with the last of them

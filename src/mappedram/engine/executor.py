"""Run a list of I/O tasks over N channels (threads, each with its own descriptors).

The first error stops every channel and is re-raised in the caller; channels are
always closed, and closing never hides the caller's exception. The executor knows
nothing of RAM blocks: it runs whatever a channel does with a task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["Channel", "Throttle", "run_tasks"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Channel(Protocol[T_contra]):
    """One worker's resources (descriptors, buffers); ``run`` returns the bytes it moved."""

    def run(self, task: T_contra) -> int: ...

    def close(self) -> None: ...


class _Shared(Generic[T]):
    def __init__(self, tasks: Sequence[T]) -> None:
        self.tasks = tasks
        self.next = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def take(self) -> tuple[int, T] | None:
        with self.lock:
            if self.error is not None or self.next >= len(self.tasks):
                return None
            index = self.next
            self.next += 1
            return index, self.tasks[index]

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc


def run_tasks(
    tasks: Sequence[T],
    make_channel: Callable[[int], Channel[T]],
    *,
    channels: int = 1,
    progress: Callable[[int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> int:
    """Run ``tasks`` in order of submission over ``channels`` workers; return total bytes.

    ``make_channel(i)`` builds worker i's channel inside its thread. With one channel
    everything runs in the calling thread. ``on_done(k)`` is called once task k is complete.
    """
    shared: _Shared[T] = _Shared(tasks)
    totals = [0] * max(channels, 1)
    progress_lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            channel = make_channel(index)
        except BaseException as exc:
            shared.fail(exc)
            return
        try:
            while (taken := shared.take()) is not None:
                moved = channel.run(taken[1])
                totals[index] += moved
                with progress_lock:
                    if on_done is not None:
                        on_done(taken[0])
                    if progress is not None:
                        progress(moved)
        except BaseException as exc:
            shared.fail(exc)
        finally:
            try:
                channel.close()
            except BaseException as exc:
                shared.fail(exc)

    if channels <= 1:
        worker(0)
    else:
        threads = [threading.Thread(target=worker, args=(i,), name=f"mappedram-ch{i}") for i in range(channels)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if shared.error is not None:
        raise shared.error
    return sum(totals)


class Throttle:
    """Hold callers back so that the bytes reported through it stay under ``bytes_per_second``.

    Call it from any thread with each amount written; the caller sleeps for as long as it
    is ahead of the limit (so every channel is held back). ``None`` or 0 means no limit.
    """

    def __init__(self, bytes_per_second: float | None) -> None:
        self.limit = bytes_per_second or None
        self.start = time.monotonic()
        self.moved = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.limit is None:
            return
        with self._lock:
            self.moved += n
            ahead = self.moved / self.limit - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)

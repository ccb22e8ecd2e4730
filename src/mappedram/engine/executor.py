"""Run I/O tasks over N channels (threads, each with its own descriptors).

:func:`run_tasks` runs a list known up front, each task on whichever channel is free.
:class:`Lanes` runs tasks as a producer submits them, each to the lane it names, and
one lane runs its tasks in order of submission: a producer that sends every task
touching the same bytes to the same lane gets "last write wins" for free.

The first error stops every channel and is re-raised in the caller; channels are
always closed, and closing never hides the caller's exception. The executor knows
nothing of RAM blocks: it runs whatever a channel does with a task.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, cast

__all__ = ["Channel", "Lanes", "ReadAhead", "Throttle", "run_tasks"]

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


_STOP = object()

R = TypeVar("R")


class ReadAhead(Generic[T, R]):
    """``produce(task)`` for each task, on ``channels`` threads, handed out in task order.

    At most ``window`` results are produced ahead of the consumer (what they hold stays
    bounded). :meth:`next` waits for the next result (or up to ``timeout`` seconds: None
    when it is not ready yet) and re-raises a worker's error; :meth:`close` stops the
    workers (tasks not started are dropped). Use as a context manager.
    """

    def __init__(self, tasks: Sequence[T], produce: Callable[[T], R], *, channels: int, window: int) -> None:
        self._tasks = tasks
        self._produce = produce
        self._window = max(window, 1)
        self._results: dict[int, tuple[bool, object]] = {}
        self._next_task = 0  # first task no worker has taken
        self._next_out = 0  # first result not handed out
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"mappedram-read{i}", daemon=True) for i in range(max(channels, 1))
        ]
        for t in self._threads:
            t.start()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def done(self) -> bool:
        """Every result has been handed out."""
        return self._next_out >= len(self._tasks)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    self._next_task < len(self._tasks) and self._next_task - self._next_out >= self._window
                ):
                    self._cond.wait()
                if self._closed or self._next_task >= len(self._tasks):
                    return
                index = self._next_task
                self._next_task += 1
            try:
                result: tuple[bool, object] = (True, self._produce(self._tasks[index]))
            except BaseException as exc:  # re-raised in the consumer
                result = (False, exc)
            with self._cond:
                self._results[index] = result
                self._cond.notify_all()

    def next(self, timeout: float | None = None) -> R | None:
        """The next result in task order; None if not ready within ``timeout`` (None: wait)."""
        with self._cond:
            if self.done:
                raise IndexError("every result was handed out")
            ready = self._cond.wait_for(lambda: self._next_out in self._results, timeout)
            if not ready:
                return None
            ok, value = self._results.pop(self._next_out)
            self._next_out += 1
            self._cond.notify_all()
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return cast(R, value)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._results.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> ReadAhead[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lanes(Generic[T]):
    """``lanes`` worker threads, each with its own channel and a bounded queue of tasks.

    :meth:`submit` blocks while the lane's queue is full (the producer cannot run far
    ahead of the disk) and raises the first worker error as soon as one is seen;
    :meth:`close` waits for every queued task and re-raises that error. Use as a context
    manager: leaving it on an exception stops the workers without running what is queued.
    """

    def __init__(
        self,
        make_channel: Callable[[int], Channel[T]],
        *,
        lanes: int = 1,
        depth: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.count = max(1, lanes)
        self._queues: list[queue.Queue[object]] = [queue.Queue(maxsize=max(1, depth)) for _ in range(self.count)]
        self._progress = progress
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopping = False
        self._closed = False
        self.moved = 0
        self._threads = [
            threading.Thread(target=self._work, args=(i, make_channel), name=f"mappedram-lane{i}", daemon=True)
            for i in range(self.count)
        ]
        for t in self._threads:
            t.start()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    def _work(self, index: int, make_channel: Callable[[int], Channel[T]]) -> None:
        q = self._queues[index]
        try:
            channel = make_channel(index)
        except BaseException as exc:
            self._fail(exc)
            self._drain(q)
            return
        try:
            while (task := q.get()) is not _STOP:
                if self._error is not None or self._stopping:
                    continue  # keep taking tasks so the producer never blocks on a dead lane
                moved = channel.run(cast(T, task))
                with self._lock:
                    self.moved += moved
                    if self._progress is not None:
                        self._progress(moved)
        except BaseException as exc:
            self._fail(exc)
            self._drain(q)
        finally:
            try:
                channel.close()
            except BaseException as exc:
                self._fail(exc)

    @staticmethod
    def _drain(q: queue.Queue[object]) -> None:
        while q.get() is not _STOP:
            pass

    def submit(self, lane: int, task: T) -> None:
        if self._error is not None:
            raise self._error
        self._queues[lane % self.count].put(task)

    def close(self) -> int:
        """Wait for every submitted task; return the bytes moved, or raise the first error."""
        self._closed = True
        for q in self._queues:
            q.put(_STOP)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error
        return self.moved

    def __enter__(self) -> Lanes[T]:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None or self._closed:
            return
        self._closed = self._stopping = True
        for q in self._queues:
            q.put(_STOP)
        for t in self._threads:
            t.join()


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

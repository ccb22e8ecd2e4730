"""Fault injection for the I/O engine, for tests of what failures leave behind.

Every positioned read and write in :mod:`mappedram.engine.fileio` asks the installed
injector first. The injector sees ``(op, path, offset, length)`` (op is "read" or
"write") and may raise ``OSError`` (EIO, ENOSPC, EINTR, ...) or return a smaller length,
which makes the call a short transfer. With no injector installed (the default) the
check is one global lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Injector", "inject", "check"]

Injector = Callable[[str, str, int, int], "int | None"]

_injector: Injector | None = None


def check(op: str, path: str, offset: int, length: int) -> int:
    """The length to transfer (``length`` unless an injector shortens it); may raise OSError."""
    if _injector is None:
        return length
    got = _injector(op, path, offset, length)
    return length if got is None else max(0, min(length, got))


@contextmanager
def inject(injector: Injector) -> Iterator[None]:
    """Install ``injector`` for the duration of the block (process-wide, all threads)."""
    global _injector
    previous, _injector = _injector, injector
    try:
        yield
    finally:
        _injector = previous

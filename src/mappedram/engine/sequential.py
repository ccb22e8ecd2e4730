"""Sequential stream output: appends gathered into large ``os.pwritev`` calls.

The legacy (streamed) format is one sequential stream of records; the writer appends
small headers and page views (straight from the source memory) to a pending iovec list
and issues one pwritev per batch of up to IOV_MAX buffers or ``flush_bytes`` bytes.
"""

from __future__ import annotations

from .fileio import IOV_MAX, pwritev_full

__all__ = ["SequentialWriter"]


class SequentialWriter:
    def __init__(self, fd: int, path: str, offset: int, *, flush_bytes: int = 8 << 20) -> None:
        self.fd = fd
        self.path = path
        self.offset = offset  # file offset of the next byte appended
        self.flush_bytes = flush_bytes
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._start = offset

    def append(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if not len(view):
            return
        self._pending.append(view)
        self._pending_bytes += len(view)
        self.offset += len(view)
        if len(self._pending) >= IOV_MAX or self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            pwritev_full(self.fd, self._pending, self._start, self.path)
            self._start += self._pending_bytes
            self._pending = []
            self._pending_bytes = 0

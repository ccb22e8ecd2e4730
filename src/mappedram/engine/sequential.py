"""Sequential stream output through one staging buffer, in large positioned writes.

The legacy (streamed) format is one sequential stream of records. The writer keeps a
page-aligned staging buffer: small pieces are copied in with :meth:`append`, and a
caller that builds records itself encodes them straight into the buffer
(:meth:`reserve`, then :meth:`commit`), so page data is copied once, from where it was
read to where it is written. A full buffer is written with one ``pwrite``.

With ``direct`` the descriptor is O_DIRECT: only whole 4 KiB blocks are written from the
aligned buffer (fast path) and the partial block at the end of a batch moves to the front
of the buffer for the next one; :meth:`close` writes the last block zero-padded and
truncates the file to the stream's real end. The stream must then start at an aligned
offset.
"""

from __future__ import annotations

from .directio import DIRECT_ALIGN, aligned_buffer
from .fileio import pwrite_full, truncate

__all__ = ["SequentialWriter"]


class SequentialWriter:
    def __init__(self, fd: int, path: str, offset: int, *, buffer_bytes: int = 16 << 20, direct: bool = False) -> None:
        if direct and offset % DIRECT_ALIGN:
            raise ValueError(f"an O_DIRECT stream must start at a multiple of {DIRECT_ALIGN}, not {offset}")
        self.fd = fd
        self.path = path
        self.offset = offset  # file offset of the next byte appended
        self.direct = direct
        self.capacity = buffer_bytes
        self._buffer = aligned_buffer(buffer_bytes)
        self._view = memoryview(self._buffer)
        self._fill = 0  # staged bytes, which belong at file offset _start
        self._start = offset

    def append(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = self.capacity - self._fill
            if room == 0:
                self.flush()
                continue
            n = min(room, len(view))
            self._view[self._fill : self._fill + n] = view[:n]
            self._fill += n
            self.offset += n
            view = view[n:]

    def reserve(self, size: int) -> memoryview:
        """Room for ``size`` bytes at the end of the stream; :meth:`commit` says how many were used."""
        if self._fill + size > self.capacity:
            self.flush()
        if self._fill + size > self.capacity:
            raise ValueError(f"a {size}-byte piece does not fit a {self.capacity}-byte staging buffer")
        return self._view[self._fill : self._fill + size]

    def commit(self, size: int) -> None:
        self._fill += size
        self.offset += size

    def flush(self) -> None:
        """Write what is staged (with ``direct``: every whole block; the rest stays staged)."""
        n = self._fill - self._fill % DIRECT_ALIGN if self.direct else self._fill
        if n:
            pwrite_full(self.fd, self._view[:n], self._start, self.path)
            rest = self._fill - n
            if rest:
                self._view[:rest] = self._view[n : self._fill]
            self._start += n
            self._fill = rest

    def discard(self) -> None:
        """Drop what is staged (the error path: a failed save never writes its end)."""
        self._fill = 0
        self._view.release()
        self._buffer.close()

    def close(self) -> None:
        """Write everything; with ``direct`` the last block is padded, then the file is cut to size."""
        try:
            self.flush()
            if self._fill:
                # only with direct: a partial block remains; write it whole, then cut the padding off
                padded = DIRECT_ALIGN
                self._view[self._fill : padded] = bytes(padded - self._fill)
                pwrite_full(self.fd, self._view[:padded], self._start, self.path)
                self._start += self._fill
                self._fill = 0
                truncate(self.fd, self.offset, self.path)
        finally:
            self._view.release()
            self._buffer.close()

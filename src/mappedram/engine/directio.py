"""O_DIRECT helpers: probing, aligned buffers, alignment checks.

Direct I/O needs the buffer address, the length and the file offset aligned to the
device's logical block size; 4096 covers every device (and is the x86 page size, so
page-granular I/O from page-aligned memory always qualifies).
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile

import numpy as np

from mappedram.errors import IOEngineError

__all__ = ["DIRECT_ALIGN", "aligned_buffer", "address_of", "is_aligned", "probe_direct_io", "require_direct_io"]

DIRECT_ALIGN = 4096


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer.

    MAP_SHARED keeps direct I/O safe if another thread forks while it is in flight.
    """
    return mmap.mmap(-1, max(size, mmap.PAGESIZE), mmap.MAP_SHARED)


def address_of(view: memoryview) -> int:
    """The address of a buffer's first byte (read-only buffers included)."""
    if len(view) == 0:
        return 0
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def is_aligned(view: memoryview, align: int = DIRECT_ALIGN) -> bool:
    return address_of(view) % align == 0 and len(view) % align == 0


def probe_direct_io(directory: str) -> str | None:
    """Return None if files in ``directory`` accept O_DIRECT writes, else the reason they don't."""
    fd = -1
    path = ""
    try:
        fd, path = tempfile.mkstemp(prefix=".mappedram-probe-", dir=directory)
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        buf = aligned_buffer(DIRECT_ALIGN)
        try:
            os.pwrite(fd, memoryview(buf)[:DIRECT_ALIGN], 0)
        finally:
            buf.close()
        return None
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return f"the filesystem of {directory} does not support O_DIRECT ({exc.strerror})"
        return f"O_DIRECT probe in {directory} failed: {exc.strerror}"
    finally:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass


def require_direct_io(directory: str) -> None:
    reason = probe_direct_io(directory)
    if reason is not None:
        raise IOEngineError(reason, path=directory, errno=errno.EINVAL)

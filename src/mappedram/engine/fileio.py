"""Positioned file I/O: the only module that opens files and issues reads and writes.

Every call is positional (os.pread/os.preadv/os.pwrite/os.pwritev): no shared seek
position, so one descriptor may serve several threads. Short transfers are looped
over; EINTR is retried by Python itself (PEP 475). Failures raise IOEngineError
naming the operation, the file and the offset.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import mmap
import os
import queue
import stat as stat_mod
import threading
from collections.abc import Sequence

from mappedram.errors import IOEngineError

from . import faults

__all__ = [
    "FICLONE",
    "reflink",
    "IOV_MAX",
    "open_read",
    "open_write",
    "file_size",
    "pread_upto",
    "preadv_full",
    "preadv_exact",
    "pwrite_full",
    "pwritev_full",
    "close_fd",
    "close_quiet",
    "allocated_bytes",
    "create_sparse",
    "fsync",
    "fsync_dir",
    "truncate",
    "replace",
    "unlink_quiet",
    "map_file",
    "lock_exclusive",
    "unlock_remove",
    "punch_hole",
    "file_identity",
    "PRIVATE_MODE",
    "make_private_dir",
    "data_extents",
    "DataCursor",
    "mount_of",
    "reads_fill_holes",
    "list_dir",
    "prefetch",
    "Writeback",
    "read_no_follow",
]

#: Linux UIO_MAXIOV: the most iovecs one preadv/pwritev call takes.
IOV_MAX = getattr(os, "IOV_MAX", 1024)


#: Files that hold guest memory or device state are created owner-only, as QEMU creates
#: migration files and dumps (S_IRUSR | S_IWUSR), whatever the umask lets through.
PRIVATE_MODE = 0o600


def _fail(exc: OSError, op: str, path: str, offset: int | None = None, length: int | None = None) -> IOEngineError:
    if exc.errno == errno_mod.ELOOP and op == "open":
        return IOEngineError(
            "is a symbolic link: mappedram never writes through a symlink (give the real path, or remove the link)",
            path=path, errno=exc.errno,
        )  # fmt: skip
    return IOEngineError(
        f"{op} failed: {exc.strerror or exc}", path=path, offset=offset, length=length, errno=exc.errno
    )


def open_read(path: str, *, direct: bool = False) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise _fail(exc, "open", path) from None


def open_write(
    path: str, *, create: bool = True, exclusive: bool = False, direct: bool = False, mode: int = PRIVATE_MODE
) -> int:
    """Open ``path`` to write, never through a symlink (O_NOFOLLOW); a new file gets ``mode``."""
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    if create:
        flags |= os.O_CREAT
    if exclusive:
        flags |= os.O_EXCL
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags, mode)
    except OSError as exc:
        raise _fail(exc, "open", path) from None


def close_fd(fd: int, path: str) -> None:
    """Close ``fd``; a failure (e.g. EIO from a delayed write) is an error about ``path``."""
    try:
        os.close(fd)
    except OSError as exc:
        raise _fail(exc, "close", path) from None


def close_quiet(fd: int) -> None:
    """Close ``fd`` on an error path, where the first error is the one to report."""
    try:
        os.close(fd)
    except OSError:
        pass


def file_identity(fd: int, path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the open file: tells it apart from whatever its path names later."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _fail(exc, "stat", path) from None
    return st.st_dev, st.st_ino


def file_size(fd: int, path: str) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise _fail(exc, "fstat", path) from None


def pread_upto(fd: int, length: int, offset: int, path: str) -> bytes:
    """Read up to ``length`` bytes at ``offset``; fewer only at end of file."""
    chunks = []
    got = 0
    while got < length:
        try:
            want = faults.check("read", path, offset + got, length - got)
            data = os.pread(fd, want, offset + got) if want else b""
        except InterruptedError:
            continue  # EINTR (also an injected one): retry, as PEP 475 does
        except OSError as exc:
            raise _fail(exc, "read", path, offset + got, length - got) from None
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def preadv_full(fd: int, buffers: Sequence[memoryview], offset: int, path: str) -> int:
    """Fill ``buffers`` from ``offset`` on; return the bytes read (less only at end of file)."""
    bufs = list(buffers)
    total = 0
    while bufs:
        try:
            batch = _limit(bufs[:IOV_MAX], faults.check("read", path, offset + total, _size(bufs[:IOV_MAX])))
            n = os.preadv(fd, batch, offset + total) if batch else 0
        except InterruptedError:
            continue  # EINTR (also an injected one): retry, as PEP 475 does
        except OSError as exc:
            raise _fail(exc, "read", path, offset + total, sum(len(b) for b in bufs)) from None
        if n == 0:
            break
        total += n
        bufs = _advance(bufs, n)
    return total


def preadv_exact(fd: int, buffers: Sequence[memoryview], offset: int, path: str) -> None:
    """Fill ``buffers`` completely from ``offset`` on; a short read (the file shrank) is an error."""
    want = _size(buffers)
    got = preadv_full(fd, buffers, offset, path)
    if got != want:
        raise IOEngineError(
            f"file ended early: read {got} of {want} bytes",
            path=path,
            offset=offset + got,
            length=want - got,
            errno=errno_mod.EIO,
        )


def pwrite_full(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            want = faults.check("write", path, offset + done, len(view) - done)
            n = os.pwrite(fd, view[done : done + want], offset + done)
        except InterruptedError:
            continue  # EINTR (also an injected one): retry, as PEP 475 does
        except OSError as exc:
            raise _fail(exc, "write", path, offset + done, len(view) - done) from None
        if n == 0:
            raise IOEngineError("write made no progress", path=path, offset=offset + done, errno=errno_mod.EIO)
        done += n


def pwritev_full(fd: int, buffers: Sequence[memoryview], offset: int, path: str) -> int:
    bufs = [b for b in buffers if len(b)]
    total = 0
    while bufs:
        try:
            batch = _limit(bufs[:IOV_MAX], faults.check("write", path, offset + total, _size(bufs[:IOV_MAX])))
            n = os.pwritev(fd, batch, offset + total) if batch else 0
        except InterruptedError:
            continue  # EINTR (also an injected one): retry, as PEP 475 does
        except OSError as exc:
            raise _fail(exc, "write", path, offset + total, sum(len(b) for b in bufs)) from None
        if n == 0:
            raise IOEngineError("write made no progress", path=path, offset=offset + total, errno=errno_mod.EIO)
        total += n
        bufs = _advance(bufs, n)
    return total


def _size(bufs: Sequence[memoryview]) -> int:
    return sum(len(b) for b in bufs)


def _limit(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``bufs`` (a short transfer an injected fault asked for)."""
    out = []
    for b in bufs:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(b)
    return out


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def allocated_bytes(path: str) -> int:
    """Bytes the file occupies on disk (st_blocks * 512): what holes save."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError as exc:
        raise _fail(exc, "stat", path) from None


def create_sparse(path: str, size: int, *, mode: int = PRIVATE_MODE) -> None:
    """Create (or truncate) ``path`` as a hole of ``size`` bytes (never through a symlink)."""
    fd = open_write(path, mode=mode)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    except OSError as exc:
        raise _fail(exc, "truncate", path, 0, size) from None
    finally:
        os.close(fd)


def fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _fail(exc, "fsync", path) from None


def fsync_dir(path: str) -> None:
    """fsync a directory, so that a rename in it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(exc, "open", path) from None
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _fail(exc, "fsync", path) from None
    finally:
        os.close(fd)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)  # the libc this process runs on (no ldconfig run)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_ZEROS = bytes(1 << 20)


def punch_hole(fd: int, offset: int, length: int, path: str) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros, freeing their blocks:
    fallocate(PUNCH_HOLE | KEEP_SIZE); where the filesystem cannot punch, zeros are written."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno_mod.EOPNOTSUPP, errno_mod.ENOSYS):
        raise IOEngineError(f"punch hole failed: {os.strerror(err)}", path=path, offset=offset, length=length,
                            errno=err)  # fmt: skip
    done = 0
    while done < length:
        n = min(len(_ZEROS), length - done)
        pwrite_full(fd, memoryview(_ZEROS)[:n], offset + done, path)
        done += n


#: linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409


def reflink(src_path: str, fd: int, path: str) -> bool:
    """Make the file open on ``fd`` a reflink clone of ``src_path`` (FICLONE: the two share
    every block until one is written). False where the filesystem cannot (ext4, tmpfs,
    another filesystem): the caller writes the file itself."""
    src = open_read(src_path)
    try:
        fcntl.ioctl(fd, FICLONE, src)
        return True
    except OSError as exc:
        if exc.errno in (errno_mod.EOPNOTSUPP, errno_mod.EXDEV, errno_mod.EINVAL, errno_mod.ENOTTY,
                         errno_mod.ENOSYS, errno_mod.EPERM):  # fmt: skip
            return False
        raise _fail(exc, "clone (FICLONE) from " + src_path, path) from None
    finally:
        close_quiet(src)


def data_extents(fd: int, start: int, end: int, path: str) -> list[tuple[int, int]]:
    """The ``(offset, end)`` ranges of ``[start, end)`` that hold data (SEEK_DATA/SEEK_HOLE);
    what lies between them reads as zeros without being stored."""
    return DataCursor(fd, path).extents(start, end)


class DataCursor:
    """SEEK_DATA/SEEK_HOLE over one descriptor, remembering the last extent found.

    Ranges asked in order (one channel's tasks) then cost one call pair per data extent
    they hold and nothing for an extent found before that runs on through them: SEEK_HOLE
    walks the extent to its end (on tmpfs, page by page through the page cache: 1.5 ms per
    call in a fully written 1 GiB file, once per task when every task asked afresh).
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        # [_lo, _data) is a hole, [_data, _hole) data, as the last seek found them.
        self._lo = self._data = self._hole = 0

    def extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, end)`` that hold data, as :func:`data_extents`."""
        out: list[tuple[int, int]] = []
        at = start
        while at < end:
            if not self._lo <= at < self._hole:
                if not self._seek(at):  # no SEEK_DATA here: say all of it may hold data
                    return [(start, end)]
            data = max(at, self._data)
            if data >= end:
                break
            out.append((data, min(self._hole, end)))
            at = self._hole
        return out

    def _seek(self, at: int) -> bool:
        try:
            data = os.lseek(self.fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno_mod.ENXIO:  # no data after ``at``
                self._lo, self._data, self._hole = at, _NO_END, _NO_END
                return True
            if exc.errno == errno_mod.EINVAL:
                return False
            raise _fail(exc, "seek", self.path, at) from None
        try:
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
        except OSError as exc:
            raise _fail(exc, "seek", self.path, data) from None
        self._lo, self._data, self._hole = at, data, hole
        return True


_NO_END = 1 << 63


def mount_of(path: str) -> tuple[str, str, str]:
    """The filesystem that holds ``path``: its device (major:minor), type and source, from
    /proc/self/mountinfo (type and source empty where it cannot be read)."""
    dev = os.stat(path).st_dev
    device = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or fields[2] != device or "-" not in fields:
                    continue
                sep = fields.index("-")
                return device, fields[sep + 1], fields[sep + 2]
    except OSError:
        pass
    return device, "", ""


#: Filesystems on which a read through a shared mapping fills a hole for good: the kernel
#: allocates and clears a page that stays the file's (shmem_fault), so reading a sparse RAM
#: image there makes it take its whole size.
_HOLES_FILLED_BY_READS = frozenset({"tmpfs", "hugetlbfs"})


def reads_fill_holes(path: str) -> bool:
    """Whether reading the holes of ``path`` through a mapping allocates them (tmpfs): then
    finding them first (:func:`data_extents`) costs less than reading them."""
    return mount_of(path)[1] in _HOLES_FILLED_BY_READS


def truncate(fd: int, size: int, path: str) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise _fail(exc, "truncate", path, size) from None


def replace(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise _fail(exc, "rename", dst) from None


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def map_file(path: str, *, writable: bool, size: int | None = None) -> mmap.mmap:
    """Map a raw image shared; a writable one is created (sparse, 0600) or grown to ``size``,
    never through a symlink; an existing file keeps its mode."""
    try:
        if writable:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_MODE)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(exc, "open", path) from None
    try:
        if writable and size is not None and os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        length = os.fstat(fd).st_size
        if length == 0:
            raise IOEngineError("cannot map an empty file", path=path, errno=errno_mod.EINVAL)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, length, mmap.MAP_SHARED, prot)
    except OSError as exc:
        raise _fail(exc, "mmap", path) from None
    finally:
        os.close(fd)


def lock_exclusive(path: str, what: str) -> int:
    """Take an exclusive, non-blocking flock on the lock file ``path``; return its fd.

    The lock file exists only while it is held: :func:`unlock_remove` unlinks it before it
    lets go. So a lock taken here must still be the file ``path`` names: an owner may have
    unlinked it between this open and this flock (a new owner then created another), and
    a lock on an unlinked file excludes nobody. Such a lock is dropped and taken again.
    The file is opened without following a symlink and created 0600.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(1000):  # each turn means another owner came and went meanwhile
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise _fail(exc, "open", path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno_mod.EWOULDBLOCK, errno_mod.EAGAIN):
                raise IOEngineError(f"{what} is in use by another save", path=path, errno=exc.errno) from None
            raise _fail(exc, "lock", path) from None
        try:
            named = os.lstat(path)
        except FileNotFoundError:
            named = None
        except OSError as exc:
            os.close(fd)
            raise _fail(exc, "stat", path) from None
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)
    raise IOEngineError(f"{what}: the lock file keeps being replaced", path=path)


def unlock_remove(fd: int, path: str) -> None:
    """Release a lock of :func:`lock_exclusive`: unlink its file while still holding it (only
    if the path still names it: never another owner's), then close."""
    try:
        held, named = os.fstat(fd), os.lstat(path)
        if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        os.close(fd)
        raise _fail(exc, "unlink", path) from None
    close_fd(fd, path)


def make_private_dir(path: str) -> None:
    """Create the directory ``path`` owner-only (0700), or accept an existing one that is
    not a symlink."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise _fail(exc, "mkdir", path) from None
    st = os.lstat(path)
    if not stat_mod.S_ISDIR(st.st_mode):
        raise IOEngineError("exists and is not a directory (a symlink is never followed)", path=path,
                            errno=errno_mod.EEXIST)  # fmt: skip
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise IOEngineError("is a directory that others own or may write to: give a directory of your own",
                            path=path, errno=errno_mod.EPERM)  # fmt: skip


def list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        raise _fail(exc, "list", path) from None


def prefetch(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a range into the page cache (POSIX_FADV_WILLNEED); a hint only."""
    if length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # a hint: a filesystem that refuses it reads on demand


SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int


class Writeback:
    """Writes ranges of a file's dirty page cache to the disk in the background, so that a
    later fsync waits only for what is still in flight: one thread calls
    sync_file_range(SYNC_FILE_RANGE_WRITE) for each range :meth:`submit` queued, in order
    (a call returns once the range's I/O is submitted, which takes as long as the disk
    needs to take it; the caller never waits for it). A hint: it makes nothing durable,
    and a filesystem that refuses it leaves the work to the fsync. :meth:`wait` before
    the descriptor is closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, offset: int, length: int) -> None:
        """Queue ``length`` bytes at ``offset`` (0: to the end of the file) for writeback."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mappedram-writeback", daemon=True)
            self._thread.start()
        self._queue.put((offset, length))

    def wait(self) -> None:
        """Return once every range queued so far is submitted to the disk."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _libc.sync_file_range(self.fd, item[0], item[1], SYNC_FILE_RANGE_WRITE)


def read_no_follow(path: str, limit: int) -> tuple[os.stat_result, bytes]:
    """The status of ``path`` (never followed: a symlink raises IOEngineError with errno
    ELOOP) and, when it is a regular file, its first ``limit`` + 1 bytes (so a caller sees
    that it holds more than ``limit``). Opened O_NONBLOCK: a FIFO does not block the open."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno_mod.ELOOP:
            raise IOEngineError("is a symbolic link, which is never followed here", path=path,
                                errno=exc.errno) from None  # fmt: skip
        raise _fail(exc, "open", path) from None
    try:
        st = os.fstat(fd)
        data = pread_upto(fd, limit + 1, 0, path) if stat_mod.S_ISREG(st.st_mode) else b""
    except OSError as exc:
        raise _fail(exc, "stat", path) from None
    finally:
        os.close(fd)
    return st, data

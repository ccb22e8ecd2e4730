"""userfaultfd(2) by ctypes: register anonymous memory, read its missing-page faults, install pages.

Only what a lazy restore needs: MISSING mode on private anonymous memory; UFFDIO_COPY (a
page's bytes from a bounce buffer, waking the faulting thread), UFFDIO_ZEROPAGE (a zero
page), UFFDIO_WAKE; page-fault messages read from the descriptor. The ioctl numbers are
computed with the kernel's _IOC macros from the structures' sizes, which are asserted
against include/uapi/linux/userfaultfd.h.

References:
    Linux include/uapi/linux/userfaultfd.h, Documentation/admin-guide/mm/userfaultfd.rst;
    Firecracker's uffd page-fault handler; QEMU migration/postcopy-ram.c.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
import select

from mappedram.errors import KvmError

from .kvm import IO, IOR, IOWR

__all__ = [
    "Userfaultfd",
    "UserfaultfdUnavailable",
    "userfaultfd_problem",
]

u8, u16, u32, u64, s64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64

UFFD_API = 0xAA
UFFDIO = 0xAA
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
_NR_USERFAULTFD = 323  # x86_64
_USERFAULTFD_DEV = "/dev/userfaultfd"


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("ioctls", u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("zeropage", s64)]


class _pagefault(ctypes.Structure):
    _fields_ = [("flags", u64), ("address", u64), ("ptid", u32), ("_pad", u32)]


class uffd_msg(ctypes.Structure):
    _fields_ = [("event", u8), ("reserved1", u8), ("reserved2", u16), ("reserved3", u32), ("pagefault", _pagefault)]


for _struct, _size in ((uffdio_api, 24), (uffdio_range, 16), (uffdio_register, 32), (uffdio_copy, 40),
                       (uffdio_zeropage, 32), (uffd_msg, 32)):  # fmt: skip
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct))

UFFDIO_API = IOWR(UFFDIO, 0x3F, uffdio_api)
UFFDIO_REGISTER = IOWR(UFFDIO, 0x00, uffdio_register)
UFFDIO_UNREGISTER = IOR(UFFDIO, 0x01, uffdio_range)
UFFDIO_WAKE = IOR(UFFDIO, 0x02, uffdio_range)
UFFDIO_COPY = IOWR(UFFDIO, 0x03, uffdio_copy)
UFFDIO_ZEROPAGE = IOWR(UFFDIO, 0x04, uffdio_zeropage)
USERFAULTFD_IOC_NEW = IO(UFFDIO, 0x00)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int]


class UserfaultfdUnavailable(KvmError):
    """userfaultfd cannot be used here; the message says why and what would allow it."""


def _explain(err: int) -> str:
    if err == errno_mod.EPERM:
        return ("userfaultfd refused (EPERM): this process may not handle faults of kernel code such as KVM's; "
                "run as root (CAP_SYS_PTRACE), or set the sysctl vm.unprivileged_userfaultfd=1, or give this user "
                f"read-write access to {_USERFAULTFD_DEV}")  # fmt: skip
    if err == errno_mod.ENOSYS:
        return "userfaultfd is not in this kernel (CONFIG_USERFAULTFD, Linux 4.3 or later)"
    return f"userfaultfd failed: {os.strerror(err)}"


def _open_uffd() -> int:
    """A new userfaultfd (the syscall; else /dev/userfaultfd, Linux 6.1+), non-blocking, close-on-exec
    (:meth:`Userfaultfd.faults` waits in select, so a read never blocks)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = int(_libc.syscall(_NR_USERFAULTFD, flags))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    try:
        dev = os.open(_USERFAULTFD_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise UserfaultfdUnavailable(_explain(err), ioctl="userfaultfd", errno=err) from None
    try:
        return int(fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags))
    except OSError as exc:
        raise UserfaultfdUnavailable(_explain(exc.errno or err), ioctl="USERFAULTFD_IOC_NEW",
                                     errno=exc.errno) from None  # fmt: skip
    finally:
        os.close(dev)


def userfaultfd_problem() -> str | None:
    """Why userfaultfd cannot be used here (None: it can)."""
    try:
        fd = _open_uffd()
    except UserfaultfdUnavailable as exc:
        return exc.message
    os.close(fd)
    return None


class Userfaultfd:
    """One userfaultfd with MISSING-mode registrations; close() ends it."""

    def __init__(self) -> None:
        self.fd = _open_uffd()
        api = uffdio_api(api=UFFD_API, features=0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_API, api)
        except OSError as exc:
            os.close(self.fd)
            raise UserfaultfdUnavailable(f"UFFDIO_API failed: {exc.strerror}", ioctl="UFFDIO_API",
                                         errno=exc.errno) from None  # fmt: skip
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)

    def register(self, address: int, length: int) -> None:
        reg = uffdio_register(range=uffdio_range(address, length), mode=UFFDIO_REGISTER_MODE_MISSING)
        self._ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, reg)

    def unregister(self, address: int, length: int) -> None:
        self._ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, uffdio_range(address, length))

    def copy(self, dst: int, src: int, length: int) -> bool:
        """Install ``length`` bytes at ``dst`` from ``src``, waking faulting threads. False:
        the range (or its first page) was already present (EEXIST), nothing installed."""
        arg = uffdio_copy(dst=dst, src=src, len=length, mode=0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_COPY, arg)
        except OSError as exc:
            if exc.errno == errno_mod.EEXIST:
                return False
            raise KvmError(f"UFFDIO_COPY of {length} bytes at {dst:#x} failed: {exc.strerror}", ioctl="UFFDIO_COPY",
                           errno=exc.errno) from None  # fmt: skip
        if arg.copy != length:
            raise KvmError(f"UFFDIO_COPY installed {arg.copy} of {length} bytes at {dst:#x}", ioctl="UFFDIO_COPY")
        return True

    def zeropage(self, dst: int, length: int) -> bool:
        arg = uffdio_zeropage(range=uffdio_range(dst, length), mode=0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_ZEROPAGE, arg)
        except OSError as exc:
            if exc.errno == errno_mod.EEXIST:
                return False
            raise KvmError(f"UFFDIO_ZEROPAGE of {length} bytes at {dst:#x} failed: {exc.strerror}",
                           ioctl="UFFDIO_ZEROPAGE", errno=exc.errno) from None  # fmt: skip
        return True

    def wake(self, address: int, length: int) -> None:
        self._ioctl("UFFDIO_WAKE", UFFDIO_WAKE, uffdio_range(address, length))

    def faults(self, max_events: int = 64) -> list[int] | None:
        """Block until page faults come (their addresses) or :meth:`interrupt` (None)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll()}
        if self._wake_r in ready:
            return None
        try:
            raw = os.read(self.fd, ctypes.sizeof(uffd_msg) * max_events)
        except BlockingIOError:
            return []
        n = len(raw) // ctypes.sizeof(uffd_msg)
        msgs = (uffd_msg * n).from_buffer_copy(raw[: n * ctypes.sizeof(uffd_msg)])
        return [int(m.pagefault.address) for m in msgs if m.event == UFFD_EVENT_PAGEFAULT]

    def interrupt(self) -> None:
        """Make a :meth:`faults` call (now or next) return None."""
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self._wake_r = self._wake_w = -1

    def _ioctl(self, name: str, request: int, arg: ctypes.Structure) -> None:
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            raise KvmError(f"{name} failed: {exc.strerror}", ioctl=name, errno=exc.errno) from None

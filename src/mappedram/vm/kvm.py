"""The KVM layer: /dev/kvm, a VM and its vCPUs, driven by ioctls on their descriptors.

Theory of operation:
    * ``Kvm`` is the /dev/kvm descriptor (system ioctls), ``KvmVm`` a VM descriptor (memory
      slots, the dirty log), ``KvmVcpu`` a vCPU descriptor with its ``kvm_run`` area mapped
      (``run()``, the register files, MSRs, CPUID). Each owns its descriptor and closes it in
      ``close()`` (idempotent) or on leaving a ``with`` block; nothing relies on the garbage
      collector.
    * The structures are ctypes mirrors of the kernel's x86-64 UAPI; every ioctl number is
      computed from them with the ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of
      ``asm-generic/ioctl.h``, so a size mistake in a structure gives a wrong number and a
      loud ENOTTY rather than silent corruption.
    * A failed ioctl raises :class:`~mappedram.errors.KvmError` naming the ioctl and the errno.
      ``KVM_RUN`` interrupted by ``immediate_exit`` or a signal (EINTR) is not an error: it
      returns ``KVM_EXIT_INTR``.
    * ``fcntl.ioctl`` releases the GIL around the system call, so a vCPU thread blocked in
      ``KVM_RUN`` does not stop the rest of the process.

References:
    Linux include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h (the structures and
    ioctl numbers), include/uapi/asm-generic/ioctl.h (the number encoding),
    Documentation/virt/kvm/api.rst (KVM_RUN, KVM_EXIT_IO, immediate_exit, KVM_GET_DIRTY_LOG,
    KVM_SET_SIGNAL_MASK, KVM_GET_XSAVE), arch/x86/kvm/x86.c (kvm_arch_vcpu_ioctl_set_fpu).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.errors import KvmError

__all__ = [
    "KVM_API_VERSION",
    "KVM_EXIT_IO",
    "KVM_EXIT_HLT",
    "KVM_EXIT_INTR",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "EXIT_REASONS",
    "GuestMemory",
    "IO",
    "IOR",
    "IOW",
    "IOWR",
    "file_memory",
    "IoExit",
    "Kvm",
    "KvmVm",
    "KvmVcpu",
    "kvm_regs",
    "kvm_segment",
    "kvm_dtable",
    "kvm_sregs",
    "kvm_fpu",
    "kvm_xsave",
    "kvm_msr_entry",
    "kvm_cpuid_entry2",
    "kvm_userspace_memory_region",
    "kvm_dirty_log",
    "kvm_run",
    "kvm_available",
    "anonymous_memory",
    "memory_address",
]

#: The type of guest RAM: an anonymous mapping (a writable buffer).
GuestMemory = mmap.mmap

# ---------------------------------------------------------------------------------------------
# ioctl number encoding (include/uapi/asm-generic/ioctl.h, as on x86)

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def IOC(direction: int, kind: int, nr: int, size: int) -> int:
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit _IOC_SIZEBITS")
    return (direction << _IOC_DIRSHIFT) | (kind << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def IO(kind: int, nr: int) -> int:
    return IOC(_IOC_NONE, kind, nr, 0)


def IOR(kind: int, nr: int, struct: type[Any]) -> int:
    return IOC(_IOC_READ, kind, nr, ctypes.sizeof(struct))


def IOW(kind: int, nr: int, struct: type[Any]) -> int:
    return IOC(_IOC_WRITE, kind, nr, ctypes.sizeof(struct))


def IOWR(kind: int, nr: int, struct: type[Any]) -> int:
    return IOC(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(struct))


# ---------------------------------------------------------------------------------------------
# Structures (arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h)

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVM_NR_INTERRUPTS = 256


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),  # in fxsave format
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class fxregs_state(ctypes.Structure):
    """The legacy region of an XSAVE area (the FXSAVE image; arch/x86/include/asm/fpu/types.h)."""

    _fields_ = [
        ("cwd", u16),
        ("swd", u16),
        ("twd", u8),  # abridged, as kvm_fpu.ftwx
        ("pad1", u8),
        ("fop", u16),
        ("rip", u64),
        ("rdp", u64),
        ("mxcsr", u32),
        ("mxcsr_mask", u32),
        ("st_space", (u8 * 16) * 8),
        ("xmm_space", (u8 * 16) * 16),
        ("padding", u8 * 96),
    ]


class kvm_xsave(ctypes.Structure):
    """``struct kvm_xsave``: the legacy region, the XSAVE header (``xstate_bv`` first), the rest."""

    _fields_ = [
        ("legacy", fxregs_state),
        ("xstate_bv", u64),
        ("rest", u8 * (4096 - 512 - 8)),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]  # a pointer, padded to 64 bits


class kvm_signal_mask(ctypes.Structure):
    _fields_ = [("len", u32)]  # followed by ``len`` bytes of the kernel's sigset


class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hardware_exit_reason", u64),  # KVM_EXIT_UNKNOWN: hw.hardware_exit_reason
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _kvm_run_exit),
    ]


# ---------------------------------------------------------------------------------------------
# ioctl numbers and constants (include/uapi/linux/kvm.h)

KVMIO = 0xAE
KVM_API_VERSION = 12

KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, kvm_fpu)
KVM_SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, kvm_signal_mask)
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, kvm_xsave)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)

KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_XSAVE = 55
KVM_CAP_IMMEDIATE_EXIT = 136

#: XSTATE_BV bits of the x87 and SSE components (XFEATURE_MASK_FP | XFEATURE_MASK_SSE).
_XFEATURE_FP_SSE = 0b11

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_REASONS = {
    KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN",
    KVM_EXIT_EXCEPTION: "KVM_EXIT_EXCEPTION",
    KVM_EXIT_IO: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    KVM_EXIT_HLT: "KVM_EXIT_HLT",
    KVM_EXIT_MMIO: "KVM_EXIT_MMIO",
    KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "KVM_EXIT_FAIL_ENTRY",
    KVM_EXIT_INTR: "KVM_EXIT_INTR",
    KVM_EXIT_INTERNAL_ERROR: "KVM_EXIT_INTERNAL_ERROR",
}

#: Where KVM_SET_TSS_ADDR puts the three pages Intel VMX needs (as QEMU: kvm_arch_init).
_TSS_ADDR = 0xFFFBD000

_DEVICE = "/dev/kvm"


def _ioctl(fd: int, name: str, request: int, arg: Any = 0) -> int:
    """``ioctl(fd, request, arg)``; a failure raises KvmError naming ``name`` and the errno."""
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as exc:
        raise KvmError(f"{name} failed: {exc.strerror or exc}", ioctl=name, errno=exc.errno) from None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # only EIO is possible on these descriptors; report it, never hide it
        raise KvmError(f"close failed: {exc.strerror or exc}", ioctl="close", errno=exc.errno) from None


def anonymous_memory(size: int) -> GuestMemory:
    """Zero-filled, page-aligned guest RAM of ``size`` bytes: ``mmap(MAP_PRIVATE | MAP_ANONYMOUS)``.

    Private anonymous memory (not shared, i.e. not shmem) so that pages never touched cost
    nothing, even when read (they map the zero page), and transparent huge pages are asked
    for (``MADV_HUGEPAGE``): the host then allocates 2 MiB at a time, which makes the
    guest's first touches several times cheaper when KVM is not logging dirty pages.
    """
    if size <= 0 or size % mmap.PAGESIZE:
        raise ValueError(f"guest memory size {size} is not a positive multiple of the page size")
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise KvmError(
            f"cannot map {size} bytes of guest memory: {exc.strerror}", ioctl="mmap", errno=exc.errno
        ) from None
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass  # no THP on this kernel: 4 KiB pages work the same, only slower to fault in
    return memory


def file_memory(path: str, offset: int, size: int, *, identity: tuple[int, int] | None = None) -> GuestMemory:
    """Guest RAM that is ``size`` bytes of the file ``path`` from ``offset``, mapped private
    (``MAP_PRIVATE``): reads come from the page cache, shared with every other mapping and
    reader of the file; a write copies the page first, so the file is never modified."""
    if size <= 0 or size % mmap.PAGESIZE or offset % mmap.ALLOCATIONGRANULARITY:
        raise ValueError(f"cannot map {size} bytes at {offset:#x}: not page-aligned")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmError(f"{path}: cannot open for mapping: {exc.strerror}", ioctl="open", errno=exc.errno) from None
    try:
        st = os.fstat(fd)
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise KvmError(f"{path}: was replaced since it was opened and checked: not mapping another file",
                           ioctl="open")  # fmt: skip
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except OSError as exc:
        raise KvmError(f"{path}: cannot map {size} bytes at {offset:#x}: {exc.strerror}", ioctl="mmap",
                       errno=exc.errno) from None  # fmt: skip
    finally:
        os.close(fd)


def memory_address(memory: GuestMemory) -> int:
    """The host virtual address of ``memory``'s first byte (for ``userspace_addr``)."""
    view = ctypes.c_char.from_buffer(memory)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the buffer export at once, or the mapping could not be closed


@dataclass(frozen=True, slots=True)
class IoExit:
    """A KVM_EXIT_IO: ``count`` accesses of ``size`` bytes to ``port``; ``data`` as the guest wrote it."""

    direction: int
    size: int
    port: int
    count: int
    data: bytes


class Kvm:
    """The /dev/kvm descriptor: API version, extensions, supported CPUID, creating VMs."""

    def __init__(self, path: str = _DEVICE) -> None:
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                f"{path} does not exist: this host has no KVM "
                "(no hardware virtualization, or the kvm module is not loaded)",
                ioctl="open",
                errno=errno_mod.ENOENT,
            ) from None
        except PermissionError as exc:
            raise KvmError(
                f"{path}: permission denied (run as root or as a member of the device's group, usually 'kvm')",
                ioctl="open",
                errno=exc.errno,
            ) from None
        except OSError as exc:
            raise KvmError(f"cannot open {path}: {exc.strerror}", ioctl="open", errno=exc.errno) from None
        try:
            version = self._ioctl("KVM_GET_API_VERSION", KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(
                    f"{path}: KVM API version {version}, expected {KVM_API_VERSION}", ioctl="KVM_GET_API_VERSION"
                )
            required = (
                (KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
                (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
                (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            )
            for cap, name in required:
                if self.check_extension(cap) <= 0:
                    raise KvmError(f"{path}: this KVM lacks {name}", ioctl="KVM_CHECK_EXTENSION")
            self.vcpu_mmap_size = self._ioctl("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise

    def _fd(self) -> int:
        if self.fd is None:
            raise KvmError(f"{self.path} is closed", ioctl="use after close")
        return self.fd

    def _ioctl(self, name: str, request: int, arg: Any = 0) -> int:
        return _ioctl(self._fd(), name, request, arg)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is absent, else a positive (capability-specific) value."""
        return self._ioctl("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> ctypes.Array[kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves this KVM can present to a guest."""
        nent = 64
        while True:
            buf = _cpuid2_buffer(nent)
            try:
                self._ioctl("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno_mod.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            header = kvm_cpuid2.from_buffer(buf)
            entries: ctypes.Array[kvm_cpuid_entry2] = (kvm_cpuid_entry2 * header.nent).from_buffer_copy(
                buf, ctypes.sizeof(kvm_cpuid2)
            )
            return entries

    def create_vm(self) -> KvmVm:
        """KVM_CREATE_VM (the default machine type)."""
        fd = self._ioctl("KVM_CREATE_VM", KVM_CREATE_VM, 0)
        return KvmVm(self, fd)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpuid2_buffer(nent: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ctypes.sizeof(kvm_cpuid2) + nent * ctypes.sizeof(kvm_cpuid_entry2))
    kvm_cpuid2.from_buffer(buf).nent = nent
    return buf


class KvmVm:
    """A VM descriptor: memory slots, the dirty log, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd: int | None = fd
        self._slots: dict[int, kvm_userspace_memory_region] = {}
        try:
            if kvm.check_extension(KVM_CAP_SET_TSS_ADDR) > 0:
                # Intel VMX needs three pages for its real-mode TSS; QEMU puts them here too.
                # fcntl passes a C int and KVM takes the low 32 bits: give the address as one.
                self._ioctl("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, ctypes.c_int32(_TSS_ADDR).value)
        except BaseException:
            self.close()
            raise

    def _fd(self) -> int:
        if self.fd is None:
            raise KvmError("the VM is closed", ioctl="use after close")
        return self.fd

    def _ioctl(self, name: str, request: int, arg: Any = 0) -> int:
        return _ioctl(self._fd(), name, request, arg)

    def add_memslot(self, slot: int, guest_phys: int, mmap_obj: GuestMemory, log_dirty: bool = True) -> None:
        """KVM_SET_USER_MEMORY_REGION: ``mmap_obj`` becomes guest-physical RAM at ``guest_phys``.
        # reference: kvm_set_user_memory_region (accel/kvm/kvm-all.c)

        With ``log_dirty`` (KVM_MEM_LOG_DIRTY_PAGES) KVM records every page the guest writes;
        :meth:`get_dirty_log` returns and clears that record. Writes by this process to the
        mapping are not recorded: only the guest's.
        """
        size = len(mmap_obj)
        if size % mmap.PAGESIZE or guest_phys % mmap.PAGESIZE:
            raise ValueError("memory slots must be page-aligned")
        region = kvm_userspace_memory_region(
            slot=slot,
            flags=KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_phys,
            memory_size=size,
            userspace_addr=memory_address(mmap_obj),
        )
        self._ioctl("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region)
        self._slots[slot] = region

    def set_dirty_log(self, slot: int, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for an existing slot (allowed while vCPUs run).

        Turning it on starts an empty log and write-protects the slot, so every page the
        guest writes from then on is recorded, as QEMU does when a migration starts
        (kvm_slot_update_flags).
        """
        # reference: kvm_slot_update_flags (accel/kvm/kvm-all.c)
        region = self._slots.get(slot)
        if region is None:
            raise KvmError(f"no memory slot {slot}", ioctl="KVM_SET_USER_MEMORY_REGION", errno=errno_mod.ENOENT)
        updated = kvm_userspace_memory_region.from_buffer_copy(region)
        updated.flags = region.flags & ~KVM_MEM_LOG_DIRTY_PAGES | (KVM_MEM_LOG_DIRTY_PAGES if enabled else 0)
        self._ioctl("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, updated)
        self._slots[slot] = updated

    def get_dirty_log(self, slot: int) -> npt.NDArray[np.uint64]:
        """KVM_GET_DIRTY_LOG: the pages of ``slot`` written since the last call, and clear the log.

        One bit per page, as the kernel's ``unsigned long`` bitmap: bit ``p % 64`` of word
        ``p // 64`` is page ``p`` (little-endian words on x86-64).
        """
        # reference: kvm_slot_get_dirty_log (accel/kvm/kvm-all.c)
        region = self._slots.get(slot)
        if region is None:
            raise KvmError(f"no memory slot {slot}", ioctl="KVM_GET_DIRTY_LOG", errno=errno_mod.ENOENT)
        pages = region.memory_size // mmap.PAGESIZE
        words = np.zeros((pages + 63) // 64, dtype=np.uint64)
        log = kvm_dirty_log(slot=slot, dirty_bitmap=words.ctypes.data)
        self._ioctl("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, log)
        return words

    def create_vcpu(self, index: int = 0) -> KvmVcpu:
        """KVM_CREATE_VCPU, and map its ``kvm_run`` area."""
        fd = self._ioctl("KVM_CREATE_VCPU", KVM_CREATE_VCPU, index)
        return KvmVcpu(self, fd, index)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _close(fd)

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KvmVcpu:
    """A vCPU descriptor and its mapped ``kvm_run`` area."""

    def __init__(self, vm: KvmVm, fd: int, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd: int | None = fd
        self._has_xsave = vm.kvm.check_extension(KVM_CAP_XSAVE) > 0
        self._run_map: mmap.mmap | None = None
        self._run: kvm_run | None = None
        try:
            self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            self._run = kvm_run.from_buffer(self._run_map)
        except OSError as exc:
            self.close()
            raise KvmError(f"cannot map kvm_run: {exc.strerror}", ioctl="mmap", errno=exc.errno) from None

    def _fd(self) -> int:
        if self.fd is None:
            raise KvmError(f"vCPU {self.index} is closed", ioctl="use after close")
        return self.fd

    def _ioctl(self, name: str, request: int, arg: Any = 0) -> int:
        return _ioctl(self._fd(), name, request, arg)

    @property
    def kvm_run(self) -> kvm_run:
        if self._run is None:
            raise KvmError(f"vCPU {self.index} is closed", ioctl="use after close")
        return self._run

    def run(self) -> int:
        """KVM_RUN until the next exit; returns ``kvm_run.exit_reason`` (KVM_EXIT_INTR on EINTR)."""
        run = self.kvm_run
        try:
            fcntl.ioctl(self._fd(), KVM_RUN, 0)
        except OSError as exc:
            if exc.errno == errno_mod.EINTR:
                run.exit_reason = KVM_EXIT_INTR
                return KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN failed: {exc.strerror or exc}", ioctl="KVM_RUN", errno=exc.errno) from None
        return int(run.exit_reason)

    def complete_pending_io(self) -> None:
        """Finish the operation of the last exit without running another guest instruction.

        After KVM_EXIT_IO the instruction is complete (RIP past it) only once userspace
        re-enters KVM_RUN; with ``immediate_exit`` set, KVM completes it and returns EINTR
        at once (Documentation/virt/kvm/api.rst, "immediate_exit"). The vCPU state read
        after this is the exact, resumable state.
        """
        # reference: kvm_cpu_kick, kvm_cpu_exec (accel/kvm/kvm-all.c): a kicked vCPU
        # re-enters KVM_RUN with immediate_exit set, completing its last exit, and returns
        run = self.kvm_run
        run.immediate_exit = 1
        try:
            reason = self.run()
        finally:
            run.immediate_exit = 0
        if reason != KVM_EXIT_INTR:
            raise KvmError(
                f"KVM_RUN with immediate_exit returned {EXIT_REASONS.get(reason, reason)}, expected KVM_EXIT_INTR",
                ioctl="KVM_RUN",
            )

    def io_exit(self) -> IoExit:
        """The KVM_EXIT_IO details of the last exit (the data sits inside ``kvm_run``)."""
        run = self.kvm_run
        io = run.u.io
        length = io.size * io.count
        assert self._run_map is not None
        data = self._run_map[io.data_offset : io.data_offset + length]
        return IoExit(direction=io.direction, size=io.size, port=io.port, count=io.count, data=data)

    def exit_details(self) -> dict[str, Any]:
        """What is known about the last exit, for error messages."""
        run = self.kvm_run
        reason = int(run.exit_reason)
        out: dict[str, Any] = {"exit_reason": EXIT_REASONS.get(reason, str(reason))}
        if reason == KVM_EXIT_FAIL_ENTRY:
            out["hardware_entry_failure_reason"] = int(run.u.fail_entry.hardware_entry_failure_reason)
        elif reason == KVM_EXIT_INTERNAL_ERROR:
            internal = run.u.internal
            out["suberror"] = int(internal.suberror)
            out["data"] = [hex(internal.data[i]) for i in range(min(int(internal.ndata), 16))]
        elif reason == KVM_EXIT_UNKNOWN:
            out["hardware_exit_reason"] = int(run.u.hardware_exit_reason)
        elif reason == KVM_EXIT_EXCEPTION:
            out["exception"] = int(run.u.ex.exception)
            out["error_code"] = int(run.u.ex.error_code)
        elif reason == KVM_EXIT_MMIO:
            out["phys_addr"] = hex(run.u.mmio.phys_addr)
        elif reason == KVM_EXIT_IO:
            out["port"] = hex(run.u.io.port)
        return out

    def set_signal_mask(self, blocked: set[int]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN.

        The thread's own mask holds outside KVM_RUN; a signal blocked there but not here
        interrupts KVM_RUN (EINTR) and stays pending, never delivered (QEMU's SIG_IPI kick).
        """
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)
        buf = ctypes.create_string_buffer(ctypes.sizeof(kvm_signal_mask) + 8)
        kvm_signal_mask.from_buffer(buf).len = 8  # the kernel's sigset_t on x86-64
        ctypes.memmove(ctypes.addressof(buf) + ctypes.sizeof(kvm_signal_mask), bits.to_bytes(8, "little"), 8)
        self._ioctl("KVM_SET_SIGNAL_MASK", KVM_SET_SIGNAL_MASK, buf)

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        self._ioctl("KVM_GET_REGS", KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        self._ioctl("KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        self._ioctl("KVM_GET_SREGS", KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self._ioctl("KVM_SET_SREGS", KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        """The x87 and SSE state: the legacy region of KVM_GET_XSAVE where KVM has XSAVE.

        KVM_GET_FPU reads the guest's FXSAVE image as it lies in the kernel, which holds stale
        values for a component in its init state (an MXCSR of 0, for one); KVM_GET_XSAVE
        writes every component out. QEMU does the same: kvm_get_xsave, kvm_get_fpu only
        without XSAVE (target/i386/kvm/kvm.c).
        """
        if not self._has_xsave:
            fpu = kvm_fpu()
            self._ioctl("KVM_GET_FPU", KVM_GET_FPU, fpu)
            return fpu
        legacy = self.get_xsave().legacy
        return kvm_fpu(
            fpr=legacy.st_space, fcw=legacy.cwd, fsw=legacy.swd, ftwx=legacy.twd, last_opcode=legacy.fop,
            last_ip=legacy.rip, last_dp=legacy.rdp, xmm=legacy.xmm_space, mxcsr=legacy.mxcsr,
        )  # fmt: skip

    def set_fpu(self, fpu: kvm_fpu) -> None:
        """Load the x87 and SSE state: into the legacy region of KVM_SET_XSAVE where KVM has XSAVE.

        KVM_SET_FPU writes the FXSAVE image but leaves XSTATE_BV alone, so the next XRSTOR
        initialises a component whose bit is clear: a restored guest's XMM registers came back
        zero. Here both bits are set; the other components keep what the vCPU holds.
        """
        if not self._has_xsave:
            self._ioctl("KVM_SET_FPU", KVM_SET_FPU, fpu)
            return
        area = self.get_xsave()
        legacy = area.legacy
        legacy.st_space, legacy.cwd, legacy.swd, legacy.twd = fpu.fpr, fpu.fcw, fpu.fsw, fpu.ftwx
        legacy.fop, legacy.rip, legacy.rdp = fpu.last_opcode, fpu.last_ip, fpu.last_dp
        legacy.xmm_space, legacy.mxcsr = fpu.xmm, fpu.mxcsr
        area.xstate_bv |= _XFEATURE_FP_SSE
        self.set_xsave(area)

    def get_xsave(self) -> kvm_xsave:
        area = kvm_xsave()
        self._ioctl("KVM_GET_XSAVE", KVM_GET_XSAVE, area)
        return area

    def set_xsave(self, area: kvm_xsave) -> None:
        self._ioctl("KVM_SET_XSAVE", KVM_SET_XSAVE, area)

    def get_msrs(self, indices: list[int]) -> list[int]:
        """KVM_GET_MSRS of ``indices``, in that order; an MSR KVM cannot read is an error."""
        buf = _msrs_buffer(indices, [0] * len(indices))
        done = self._ioctl("KVM_GET_MSRS", KVM_GET_MSRS, buf)
        if done != len(indices):
            raise KvmError(
                f"KVM_GET_MSRS read {done} of {len(indices)} MSRs: MSR {indices[done]:#x} is not supported",
                ioctl="KVM_GET_MSRS",
            )
        entries = (kvm_msr_entry * len(indices)).from_buffer(buf, ctypes.sizeof(kvm_msrs))
        return [int(e.data) for e in entries]

    def set_msrs(self, indices: list[int], values: list[int]) -> None:
        """KVM_SET_MSRS; an MSR KVM refuses is an error."""
        buf = _msrs_buffer(indices, values)
        done = self._ioctl("KVM_SET_MSRS", KVM_SET_MSRS, buf)
        if done != len(indices):
            raise KvmError(
                f"KVM_SET_MSRS wrote {done} of {len(indices)} MSRs: MSR {indices[done]:#x} was refused",
                ioctl="KVM_SET_MSRS",
            )

    def set_cpuid2(self, entries: ctypes.Array[kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2: the CPUID leaves the guest sees."""
        buf = _cpuid2_buffer(len(entries))
        ctypes.memmove(ctypes.addressof(buf) + ctypes.sizeof(kvm_cpuid2), entries, ctypes.sizeof(entries))
        self._ioctl("KVM_SET_CPUID2", KVM_SET_CPUID2, buf)

    def close(self) -> None:
        self._run = None  # drop the ctypes view first: a mapping with a live export cannot be closed
        if self._run_map is not None:
            run_map, self._run_map = self._run_map, None
            run_map.close()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _close(fd)

    def __enter__(self) -> KvmVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _msrs_buffer(indices: list[int], values: list[int]) -> ctypes.Array[ctypes.c_char]:
    n = len(indices)
    buf = ctypes.create_string_buffer(ctypes.sizeof(kvm_msrs) + n * ctypes.sizeof(kvm_msr_entry))
    kvm_msrs.from_buffer(buf).nmsrs = n
    entries = (kvm_msr_entry * n).from_buffer(buf, ctypes.sizeof(kvm_msrs))
    for entry, index, value in zip(entries, indices, values):
        entry.index = index
        entry.data = value
    del entries
    return buf


def kvm_available(path: str = _DEVICE) -> str | None:
    """None when KVM can run a guest here; otherwise why not (for skip messages and errors)."""
    try:
        with Kvm(path) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0):
            pass
    except KvmError as exc:
        return str(exc)
    return None

"""A micro-VM on /dev/kvm: one vCPU in long mode running a small guest that writes its RAM.

It exists so that a *live* save can be shown and tested end to end: pages are saved while
the guest keeps writing them, KVM's dirty log says which pages changed, the saved RAM and
vCPU are restored into a fresh VM (:meth:`MicroVM.from_state`), and the guest resumes
exactly where it was. Everything the guest writes can be recomputed (vectorised, in numpy)
from its parameters and its iteration counter, so a restored guest is proved exact by
:func:`expected_ram_check` and :func:`check_guest`.

Guest-physical layout (one memory slot at 0, ``mem_mib`` MiB, dirty logging on)::

    0x0000  page 0, unused          0x4000  the program (guest/workload.S), up to 16 KiB
    0x1000  GDT                     0x8000  PML4, 0x9000 PDPT, 0xa000.. page directories
    0x2000  params (VMM -> guest)   0x20000 (page 32) on: the data region, to the end of RAM
    0x3000  status (guest -> VMM)

All of RAM is identity-mapped with 2 MiB pages; the page-table entries and GDT descriptors
have their accessed (and dirty) bits preset, so the CPU never writes them and they never
show in the dirty log. The guest runs in 64-bit user mode, CPL 3 with IOPL 3 (so its OUTs
are allowed), with interrupts off (rflags.IF = 0) and no IDT or stack: it never changes
privilege. User mode is deliberate: KVM's PVM (a software hypervisor, nested on this
project's development machines) runs guest user code natively but ring-0 code about 300
times slower (measured: 0.13 M against 40 M loop iterations per second); on VMX or SVM the
mode changes nothing.

What the guest does (see guest/workload.S):

1. Fill: data page ``p`` (guest-physical page number) of the first ``fill_pages`` =
   ``int(fill_fraction * data_pages)`` gets ``FILL_TAG ^ p`` in every qword; the rest of
   the data region stays zero. It reports progress every ``FILL_REPORT`` pages
   (``PORT_FILL``) and the end (``PORT_FILLED``).
2. Redirty loop, ``i = 0, 1, 2, ...``: ``z = splitmix64(seed + i)``; page
   ``p = data_first + ((z * data_pages) >> 64)`` (multiply-high: uniform over any number of
   pages); qword 0 of ``p`` = ``i``, qword 1 = ``z``; ``checksum += z`` (mod 2**64).
   Register r8 holds ``i``, r9 the checksum. Every ``batch`` iterations both go to the
   status page and an OUT to ``PORT_BATCH`` gives the VMM an exit: the pause points and
   the rate limiter's ticks.

``splitmix64(x)`` is SplitMix64's output function applied to ``x + 0x9e3779b97f4a7c15``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.engine.kvm import (
    GuestMemory,
    IoExit,
    Kvm,
    KvmVcpu,
    anonymous_memory,
    kvm_available,
    kvm_fpu,
    kvm_regs,
    kvm_segment,
)
from mappedram.engine.vcpu_thread import VcpuThread
from mappedram.errors import FormatError, KvmError, UsageError
from mappedram.format.cpustate import (
    CONTROL_REGISTERS,
    CPUSTATE_MSRS,
    GENERAL_REGISTERS,
    SEGMENT_REGISTERS,
    CpuState,
    DescriptorTable,
    FpuState,
    Segment,
)
from mappedram.guest.workload import LABELS, WORKLOAD

__all__ = [
    "MicroVM",
    "GuestStatus",
    "GuestParams",
    "RamCheckReport",
    "GuestCheckReport",
    "kvm_available",
    "splitmix64",
    "guest_values",
    "guest_pages",
    "pages_written",
    "expected_checksum",
    "expected_ram_check",
    "check_guest",
    "check_params",
    "read_params",
    "PAGE_SIZE",
    "DATA_FIRST",
    "STATUS_PAGE",
    "PARAMS_ADDR",
    "STATUS_ADDR",
    "CODE_ADDR",
    "FILL_TAG",
]

PAGE_SIZE = 4096

# Guest-physical layout; the same numbers are .equ constants in guest/workload.S.
GDT_ADDR = 0x1000
PARAMS_ADDR = 0x2000
STATUS_ADDR = 0x3000
CODE_ADDR = 0x4000
CODE_MAX = 0x4000
PML4_ADDR = 0x8000
PDPT_ADDR = 0x9000
PD_ADDR = 0xA000
PD_PAGES_MAX = 16  # page directories: 16 x 1 GiB
DATA_FIRST = 32  # the first page of the data region
STATUS_PAGE = STATUS_ADDR // PAGE_SIZE
MAX_MEM_MIB = PD_PAGES_MAX * 1024

# The params page: little-endian qwords at these offsets.
P_MAGIC, P_VERSION, P_SEED, P_DATA_FIRST, P_DATA_PAGES = 0x00, 0x08, 0x10, 0x18, 0x20
P_FILL_PAGES, P_BATCH, P_FILL_TAG, P_FILL_REPORT = 0x28, 0x30, 0x38, 0x40
PARAMS_MAGIC = int.from_bytes(b"MRVMPARM", "little")
PARAMS_VERSION = 1

# The status page, written by the guest.
S_COUNTER, S_CHECKSUM, S_FILL_DONE, S_PHASE = 0x00, 0x08, 0x10, 0x18
PHASE_FILL, PHASE_LOOP = 1, 2

PORT_BATCH, PORT_FILL, PORT_FILLED = 0xF0, 0xF1, 0xF2

FILL_TAG = 0x46494C4C00000000  # "FILL" in the high half; the page number in the low half
FILL_REPORT = 4096  # pages between two fill progress exits
MAX_BATCH = 1 << 24

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

#: The constants guest/workload.S defines, by their names there.
ASM_CONSTANTS = {
    "PARAMS": PARAMS_ADDR, "STATUS": STATUS_ADDR, "CODE": CODE_ADDR,
    "P_SEED": P_SEED, "P_DATA_FIRST": P_DATA_FIRST, "P_DATA_PAGES": P_DATA_PAGES,
    "P_FILL_PAGES": P_FILL_PAGES, "P_BATCH": P_BATCH, "P_FILL_TAG": P_FILL_TAG, "P_FILL_REPORT": P_FILL_REPORT,
    "S_COUNTER": S_COUNTER, "S_CHECKSUM": S_CHECKSUM, "S_FILL_DONE": S_FILL_DONE, "S_PHASE": S_PHASE,
    "PHASE_FILL": PHASE_FILL, "PHASE_LOOP": PHASE_LOOP,
    "PORT_BATCH": PORT_BATCH, "PORT_FILL": PORT_FILL, "PORT_FILLED": PORT_FILLED,
    "GAMMA": GAMMA, "MIX1": MIX1, "MIX2": MIX2,
}  # fmt: skip

# x86 control bits used to enter long mode directly.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
GDT_CODE64 = 0x00AFFB000000FFFF  # present, DPL 3, execute/read, accessed, L=1, G=1
GDT_DATA = 0x00CFF3000000FFFF  # present, DPL 3, read/write, accessed, D/B=1, G=1
SEL_CODE, SEL_DATA = 0x08 | 3, 0x10 | 3  # GDT entries 1 and 2, RPL 3
RFLAGS_FIXED, RFLAGS_IOPL3 = 1 << 1, 3 << 12

_ITER_CHUNK = 1 << 16  # iterations recomputed at a time (small enough for the arrays to stay in cache)
_PAGE_CHUNK = 4096  # pages compared at a time (16 MiB)

U64 = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------------------------------
# What the guest computes, recomputed in numpy


def splitmix64(x: U64) -> U64:
    """The guest's hash, elementwise: SplitMix64's output function of ``x + 0x9e3779b97f4a7c15``."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        return z ^ (z >> np.uint64(31))


def _mulhi(z: U64, n: int) -> U64:
    """``(z * n) >> 64`` for ``n < 2**32``, exactly, in 64-bit lanes."""
    nn = np.uint64(n)
    lo = (z & np.uint64(0xFFFFFFFF)) * nn >> np.uint64(32)
    return ((z >> np.uint64(32)) * nn + lo) >> np.uint64(32)


def guest_values(seed: int, start: int, stop: int) -> U64:
    """``z`` of iterations ``start .. stop - 1``."""
    with np.errstate(over="ignore"):
        i = np.arange(start, stop, dtype=np.uint64)
        return splitmix64(i + np.uint64(seed & (2**64 - 1)))


@dataclass(frozen=True, slots=True)
class GuestParams:
    """The params page: what the guest was told (read back from a VM's memory)."""

    seed: int
    data_first: int
    data_pages: int
    fill_pages: int
    batch: int
    fill_tag: int
    fill_report: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_params(memory: Any) -> GuestParams:
    """The params page of a micro-VM's RAM (a live VM's, or a restored copy)."""
    words = _qwords(memory, PARAMS_ADDR, PAGE_SIZE // 8)
    if int(words[P_MAGIC // 8]) != PARAMS_MAGIC or int(words[P_VERSION // 8]) != PARAMS_VERSION:
        raise FormatError(
            "this memory holds no micro-VM params page",
            offset=PARAMS_ADDR,
            field="params.magic",
            expected=f"{PARAMS_MAGIC:#x} version {PARAMS_VERSION}",
            actual=f"{int(words[0]):#x} version {int(words[1])}",
        )
    return GuestParams(
        seed=int(words[P_SEED // 8]),
        data_first=int(words[P_DATA_FIRST // 8]),
        data_pages=int(words[P_DATA_PAGES // 8]),
        fill_pages=int(words[P_FILL_PAGES // 8]),
        batch=int(words[P_BATCH // 8]),
        fill_tag=int(words[P_FILL_TAG // 8]),
        fill_report=int(words[P_FILL_REPORT // 8]),
    )


def guest_pages(params: GuestParams, start: int, stop: int) -> npt.NDArray[np.int64]:
    """The page (guest-physical page number) iterations ``start .. stop - 1`` write."""
    z = guest_values(params.seed, start, stop)
    return _mulhi(z, params.data_pages).astype(np.int64) + params.data_first


def pages_written(memory: Any, start: int, stop: int) -> npt.NDArray[np.bool_]:
    """One bool per page of ``memory``: written by loop iterations ``start .. stop - 1``.

    The status page, which the guest also writes at every batch boundary, is not included.
    """
    params = read_params(memory)
    out = np.zeros(len(memoryview(memory).cast("B")) // PAGE_SIZE, dtype=bool)
    for first in range(start, stop, _ITER_CHUNK):
        out[guest_pages(params, first, min(stop, first + _ITER_CHUNK))] = True
    return out


def expected_checksum(seed: int, counter: int) -> int:
    """The guest's checksum after ``counter`` iterations: the sum of their ``z``, mod 2**64."""
    total = np.uint64(0)
    for first in range(0, counter, _ITER_CHUNK):
        with np.errstate(over="ignore"):
            total = total + guest_values(seed, first, min(counter, first + _ITER_CHUNK)).sum(dtype=np.uint64)
    return int(total)


@dataclass(frozen=True, slots=True)
class RamCheckReport:
    """What :func:`expected_ram_check` found: every data page compared with its recomputation."""

    counter: int
    data_first: int
    data_pages: int
    fill_pages: int
    fill_done: int
    pages_checked: int
    pages_hit: int
    mismatches: int
    first_bad_page: int | None
    first_bad: dict[str, Any] | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.pages_checked == self.data_pages

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def expected_ram_check(memory: Any, counter: int) -> RamCheckReport:
    """Check every data page of a micro-VM's RAM against the guest's program after ``counter`` iterations.

    ``memory`` is the guest RAM (a live VM's ``memory`` while it is paused, or a restored
    copy); ``counter`` the iterations done (register r8 of the paused vCPU). The params
    and the fill progress are read from the params and status pages. Page ``p`` must hold,
    in every qword, ``FILL_TAG ^ p`` if the fill reached it and 0 otherwise, except that
    qwords 0 and 1 of a page the loop wrote hold ``(i, z_i)`` of the last iteration ``i``
    that wrote it. The last writer of each page is recomputed in chunks of iterations.
    """
    started = time.perf_counter()
    params = read_params(memory)
    status = _qwords(memory, STATUS_ADDR, 4)
    fill_done = int(status[S_FILL_DONE // 8])
    if counter and fill_done != params.fill_pages:
        raise UsageError(
            f"the loop ran {counter} iterations, yet the fill covers {fill_done} of {params.fill_pages} pages"
        )
    return _check_ram(memory, params, fill_done, counter, _replay(params, counter)[0], started)


def _replay(params: GuestParams, counter: int) -> tuple[npt.NDArray[np.int64], int]:
    """One pass over iterations ``0 .. counter - 1``: the last iteration that wrote each data
    page (-1: none), and the checksum."""
    last = np.full(params.data_pages, -1, dtype=np.int64)
    checksum = np.uint64(0)
    nn = np.uint64(params.data_pages)
    for first in range(0, counter, _ITER_CHUNK):
        stop = min(counter, first + _ITER_CHUNK)
        z = guest_values(params.seed, first, stop)
        with np.errstate(over="ignore"):
            checksum = checksum + z.sum(dtype=np.uint64)
        # maximum.at resolves pages written more than once by value: the last iteration wins
        np.maximum.at(last, _mulhi(z, int(nn)).astype(np.int64), np.arange(first, stop, dtype=np.int64))
    return last, int(checksum)


def _check_ram(
    memory: Any, params: GuestParams, fill_done: int, counter: int, last: npt.NDArray[np.int64], started: float
) -> RamCheckReport:
    words = _qwords(memory, 0, None)
    pages = words.reshape(-1, PAGE_SIZE // 8)
    if pages.shape[0] < params.data_first + params.data_pages:
        needed = params.data_first + params.data_pages
        raise UsageError(f"memory of {pages.shape[0]} pages is smaller than the guest's {needed}")
    mismatches, first_bad_page, first_bad = 0, None, None
    for lo in range(0, params.data_pages, _PAGE_CHUNK):
        hi = min(params.data_pages, lo + _PAGE_CHUNK)
        page_no = np.arange(params.data_first + lo, params.data_first + hi, dtype=np.uint64)
        filled = page_no < np.uint64(params.data_first + fill_done)
        fill = np.where(filled, np.uint64(params.fill_tag) ^ page_no, np.uint64(0))
        hit_i = last[lo:hi]
        hit = hit_i >= 0
        q0 = fill.copy()
        q1 = fill.copy()
        q0[hit] = hit_i[hit].astype(np.uint64)
        q1[hit] = splitmix64(hit_i[hit].astype(np.uint64) + np.uint64(params.seed))
        block = pages[params.data_first + lo : params.data_first + hi]
        bad = (block[:, 0] != q0) | (block[:, 1] != q1) | (block[:, 2:] != fill[:, None]).any(axis=1)
        count = int(bad.sum())
        if count and first_bad_page is None:
            k = int(np.flatnonzero(bad)[0])
            first_bad_page = params.data_first + lo + k
            first_bad = {
                "page": first_bad_page,
                "expected_qword0": int(q0[k]),
                "found_qword0": int(block[k, 0]),
                "expected_qword1": int(q1[k]),
                "found_qword1": int(block[k, 1]),
                "expected_fill": int(fill[k]),
                "qwords_not_fill": int((block[k, 2:] != fill[k]).sum()),
                "last_iteration": int(hit_i[k]),
            }
        mismatches += count
    return RamCheckReport(
        counter=counter,
        data_first=params.data_first,
        data_pages=params.data_pages,
        fill_pages=params.fill_pages,
        fill_done=fill_done,
        pages_checked=params.data_pages,
        pages_hit=int((last >= 0).sum()),
        mismatches=mismatches,
        first_bad_page=first_bad_page,
        first_bad=first_bad,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True, slots=True)
class GuestCheckReport:
    """A paused guest's registers and RAM against the recomputation (:func:`check_guest`)."""

    counter: int
    status_counter: int
    checksum: int
    expected_checksum: int
    registers: dict[str, bool]
    ram: RamCheckReport

    @property
    def ok(self) -> bool:
        return (
            self.counter == self.status_counter
            and self.checksum == self.expected_checksum
            and all(self.registers.values())
            and self.ram.ok
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "counter": self.counter,
            "status_counter": self.status_counter,
            "checksum": self.checksum,
            "expected_checksum": self.expected_checksum,
            "registers": dict(self.registers),
            "ram": self.ram.to_dict(),
            "ok": self.ok,
        }


def check_guest(memory: Any, cpu: CpuState) -> GuestCheckReport:
    """Check a guest paused at ``cpu`` (:meth:`MicroVM.pause`): registers, status page and RAM.

    At every pause point the counter register (r8) equals the status page's counter, the
    checksum register (r9) the recomputed sum, the loop's constant registers their params,
    and the RAM what :func:`expected_ram_check` expects.
    """
    params = read_params(memory)
    status = _qwords(memory, STATUS_ADDR, 4)
    phase = int(status[S_PHASE // 8])
    registers = {
        "r10 = seed": cpu.r10 == params.seed,
        "r11 = data_pages": cpu.r11 == params.data_pages,
        "r12 = data region": cpu.r12 == params.data_first * PAGE_SIZE,
        "r14 = batch": cpu.r14 == params.batch,
        "rip in the program": CODE_ADDR <= cpu.rip < CODE_ADDR + len(WORKLOAD),
        "interrupts off": not cpu.rflags & (1 << 9),
        "long mode": bool(cpu.efer & EFER_LMA) and cpu.cs.l == 1,
    }
    started = time.perf_counter()
    counter = cpu.r8
    status_counter = int(status[S_COUNTER // 8]) if phase == PHASE_LOOP else 0
    fill_done = int(status[S_FILL_DONE // 8])
    if counter and fill_done != params.fill_pages:
        raise UsageError(f"r8 says {counter} loop iterations ran, yet the fill covers {fill_done} pages")
    last, checksum = _replay(params, counter)
    return GuestCheckReport(
        counter=counter,
        status_counter=status_counter,
        checksum=cpu.r9,
        expected_checksum=checksum,
        registers=registers,
        ram=_check_ram(memory, params, fill_done, counter, last, started),
    )


def _qwords(memory: Any, offset: int, count: int | None) -> U64:
    raw = np.frombuffer(memory, dtype=np.uint8)
    if count is None:
        return raw[offset : offset + (len(raw) - offset) // 8 * 8].view(np.uint64)
    return raw[offset : offset + 8 * count].view(np.uint64)


# ---------------------------------------------------------------------------------------------
# vCPU state <-> CpuState


def _segment(seg: kvm_segment) -> Segment:
    return Segment(
        base=seg.base, limit=seg.limit, selector=seg.selector, type=seg.type, present=seg.present, dpl=seg.dpl,
        db=seg.db, s=seg.s, l=seg.l, g=seg.g, avl=seg.avl, unusable=seg.unusable,
    )  # fmt: skip


def _put_segment(dst: kvm_segment, seg: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        setattr(dst, name, getattr(seg, name))


def capture_cpu(vcpu: KvmVcpu) -> CpuState:
    """The exact state of a stopped vCPU (KVM_GET_REGS, _SREGS, _FPU, _MSRS)."""
    # reference: kvm_arch_get_registers (target/i386/kvm/kvm.c)
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    msrs = vcpu.get_msrs([index for _, index in CPUSTATE_MSRS])
    return CpuState.from_parts(
        registers={name: getattr(regs, name) for name in GENERAL_REGISTERS},
        segments={name: _segment(getattr(sregs, name)) for name in SEGMENT_REGISTERS},
        gdt=DescriptorTable(base=sregs.gdt.base, limit=sregs.gdt.limit),
        idt=DescriptorTable(base=sregs.idt.base, limit=sregs.idt.limit),
        control={name: getattr(sregs, name) for name in CONTROL_REGISTERS},
        interrupt_bitmap=tuple(sregs.interrupt_bitmap),
        fpu=FpuState(
            fpr=bytes(fpu.fpr), fcw=fpu.fcw, fsw=fpu.fsw, ftwx=fpu.ftwx, last_opcode=fpu.last_opcode,
            last_ip=fpu.last_ip, last_dp=fpu.last_dp, xmm=bytes(fpu.xmm), mxcsr=fpu.mxcsr,
        ),
        msrs=tuple(msrs),
    )  # fmt: skip


def apply_cpu(vcpu: KvmVcpu, cpu: CpuState) -> None:
    """Load ``cpu`` into a vCPU that is not running."""
    # reference: kvm_arch_put_registers (target/i386/kvm/kvm.c): regs, FPU, sregs, MSRs
    regs = kvm_regs(**{name: getattr(cpu, name) for name in GENERAL_REGISTERS})
    vcpu.set_regs(regs)
    fpu = kvm_fpu()
    _fill_fpu(fpu, cpu.fpu)
    vcpu.set_fpu(fpu)
    sregs = vcpu.get_sregs()
    for name in SEGMENT_REGISTERS:
        _put_segment(getattr(sregs, name), getattr(cpu, name))
    sregs.gdt.base, sregs.gdt.limit = cpu.gdt.base, cpu.gdt.limit
    sregs.idt.base, sregs.idt.limit = cpu.idt.base, cpu.idt.limit
    for name in CONTROL_REGISTERS:
        setattr(sregs, name, getattr(cpu, name))
    for i, word in enumerate(cpu.interrupt_bitmap):
        sregs.interrupt_bitmap[i] = word
    vcpu.set_sregs(sregs)
    vcpu.set_msrs([index for _, index in CPUSTATE_MSRS], list(cpu.msrs))


def _fill_fpu(fpu: kvm_fpu, state: FpuState) -> None:
    if len(state.fpr) != 128 or len(state.xmm) != 256:
        raise ValueError("fpr needs 128 bytes and xmm 256")
    memoryview(fpu.fpr).cast("B")[:] = state.fpr
    memoryview(fpu.xmm).cast("B")[:] = state.xmm
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode = state.fcw, state.fsw, state.ftwx, state.last_opcode
    fpu.last_ip, fpu.last_dp, fpu.mxcsr = state.last_ip, state.last_dp, state.mxcsr


# ---------------------------------------------------------------------------------------------
# The VM


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """The guest as the VMM sees it (from the status page and the vCPU thread)."""

    counter: int  # iterations done, as of the last batch report
    checksum: int  # the checksum at that report
    phase: str  # "not started", "fill" or "loop"
    fill_done: int  # data pages filled so far
    fill_pages: int
    iterations_per_second: float  # measured over the last half second or so of running
    state: str  # the vCPU thread: new, running, paused, stopped, failed
    io_exits: int
    running: bool
    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_params(mem_mib: int, *, fill_fraction: float, batch: int, rate: float | None) -> None:
    """Raise UsageError unless the guest's parameters are in range (MicroVM's and SoftVM's)."""
    if not 1 <= mem_mib <= MAX_MEM_MIB:
        raise UsageError(f"mem_mib must be 1 .. {MAX_MEM_MIB}, got {mem_mib}")
    if not 0.0 <= fill_fraction <= 1.0:
        raise UsageError(f"fill_fraction must be within 0 .. 1, got {fill_fraction}")
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"batch must be 1 .. {MAX_BATCH}, got {batch}")
    if rate is not None and not rate > 0:
        raise UsageError(f"rate must be positive (or None), got {rate}")


class MicroVM:
    """A KVM guest of ``mem_mib`` MiB running the workload; see the module docstring.

    Args:
        mem_mib: guest RAM (1 .. 16384 MiB).
        seed: the loop's seed.
        fill_fraction: share of the data region the fill writes (the rest stays zero).
        rate: target loop iterations (page writes) per second; None runs as fast as it can.
            The limiter acts at batch exits, so keep ``batch`` well under ``rate``.
        batch: loop iterations between two exits (pause points, status updates).
        dirty_log: enable KVM's dirty log on the RAM slot (:meth:`dirty_pages`).
    """

    page_size = PAGE_SIZE
    ram_idstr = "pc.ram"

    def __init__(
        self,
        mem_mib: int = 1024,
        *,
        seed: int = 1,
        fill_fraction: float = 0.5,
        rate: float | None = None,
        batch: int = 4096,
        dirty_log: bool = True,
    ) -> None:
        check_params(mem_mib, fill_fraction=fill_fraction, batch=batch, rate=rate)
        self.mem_mib = mem_mib
        self.seed = seed & (2**64 - 1)
        self.fill_fraction = fill_fraction
        self.rate = rate
        self.batch = batch
        self.dirty_log = dirty_log
        self.size = mem_mib << 20
        self.pages = self.size // PAGE_SIZE
        self.data_first = DATA_FIRST
        self.data_pages = self.pages - DATA_FIRST
        self.fill_pages = int(fill_fraction * self.data_pages)
        self._restored = False
        self._closed = False
        self._pace_ref: tuple[float, int] | None = None
        self._window: tuple[float, int] = (time.monotonic(), 0)
        self._measured = 0.0
        self._kvm = Kvm()
        try:
            self._vm = self._kvm.create_vm()
            self.memory: GuestMemory = anonymous_memory(self.size)
            self._vm.add_memslot(0, 0, self.memory, log_dirty=dirty_log)
            self._vcpu = self._vm.create_vcpu(0)
            self._vcpu.set_cpuid2(self._kvm.supported_cpuid())
            self._status: U64 | None = _qwords(self.memory, STATUS_ADDR, 4)
            self._runner = VcpuThread(self._vcpu, self._on_io, name="microvm-vcpu0")
        except BaseException:
            self._close_fds()
            raise

    # -- lifecycle

    def start(self) -> None:
        """Write the program, page tables, GDT and params into RAM, set up the vCPU, and run it."""
        if self._restored:
            raise UsageError("a VM made by from_state() continues with resume(), not start()")
        if self._runner.state != "new":
            raise UsageError(f"the VM was already started (vCPU {self._runner.state})")
        self._load_program()
        self._reset_meters()
        self._runner.start()

    def wait_filled(self, timeout: float) -> None:
        """Return once the fill phase is over (the guest is in its redirty loop)."""
        if not self._runner.wait_for(lambda: self._phase() == PHASE_LOOP, timeout):
            raise KvmError(f"the guest did not finish its fill within {timeout} s")

    def pause(self, timeout: float = 10.0) -> CpuState:
        """Stop the guest at its next I/O exit, the OUT completed, and return the exact vCPU state."""
        self._runner.pause(timeout)
        return capture_cpu(self._vcpu)

    def resume(self) -> None:
        """Continue a paused guest, or start a VM made by :meth:`from_state`."""
        self._reset_meters()
        if self._runner.state == "new":
            if not self._restored:
                raise UsageError("start() the VM first")
            self._runner.start()
        else:
            self._runner.resume()

    @classmethod
    def from_state(cls, cpu: CpuState, mem_mib: int, **params: Any) -> MicroVM:
        """A fresh VM (new KVM VM, new zero-filled RAM) whose vCPU is ``cpu``.

        The caller fills :attr:`memory` (the restore: program, page tables, params and data
        all come with the RAM) and calls :meth:`resume`; the guest continues where it was
        paused. ``params`` are the constructor's (``rate`` and ``dirty_log`` matter here:
        the guest's own parameters are in its RAM).
        """
        vm = cls(mem_mib, **params)
        try:
            apply_cpu(vm._vcpu, cpu)
        except BaseException:
            vm.close()
            raise
        vm._restored = True
        return vm

    def close(self) -> None:
        """Stop the vCPU thread, close the vCPU, VM and /dev/kvm, and unmap the RAM.

        If numpy arrays or memoryviews over :attr:`memory` are still alive, the mapping
        stays until they are gone (everything else is closed).
        """
        if self._closed:
            return
        self._closed = True
        self._runner.stop()  # if the thread cannot be stopped this raises and keeps everything mapped
        self._close_fds()

    def _close_fds(self) -> None:
        self._status = None
        for name in ("_vcpu", "_vm", "_kvm"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        memory = getattr(self, "memory", None)
        if memory is not None:
            try:
                memory.close()
            except BufferError:
                pass  # views of it are alive; the mapping goes with the last of them

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation

    def set_dirty_log(self, enabled: bool) -> None:
        """Turn KVM's dirty log of the RAM on or off, also while the guest runs.

        A VM made with ``dirty_log=False`` fills its RAM much faster (KVM can map the guest's
        first touches with large pages); a live save turns the log on when it starts, as
        QEMU does at the start of a migration. The log starts empty.
        """
        self._vm.set_dirty_log(0, enabled)
        self.dirty_log = enabled

    def dirty_pages(self) -> npt.NDArray[np.bool_]:
        """One bool per 4 KiB page: written by the guest since the last call (KVM_GET_DIRTY_LOG; clears it)."""
        if not self.dirty_log:
            raise UsageError("the dirty log is off (dirty_log=False; see set_dirty_log)")
        words = self._vm.get_dirty_log(0)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.pages]
        return bits.astype(bool)

    def status(self) -> GuestStatus:
        status = self._status_words()
        phase = int(status[S_PHASE // 8])
        state = self._runner.state
        counter = int(status[S_COUNTER // 8]) if phase == PHASE_LOOP else 0
        rate = self._measured
        if state == "running":
            t0, c0 = self._window
            elapsed = time.monotonic() - t0
            if rate == 0.0 and elapsed > 0:
                rate = (counter - c0) / elapsed
        return GuestStatus(
            counter=counter,
            checksum=int(status[S_CHECKSUM // 8]) if phase == PHASE_LOOP else 0,
            phase={PHASE_FILL: "fill", PHASE_LOOP: "loop"}.get(phase, "not started"),
            fill_done=int(status[S_FILL_DONE // 8]),
            fill_pages=self.fill_pages,
            iterations_per_second=rate,
            state=state,
            io_exits=self._runner.io_exits,
            running=state == "running",
            paused=state == "paused",
        )

    def check(self, cpu: CpuState) -> GuestCheckReport:
        """:func:`check_guest` on this VM's RAM (pause it first)."""
        return check_guest(self.memory, cpu)

    expected_ram_check = staticmethod(expected_ram_check)

    # -- internals

    def _status_words(self) -> U64:
        if self._status is None:
            raise UsageError("the VM is closed")
        return self._status

    def _phase(self) -> int:
        return int(self._status_words()[S_PHASE // 8])

    def _reset_meters(self) -> None:
        status = self._status_words()
        counter = int(status[S_COUNTER // 8]) if int(status[S_PHASE // 8]) == PHASE_LOOP else 0
        self._pace_ref = None
        self._window = (time.monotonic(), counter)
        self._measured = 0.0

    def _on_io(self, io: IoExit) -> float:
        """Called by the vCPU thread at every I/O exit: returns how long to wait before re-entry."""
        now = time.monotonic()
        if io.port == PORT_BATCH:
            counter = int(self._status_words()[S_COUNTER // 8])
            t0, c0 = self._window
            if now - t0 >= 0.5:
                self._measured = (counter - c0) / (now - t0)
                self._window = (now, counter)
            if self.rate is None:
                return 0.0
            if self._pace_ref is None:
                self._pace_ref = (now, counter)
                return 0.0
            ref_time, ref_counter = self._pace_ref
            return max(0.0, ref_time + (counter - ref_counter) / self.rate - now)
        if io.port == PORT_FILLED:
            self._window = (now, 0)
            self._pace_ref = (now, 0)
            return 0.0
        if io.port == PORT_FILL:
            return 0.0
        raise KvmError(f"the guest wrote to I/O port {io.port:#x}, which the program never uses", ioctl="KVM_RUN")

    def _load_program(self) -> None:
        memory = self.memory
        if len(WORKLOAD) > CODE_MAX:
            raise KvmError("the guest program does not fit its pages")
        memory[CODE_ADDR : CODE_ADDR + len(WORKLOAD)] = WORKLOAD
        words = _qwords(memory, 0, DATA_FIRST * PAGE_SIZE // 8)
        try:
            words[GDT_ADDR // 8 : GDT_ADDR // 8 + 3] = [0, GDT_CODE64, GDT_DATA]
            params = words[PARAMS_ADDR // 8 :]
            params[P_MAGIC // 8] = PARAMS_MAGIC
            params[P_VERSION // 8] = PARAMS_VERSION
            params[P_SEED // 8] = self.seed
            params[P_DATA_FIRST // 8] = self.data_first
            params[P_DATA_PAGES // 8] = self.data_pages
            params[P_FILL_PAGES // 8] = self.fill_pages
            params[P_BATCH // 8] = self.batch
            params[P_FILL_TAG // 8] = FILL_TAG
            params[P_FILL_REPORT // 8] = FILL_REPORT
            # Identity map with 2 MiB user pages, accessed/dirty preset (the CPU never writes them).
            large_pages = -(-self.size // (2 << 20))
            directories = -(-large_pages // 512)
            words[PML4_ADDR // 8] = PDPT_ADDR | PTE_P | PTE_RW | PTE_US | PTE_A
            words[PDPT_ADDR // 8 : PDPT_ADDR // 8 + directories] = (
                np.uint64(PD_ADDR) + np.arange(directories, dtype=np.uint64) * np.uint64(PAGE_SIZE)
            ) | np.uint64(PTE_P | PTE_RW | PTE_US | PTE_A)
            words[PD_ADDR // 8 : PD_ADDR // 8 + large_pages] = (
                np.arange(large_pages, dtype=np.uint64) << np.uint64(21)
            ) | np.uint64(PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS)
        finally:
            del words
        vcpu = self._vcpu
        sregs = vcpu.get_sregs()
        _set_segment(sregs.cs, SEL_CODE, type_=0xB, long=1, db=0)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _set_segment(getattr(sregs, name), SEL_DATA, type_=0x3, long=0, db=1)
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 3 * 8 - 1
        sregs.cr3 = PML4_ADDR
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        vcpu.set_sregs(sregs)
        vcpu.set_regs(kvm_regs(rip=CODE_ADDR + LABELS["_start"], rflags=RFLAGS_FIXED | RFLAGS_IOPL3))


def _set_segment(seg: kvm_segment, selector: int, *, type_: int, long: int, db: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 3, db, 1, long, 1, 0, 0

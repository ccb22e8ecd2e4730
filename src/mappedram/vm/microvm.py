"""A micro-VM on /dev/kvm: one vCPU in long mode running the built-in guest's workload.

It exists so that a *live* save can be shown and tested end to end: pages are saved while
the guest keeps writing them, KVM's dirty log says which pages changed, the saved RAM and
vCPU are restored into a fresh VM (:meth:`MicroVM.from_state`), and the guest resumes
exactly where it was. The layout, the workload and its oracle are :mod:`.guest`'s.

All of RAM is identity-mapped with 2 MiB pages; the page-table entries and GDT descriptors
have their accessed (and dirty) bits preset, so the CPU never writes them and they never
show in the dirty log. The guest runs in 64-bit user mode, CPL 3 with IOPL 3 (so its OUTs
are allowed), with interrupts off (rflags.IF = 0) and no IDT or stack: it never changes
privilege. User mode is deliberate: KVM's PVM (a software hypervisor, nested on this
project's development machines) runs guest user code natively but ring-0 code about 300
times slower (measured: 0.13 M against 40 M loop iterations per second); on VMX or SVM the
mode changes nothing. Register r8 holds the loop counter ``i``, r9 the checksum.

The VMM acts at the guest's I/O exits (:class:`~.vcpu_thread.VcpuThread`): there it
paces the guest (``rate``), throttles it (auto-converge: it sleeps ``pct / (100 - pct)``
of the time the guest ran since it last entered it) and stops it where asked
(:meth:`MicroVM.run_until`: a batch boundary). :meth:`MicroVM.pause` does not wait for the
batch: it kicks the vCPU out of KVM_RUN, as QEMU stops a vCPU, and the guest stays where
it was, mid-iteration if so; :func:`check_guest` reads from ``rip`` how far that iteration
got (workload.S stores once per iteration), so the state is checked there exactly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.errors import FormatError, KvmError, UsageError
from mappedram.ops.converge import throttle_sleep
from mappedram.ops.trackers import CallbackTracker

from .cpustate import (
    CONTROL_REGISTERS,
    CPUSTATE_MSRS,
    GENERAL_REGISTERS,
    SEGMENT_REGISTERS,
    CpuState,
    DescriptorTable,
    FpuState,
    Segment,
)
from .guest import (
    CODE_ADDR,
    CODE_MAX,
    DATA_FIRST,
    GDT_ADDR,
    PAGE_SIZE,
    PD_ADDR,
    PDPT_ADDR,
    PHASE_FILL,
    PHASE_LOOP,
    PML4_ADDR,
    PORT_BATCH,
    PORT_FILL,
    PORT_FILLED,
    S_CHECKSUM,
    S_COUNTER,
    S_FILL_DONE,
    S_PHASE,
    STATUS_ADDR,
    U64,
    GuestCheckReport,
    GuestCpu,
    GuestStatus,
    check_params,
    check_ram,
    guest_values,
    make_params,
    qwords,
    read_params,
    replay,
    write_params,
)
from .kvm import GuestMemory, IoExit, Kvm, KvmVcpu, anonymous_memory, kvm_fpu, kvm_regs, kvm_segment
from .vcpu_thread import VcpuThread
from .workload import LABELS, WORKLOAD

__all__ = ["MicroVM", "check_guest", "capture_cpu", "apply_cpu"]

# x86 control bits used to enter long mode directly.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
GDT_CODE64 = 0x00AFFB000000FFFF  # present, DPL 3, execute/read, accessed, L=1, G=1
GDT_DATA = 0x00CFF3000000FFFF  # present, DPL 3, read/write, accessed, D/B=1, G=1
SEL_CODE, SEL_DATA = 0x08 | 3, 0x10 | 3  # GDT entries 1 and 2, RPL 3
RFLAGS_FIXED, RFLAGS_IOPL3 = 1 << 1, 3 << 12


_ITERATION, _BATCH_END, _BATCH_NEXT = (CODE_ADDR + LABELS[k] for k in ("iteration", "batch_end", "batch_next"))
_STORED, _SUMMED, _COUNTED = (CODE_ADDR + LABELS[k] for k in ("stored", "summed", "counted"))


def _at_checkable(rip: int) -> bool:
    """The loop, but the status page's stores (workload.S: ``batch_end`` up to its OUT)."""
    return _ITERATION <= rip <= _BATCH_END or rip == _BATCH_NEXT


def check_guest(memory: Any, cpu: CpuState) -> GuestCheckReport:
    """Check a guest paused at ``cpu`` (:meth:`MicroVM.pause`): registers, status page and RAM.

    At every pause point the status page's counter is the counter register (r8) less the
    iterations of the batch not yet reported (r14 - r13), the checksum register (r9) the
    recomputed sum, the loop's constant registers their params, and the RAM what
    :func:`expected_ram_check` expects. Paused mid-iteration (:meth:`MicroVM.pause`), ``rip``
    says how far that iteration got: past its store (``stored``, ``summed``) the RAM holds
    one iteration more than r8 counts, past its sum (``summed``) r9 too, and past its count
    (``counted``) r13 one less than r8.
    """
    params = read_params(memory)
    status = qwords(memory, STATUS_ADDR, 4)
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
    stored = counter + (cpu.rip in (_STORED, _SUMMED))
    status_counter = int(status[S_COUNTER // 8]) if phase == PHASE_LOOP else 0
    fill_done = int(status[S_FILL_DONE // 8])
    if stored and fill_done != params.fill_pages:
        raise UsageError(f"r8 says {counter} loop iterations ran, yet the fill covers {fill_done} pages")
    last, checksum = replay(params, stored)
    if cpu.rip == _STORED:  # the store done, not yet summed into r9
        checksum = (checksum - int(guest_values(params.seed, counter, counter + 1)[0])) % (1 << 64)
    return GuestCheckReport(
        counter=counter,
        status_counter=status_counter,
        unreported=cpu.r14 - cpu.r13 + (cpu.rip == _COUNTED) if phase == PHASE_LOOP else 0,
        checksum=cpu.r9,
        expected_checksum=checksum,
        registers=registers,
        ram=check_ram(memory, params, fill_done, stored, last, started),
    )


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
    """The exact state of a stopped vCPU (KVM_GET_REGS, _SREGS, _XSAVE's x87/SSE part, _MSRS)."""
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


class MicroVM:
    """A KVM guest of ``mem_mib`` MiB running the workload (see :mod:`.guest`).

    Args:
        mem_mib: guest RAM (1 .. 16384 MiB).
        seed: the loop's seed.
        fill_fraction: share of the data region the fill writes (the rest stays zero).
        rate: target loop iterations (page writes) per second; None runs as fast as it can.
            The limiter acts at batch exits, so keep ``batch`` well under ``rate``.
        batch: loop iterations between two exits (pause points, status updates).
        dirty_log: enable KVM's dirty log on the RAM slot (:meth:`dirty_pages`).
        memory: the guest's RAM, when it is given (e.g. a private mapping of a snapshot's
            page region: :func:`.kvm.file_memory`); the VM owns it from then on.
    """

    kind = "kvm"
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
        memory: GuestMemory | None = None,
    ) -> None:
        check_params(mem_mib, fill_fraction=fill_fraction, batch=batch, rate=rate)
        self.mem_mib = mem_mib
        self.params = make_params(mem_mib, seed=seed, fill_fraction=fill_fraction, batch=batch)
        self.seed = self.params.seed
        self.fill_fraction = fill_fraction
        self.rate = rate
        self.batch = batch
        self.dirty_log = dirty_log
        self.size = mem_mib << 20
        self.pages = self.size // PAGE_SIZE
        self.data_first = DATA_FIRST
        self.data_pages = self.params.data_pages
        self.fill_pages = self.params.fill_pages
        self._restored = False
        self._closed = False
        self.lazy: Any = None  # the LazyLoader filling this VM's RAM (vm/lazy.py), closed with the VM
        self._pace_ref: tuple[float, int] | None = None
        self._window: tuple[float, int] = (time.monotonic(), 0)
        self._measured = 0.0
        self._throttle = 0
        self._entered = time.monotonic()  # when the vCPU thread last entered the guest (about)
        self._ran = 0.0  # seconds the guest ran, throttle sleeps and pauses excluded
        self._slept = 0.0  # seconds of throttle sleep asked for at its exits
        self._throttle_delay = 0.0  # the throttle's share of the delay of the exit being handled
        self._stop_at: int | None = None
        self._kvm = Kvm()
        try:
            self._vm = self._kvm.create_vm()
            if memory is not None and len(memory) != self.size:
                raise UsageError(f"guest memory of {len(memory)} bytes for a {mem_mib} MiB guest")
            self.memory: GuestMemory = memory if memory is not None else anonymous_memory(self.size)
            self._vm.add_memslot(0, 0, self.memory, log_dirty=dirty_log)
            self._vcpu = self._vm.create_vcpu(0)
            self._vcpu.set_cpuid2(self._kvm.supported_cpuid())
            self._status: U64 | None = qwords(self.memory, STATUS_ADDR, 4)
            self._runner = VcpuThread(self._vcpu, self._on_io, on_kick=self._on_kick, name="microvm-vcpu0")
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

    def rewind(self, cpu: GuestCpu) -> None:
        """Put the paused (or new) vCPU back to ``cpu`` (its RAM is the caller's to put back)."""
        if not isinstance(cpu, CpuState):
            raise UsageError(f"a KVM guest's state is a CpuState, not {type(cpu).__name__}")
        if self._runner.state not in ("new", "paused"):
            raise UsageError(f"the vCPU is {self._runner.state}: pause it first")
        apply_cpu(self._vcpu, cpu)

    @property
    def first_entry(self) -> float | None:
        """``time.perf_counter()`` when the vCPU first entered the guest (None: not yet)."""
        return self._runner.first_entry

    def pause(self, timeout: float = 10.0) -> CpuState:
        """Stop the guest as soon as its state is exact (in the loop: within one iteration;
        in the fill: at its next I/O exit) and return that vCPU state."""
        self._runner.pause(timeout)
        return capture_cpu(self._vcpu)

    def resume(self) -> None:
        """Continue a paused guest, or start a VM made by :meth:`from_state`."""
        self._reset_meters()
        if self._runner.state == "new":
            if not self._restored:
                raise UsageError("start() the VM first")
            self._adopt_params()
            self._runner.start()
        else:
            self._runner.resume()

    def run_until(self, counter: int, timeout: float = 60.0) -> CpuState:
        """Run until the first exit at which the loop has done at least ``counter`` iterations
        (the fill done), and pause there: with ``counter`` a multiple of the batch, exactly there.

        From a new VM this starts it (the fill first); from a paused one it resumes it. A
        guest paused in its loop with ``counter`` iterations done already stays where it is.
        """
        if self._runner.state == "paused" and self._phase() == PHASE_LOOP:
            if int(self._status_words()[S_COUNTER // 8]) >= counter:
                return capture_cpu(self._vcpu)
        self._stop_at = counter
        try:
            if self._runner.state == "new" and not self._restored:
                self.start()
            else:
                self.resume()
            if not self._runner.wait_paused(timeout):
                raise KvmError(f"the guest did not reach iteration {counter} within {timeout} s")
        finally:
            self._stop_at = None
        return capture_cpu(self._vcpu)

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
        if self.lazy is not None:
            self.lazy.close()
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

    # -- observation and control

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

    def dirty_tracker(self) -> CallbackTracker:
        """KVM's dirty log as a tracker (turned on if it is off)."""
        if not self.dirty_log:
            self.set_dirty_log(True)
        return CallbackTracker(self.pages, self.dirty_pages)

    def set_throttle(self, pct: int) -> None:
        """From the next batch on, sleep ``pct / (100 - pct)`` of the time the guest ran (0: none)."""
        if not 0 <= pct < 100:
            raise UsageError(f"throttle must be 0 .. 99 percent, got {pct}")
        self._throttle = pct

    @property
    def throttle(self) -> int:
        return self._throttle

    def run_seconds(self) -> float:
        """Seconds the guest has run in KVM_RUN since it was made (sleeps and pauses excluded)."""
        ran = self._ran
        if self._runner.state == "running":
            ran += max(0.0, time.monotonic() - self._entered)
        return ran

    def throttle_seconds(self) -> float:
        """Seconds of throttle sleep the VMM has asked for so far (a pause cuts one short)."""
        return self._slept

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

    def check(self, cpu: GuestCpu) -> GuestCheckReport:
        """:func:`check_guest` on this VM's RAM (pause it first)."""
        if not isinstance(cpu, CpuState):
            raise UsageError(f"a KVM guest's state is a CpuState, not {type(cpu).__name__}")
        return check_guest(self.memory, cpu)

    # -- internals

    def _adopt_params(self) -> None:
        """A restored guest's parameters came with its RAM (if it holds none, it will fail to run)."""
        try:
            self.params = read_params(self.memory)
        except FormatError:
            return
        self.batch = self.params.batch
        self.data_pages, self.fill_pages = self.params.data_pages, self.params.fill_pages

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
        self._entered = time.monotonic()

    def _on_io(self, io: IoExit) -> float:
        """Called by the vCPU thread at every I/O exit: returns how long to wait before re-entry."""
        now = time.monotonic()
        ran = max(0.0, now - self._entered)
        self._ran += ran
        self._throttle_delay = 0.0
        delay = self._exit_delay(io, now, ran)
        if (
            self._stop_at is not None
            and io.port in (PORT_BATCH, PORT_FILLED)
            and self._phase() == PHASE_LOOP
            and int(self._status_words()[S_COUNTER // 8]) >= self._stop_at
        ):
            self._runner.request_pause()
            delay = 0.0
        else:
            self._slept += self._throttle_delay
        self._entered = now + delay  # a pause cuts the wait short; resume() resets this
        return delay

    def _on_kick(self) -> bool:
        """Called by the vCPU thread when a pause kicked the guest out of KVM_RUN: pause here
        if the guest is in its loop (:func:`check_guest` can tell its progress there), else run
        on to its next I/O exit (the fill, the status page's stores: a few instructions)."""
        now = time.monotonic()
        self._ran += max(0.0, now - self._entered)
        self._entered = now
        return _at_checkable(self._vcpu.get_regs().rip)

    def _exit_delay(self, io: IoExit, now: float, ran: float) -> float:
        if io.port == PORT_BATCH:
            counter = int(self._status_words()[S_COUNTER // 8])
            t0, c0 = self._window
            if now - t0 >= 0.5:
                self._measured = (counter - c0) / (now - t0)
                self._window = (now, counter)
            delay = self._throttle_delay = throttle_sleep(ran, self._throttle)
            if self.rate is None:
                return delay
            if self._pace_ref is None:
                self._pace_ref = (now, counter)
                return delay
            ref_time, ref_counter = self._pace_ref
            return max(delay, ref_time + (counter - ref_counter) / self.rate - now)
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
        write_params(memory, self.params)
        words = qwords(memory, 0, DATA_FIRST * PAGE_SIZE // 8)
        try:
            words[GDT_ADDR // 8 : GDT_ADDR // 8 + 3] = [0, GDT_CODE64, GDT_DATA]
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


"""The built-in guest's operations: run it, save it live, restore it into a fresh VM and
resume it, and the demo that does all of these in a row. Each returns a report.

The guest is the micro-VM on /dev/kvm (:class:`~mappedram.microvm.MicroVM`), or, where
KVM cannot be used, the same workload on a software guest (:class:`~mappedram.softvm.SoftVM`).
Its vCPU state is saved as a FULL device section after the RAM section, with its vmdesc
entry (``mappedram-cpu``, or ``mappedram-soft-cpu``); its RAM is the block ``pc.ram``.
A restore rebuilds the guest from the file alone: the size from the block, the guest's
parameters from its RAM, the vCPU from the section.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mappedram import snapshot
from mappedram.engine.kvm import kvm_available
from mappedram.engine.trackers import CallbackTracker
from mappedram.errors import FormatError, UsageError
from mappedram.format.cpustate import CPUSTATE_IDSTR, CpuState, vmdesc_fields
from mappedram.format.vmstate import DeviceRecord
from mappedram.image import MigrationFile, open_file
from mappedram.live import LiveSaveReport, PassStats, live_save
from mappedram.microvm import GuestCheckReport, MicroVM
from mappedram.snapshot import Progress, RestoreReport
from mappedram.softvm import SOFTCPU_IDSTR, SoftCpu, SoftVM

__all__ = [
    "GUEST_KINDS",
    "Guest",
    "GuestChoice",
    "choose_guest",
    "make_guest",
    "guest_record",
    "live_save_guest",
    "VmRunReport",
    "VmSaveReport",
    "VmRestoreReport",
    "DemoReport",
    "vm_run",
    "vm_save",
    "vm_restore",
    "demo",
]

GUEST_KINDS = ("auto", "kvm", "software")
Guest = MicroVM | SoftVM
Cpu = CpuState | SoftCpu
#: How long the fill may take (a 16 GiB guest on a slow, nested host).
FILL_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class GuestChoice:
    kind: str  # "kvm" or "software"
    reason: str | None  # why not KVM, when the software guest runs instead


def choose_guest(kind: str = "auto") -> GuestChoice:
    """KVM where /dev/kvm works; the software guest where it does not (or when asked)."""
    if kind not in GUEST_KINDS:
        raise UsageError(f"unknown guest {kind!r}: expected one of {', '.join(GUEST_KINDS)}")
    if kind == "software":
        return GuestChoice("software", "the software guest runs, as asked")
    reason = kvm_available()
    if reason is None:
        return GuestChoice("kvm", None)
    if kind == "kvm":
        raise UsageError(f"the KVM guest cannot run here: {reason}")
    return GuestChoice("software", f"KVM cannot be used here ({reason}): the same workload runs on the software guest")


def make_guest(kind: str, mem_mib: int, **params: Any) -> Guest:
    if kind == "kvm":
        # The fill runs faster without the dirty log (large pages); a live save turns it on.
        return MicroVM(mem_mib, dirty_log=False, **params)
    return SoftVM(mem_mib, **params)


def guest_record(cpu: Cpu) -> DeviceRecord:
    """The vCPU state as the device section a file carries."""
    if isinstance(cpu, SoftCpu):
        return cpu.record()
    return DeviceRecord(CPUSTATE_IDSTR, 0, CpuState.VERSION, cpu.encode(), tuple(vmdesc_fields()))


def _check(guest: Guest, cpu: Cpu) -> GuestCheckReport:
    if isinstance(guest, SoftVM):
        assert isinstance(cpu, SoftCpu)
        return guest.check(cpu)
    assert isinstance(cpu, CpuState)
    return guest.check(cpu)


def _counter(cpu: Cpu) -> int:
    return cpu.counter if isinstance(cpu, SoftCpu) else cpu.r8


def _start(guest: Guest) -> float:
    t0 = time.perf_counter()
    guest.start()
    guest.wait_filled(FILL_TIMEOUT)
    return time.perf_counter() - t0


def _tracker(guest: Guest) -> CallbackTracker:
    if isinstance(guest, MicroVM):
        guest.set_dirty_log(True)
    return CallbackTracker(len(guest.memory) // guest.page_size, guest.dirty_pages)


# -- run --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmRunReport:
    guest: str
    note: str | None
    mem_mib: int
    fill_seconds: float
    seconds: float
    counter: int
    iterations_per_second: float
    check: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.check["ok"])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def vm_run(*, mem_mib: int = 1024, seconds: float = 2.0, guest: str = "auto", **params: Any) -> VmRunReport:
    """Run the guest for ``seconds`` after its fill, pause it and check its registers and RAM."""
    choice = choose_guest(guest)
    with make_guest(choice.kind, mem_mib, **params) as vm:
        fill = _start(vm)
        t0 = time.perf_counter()
        time.sleep(seconds)
        cpu = vm.pause()
        elapsed = time.perf_counter() - t0
        check = _check(vm, cpu)
    counter = _counter(cpu)
    return VmRunReport(
        choice.kind, choice.reason, mem_mib, fill, elapsed, counter, counter / elapsed, check.to_dict()
    )


# -- save -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmSaveReport:
    guest: str
    note: str | None
    mem_mib: int
    fill_seconds: float
    warmup_seconds: float
    counter: int  # the guest's iteration at the stop point
    save: LiveSaveReport
    source_check: dict[str, Any] | None  # the paused source against the recomputation

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "save": self.save.to_dict()}


def live_save_guest(
    vm: Guest, path: str | os.PathLike[str], fmt: str, stopped: list[Cpu], **options: Any
) -> LiveSaveReport:
    """Save the running guest ``vm`` live (its dirty log as the tracker); ``stopped`` gets the
    vCPU state it was paused at. ``options`` are :func:`~mappedram.live.live_save`'s."""

    def stop() -> list[DeviceRecord]:
        cpu = vm.pause()
        stopped.append(cpu)
        return [guest_record(cpu)]

    return live_save(path, [(vm.ram_idstr, vm.memory)], [_tracker(vm)], stop=stop, format=fmt, **options)


def vm_save(
    path: str | os.PathLike[str],
    *,
    mem_mib: int = 1024,
    warmup: float = 1.0,
    guest: str = "auto",
    format: str = "mapped-ram",
    verify_source: bool = True,
    guest_params: dict[str, Any] | None = None,
    **options: Any,
) -> VmSaveReport:
    """Start the guest, let it run ``warmup`` seconds, and save it live (``options``: live_save's)."""
    choice = choose_guest(guest)
    with make_guest(choice.kind, mem_mib, **(guest_params or {})) as vm:
        fill = _start(vm)
        time.sleep(warmup)
        stopped: list[Cpu] = []
        report = live_save_guest(vm, path, format, stopped, **options)
        check = _check(vm, stopped[0]).to_dict() if verify_source else None
    return VmSaveReport(choice.kind, choice.reason, mem_mib, fill, warmup, _counter(stopped[0]), report, check)


# -- restore ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmRestoreReport:
    path: str
    guest: str
    mem_mib: int
    restore: RestoreReport
    counter: int  # the iteration the file stopped at
    at_restore: dict[str, Any]  # the restored guest, before it runs, against the recomputation
    ran_seconds: float
    counter_after: int
    after: dict[str, Any] | None  # the guest after running on, paused again, against the recomputation

    @property
    def ok(self) -> bool:
        return bool(self.at_restore["ok"]) and (self.after is None or bool(self.after["ok"]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "restore": self.restore.to_dict(), "ok": self.ok}


def read_guest_state(mf: MigrationFile) -> Cpu:
    """The built-in guest's vCPU section of ``mf`` (``mappedram-cpu`` or ``mappedram-soft-cpu``)."""
    sections = mf.device_sections or []
    blob = mf.device_state()
    for s in sections:
        if s.idstr in (CPUSTATE_IDSTR, SOFTCPU_IDSTR):
            start = s.body_offset - mf.device_state_offset
            body = blob[start : start + s.body_length]
            cls: type[CpuState] | type[SoftCpu] = CpuState if s.idstr == CPUSTATE_IDSTR else SoftCpu
            if len(body) != cls.SIZE:
                raise FormatError(
                    f"{s.idstr} section has a body of the wrong size",
                    offset=s.body_offset,
                    field=s.idstr,
                    expected=f"{cls.SIZE} bytes",
                    actual=f"{len(body)} bytes",
                    path=mf.path,
                )
            try:
                return cls.decode(body)
            except FormatError as exc:
                if exc.offset is not None:
                    exc.offset += s.body_offset
                exc.path = mf.path
                raise
    raise FormatError(
        "no vCPU state of the built-in guest in this file",
        offset=mf.device_state_offset,
        field="device sections",
        expected=f"a {CPUSTATE_IDSTR!r} or {SOFTCPU_IDSTR!r} section",
        actual=", ".join(repr(s.idstr) for s in sections) or "none",
        path=mf.path,
    )


def _restore_into(
    path: str | os.PathLike[str],
    *,
    rate: float | None,
    progress: Progress | None,
    on_start: Callable[[int], None] | None,
    **options: Any,
) -> tuple[Guest, Cpu, RestoreReport]:
    with open_file(path) as mf:
        cpu = read_guest_state(mf)
        block = mf.block(MicroVM.ram_idstr)
        if block.used_length % (1 << 20):
            raise FormatError(
                "the guest's RAM is not a whole number of MiB",
                offset=block.entry_offset,
                field="used_length",
                expected="a multiple of 0x100000",
                actual=block.used_length,
                block=block.idstr,
                path=mf.path,
            )
        mem_mib = block.used_length >> 20
    vm: Guest
    if isinstance(cpu, SoftCpu):
        vm = SoftVM.from_state(cpu, mem_mib, rate=rate)
    else:
        reason = kvm_available()
        if reason is not None:
            raise UsageError(f"{os.fspath(path)} holds a KVM guest, and KVM cannot run here: {reason}")
        vm = MicroVM.from_state(cpu, mem_mib, rate=rate, dirty_log=False)
    try:
        report = snapshot.restore(path, {vm.ram_idstr: vm.memory}, progress=progress, on_start=on_start, **options)
    except BaseException:
        vm.close()
        raise
    return vm, cpu, report


def vm_restore(
    path: str | os.PathLike[str],
    *,
    run: float = 1.0,
    rate: float | None = None,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
    **options: Any,
) -> VmRestoreReport:
    """Build a fresh guest from ``path``, check it, resume it for ``run`` seconds, check it again."""
    vm, cpu, report = _restore_into(path, rate=rate, progress=progress, on_start=on_start, **options)
    with vm:
        at_restore = _check(vm, cpu).to_dict()
        after = None
        counter_after = _counter(cpu)
        elapsed = 0.0
        if run > 0:
            t0 = time.perf_counter()
            vm.resume()
            time.sleep(run)
            later = vm.pause()
            elapsed = time.perf_counter() - t0
            counter_after = _counter(later)
            after = _check(vm, later).to_dict()
    kind = "software" if isinstance(cpu, SoftCpu) else "kvm"
    return VmRestoreReport(
        os.fspath(path), kind, report.ram_bytes >> 20, report, _counter(cpu), at_restore, elapsed, counter_after, after
    )


# -- demo -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoReport:
    guest: str
    note: str | None
    mem_mib: int
    fill_seconds: float
    warmup_seconds: float
    mapped_ram: LiveSaveReport
    legacy: LiveSaveReport
    restore: VmRestoreReport
    source_match: dict[str, bool]  # restored RAM and vCPU state equal the source's at the stop point
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.restore.ok and all(self.source_match.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mapped_ram": self.mapped_ram.to_dict(),
            "legacy": self.legacy.to_dict(),
            "restore": self.restore.to_dict(),
            "ok": self.ok,
        }


def _same_memory(a: Any, b: Any, chunk: int = 64 << 20) -> bool:
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return len(x) == len(y) and all(np.array_equal(x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk))


def demo(
    workdir: str | os.PathLike[str],
    *,
    mem_mib: int = 1024,
    guest: str = "auto",
    warmup: float = 1.0,
    run: float = 1.0,
    channels: int = 4,
    direct_io: bool = True,
    max_passes: int = 10,
    downtime_limit: float = 0.3,
    bandwidth_limit: float | None = None,
    guest_params: dict[str, Any] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_pass: Callable[[PassStats], None] | None = None,
    progress: Progress | None = None,
) -> DemoReport:
    """Start the guest, save it live as mapped-ram, restore it into a fresh VM and compare it
    with the paused source, resume it and check it again; then let the source run on and save
    it live as a legacy stream for as many passes, to show what that format writes."""
    phase = on_phase or (lambda _: None)
    choice = choose_guest(guest)
    work = os.fspath(workdir)
    mapped_path, legacy_path = os.path.join(work, "guest.mig"), os.path.join(work, "guest-legacy.mig")
    options: dict[str, Any] = dict(
        channels=channels, max_passes=max_passes, downtime_limit=downtime_limit, bandwidth_limit=bandwidth_limit,
        on_pass=on_pass, progress=progress,
    )  # fmt: skip
    params = guest_params or {}
    with make_guest(choice.kind, mem_mib, **params) as source:
        phase(f"starting a {mem_mib} MiB {choice.kind} guest")
        fill = _start(source)
        phase(f"guest running; live save after {warmup:g} s")
        time.sleep(warmup)
        stopped: list[Cpu] = []
        mapped = live_save_guest(
            source, mapped_path, "mapped-ram", stopped, direct_io=direct_io, direct_io_fallback=True, **options
        )
        cpu = stopped[0]
        phase("restoring into a fresh VM")
        vm, restored_cpu, restored = _restore_into(mapped_path, rate=params.get("rate"), progress=None, on_start=None,
                                                   channels=channels, direct_io=direct_io, direct_io_fallback=True)
        with vm:
            match = {
                "RAM equals the source's at the stop point": _same_memory(vm.memory, source.memory),
                "vCPU state equals the source's at the stop point": restored_cpu == cpu,
            }
            at_restore = _check(vm, restored_cpu).to_dict()
            phase(f"resuming the restored guest for {run:g} s")
            t0 = time.perf_counter()
            vm.resume()
            time.sleep(run)
            later = vm.pause()
            elapsed = time.perf_counter() - t0
            after = _check(vm, later).to_dict()
        restore = VmRestoreReport(
            mapped_path, choice.kind, mem_mib, restored, _counter(cpu), at_restore, elapsed, _counter(later), after
        )
        phase("the source runs on; the same live save as a legacy stream")
        source.resume()
        live_passes = sum(1 for p in mapped.passes if not p.stopped)
        same = {**options, "max_passes": live_passes, "downtime_limit": 0.0}
        legacy = live_save_guest(source, legacy_path, "legacy", [], **same)
    notes = list(mapped.notes)
    return DemoReport(choice.kind, choice.reason, mem_mib, fill, warmup, mapped, legacy, restore, match, notes)

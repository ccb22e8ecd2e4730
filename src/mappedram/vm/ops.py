"""The built-in guest's operations: run it, save it live, restore it into a fresh VM and
resume it, and the demo that does all of these in a row. Each returns a report.

The guest is the micro-VM on /dev/kvm (:class:`~mappedram.vm.microvm.MicroVM`), or, where
KVM cannot be used, the same workload on a software guest (:class:`~mappedram.vm.softvm.SoftVM`);
both are a :class:`~mappedram.vm.guest.Guest`. Its vCPU state is saved as a FULL device
section after the RAM section, with its vmdesc entry (``mappedram-cpu``, or
``mappedram-soft-cpu``); its RAM is the block ``pc.ram``. A restore rebuilds the guest from
the file alone (decoded once): the size from the block, the guest's parameters from its
RAM, the vCPU from the section.

A live save of the guest converges as QEMU's does: auto-converge is on by default
(:data:`VM_LIVE_DEFAULTS`), the guest's throttle is set between passes. With
``step_batches`` the guest does not run freely at all: it runs exactly that many batches
before each dirty sync and is paused otherwise, so every pass sees the same writes on any
machine (the tests drive it so).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.errors import KvmError, UsageError
from mappedram.format.vmstate import DeviceRecord
from mappedram.image import open_file
from mappedram.ops.live import LiveOptions, LiveSaveReport, PassStats, live_save
from mappedram.ops.options import DEFAULTS, EngineOptions
from mappedram.ops.seal import SEAL_CHECK, SealOptions
from mappedram.ops.trackers import DirtyTracker

from .child import VmChildReport, vm_save_child
from .config import DEMO_OPTIONS, GUEST_KINDS, RESTORE_MODES, VM_LIVE_DEFAULTS
from .guest import Guest, GuestCpu
from .kvm import kvm_available
from .microvm import MicroVM
from .restore import GuestRestoreReport, RestoreLoop, restore_guest
from .softvm import SoftVM
from .statecodec import read_guest_state
from .uffd import UserfaultfdUnavailable, userfaultfd_problem

__all__ = [
    "RESTORE_MODES",
    "RestoreLoop",
    "GUEST_KINDS",
    "VM_LIVE_DEFAULTS",
    "DEMO_OPTIONS",
    "GuestConfig",
    "GuestChoice",
    "choose_guest",
    "make_guest",
    "live_save_guest",
    "read_guest_state",
    "VmRunReport",
    "VmSaveReport",
    "VmChildReport",
    "vm_save_child",
    "VmRestoreReport",
    "DemoReport",
    "vm_run",
    "vm_save",
    "vm_restore",
    "demo",
]

#: How long the fill may take (a 16 GiB guest on a slow, nested host).
FILL_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestConfig:
    """The built-in guest to make: its kind, size and workload parameters."""

    kind: str = "auto"  # "auto" (KVM where it works), "kvm" or "software"
    mem_mib: int = 1024
    seed: int = 1
    fill_fraction: float = 0.5
    rate: float | None = None  # loop iterations per second; None: as fast as it runs
    batch: int = 4096  # loop iterations between two pause points

    def replace(self, **changes: Any) -> GuestConfig:
        return dataclasses.replace(self, **changes)


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


def make_guest(kind: str, config: GuestConfig) -> Guest:
    """A new guest of ``kind`` ("kvm" or "software"), not started."""
    params: dict[str, Any] = dict(
        seed=config.seed, fill_fraction=config.fill_fraction, rate=config.rate, batch=config.batch
    )
    if kind == "kvm":
        # The fill runs faster without the dirty log (large pages); a live save turns it on.
        return MicroVM(config.mem_mib, dirty_log=False, **params)
    if kind == "software":
        return SoftVM(config.mem_mib, **params)
    raise UsageError(f"unknown guest kind {kind!r}: expected kvm or software")


def _start(guest: Guest, warmup: float, warmup_iterations: int | None) -> float:
    """Start the guest: run it ``warmup_iterations`` exactly and pause it there, or let it run
    ``warmup`` seconds after its fill (it keeps running). Returns the fill's seconds."""
    t0 = time.perf_counter()
    if warmup_iterations is not None:
        guest.run_until(0, FILL_TIMEOUT)
        fill = time.perf_counter() - t0
        guest.run_until(warmup_iterations, FILL_TIMEOUT)
        return fill
    guest.start()
    guest.wait_filled(FILL_TIMEOUT)
    fill = time.perf_counter() - t0
    time.sleep(warmup)
    return fill


class _Stepper:
    """A tracker that runs the paused guest exactly ``batches`` batches before each sync,
    until the save stops the guest (``frozen``): the final sync then runs nothing."""

    def __init__(self, guest: Guest, tracker: DirtyTracker, batches: int, counter: int) -> None:
        self.guest, self.tracker, self.batches, self.counter = guest, tracker, batches, counter
        self.frozen = False

    @property
    def npages(self) -> int:
        return self.tracker.npages

    def sync(self) -> npt.NDArray[np.bool_]:
        if not self.frozen:
            self.counter = self.guest.run_until(self.counter + self.batches * self.guest.params.batch).counter
        return self.tracker.sync()


def live_save_guest(
    vm: Guest,
    path: str | os.PathLike[str],
    fmt: str,
    stopped: list[GuestCpu],
    *,
    step_batches: int | None = None,
    live: LiveOptions = VM_LIVE_DEFAULTS,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> LiveSaveReport:
    """Save the guest ``vm`` live (its dirty tracking as the tracker, its throttle for
    auto-converge); ``stopped`` gets the vCPU state it was paused at.

    Without ``step_batches`` the guest runs freely. With it, the guest must be paused: it
    then runs exactly ``step_batches`` batches before each sync (see the module docstring).
    """
    tracker: DirtyTracker = vm.dirty_tracker()
    stepper: _Stepper | None = None
    if step_batches is not None:
        if step_batches < 1:
            raise UsageError(f"step_batches must be at least 1, got {step_batches}")
        tracker = stepper = _Stepper(vm, tracker, step_batches, vm.pause().counter)

    def stop() -> list[DeviceRecord]:
        if stepper is not None:
            stepper.frozen = True
        cpu = vm.pause()
        stopped.append(cpu)
        return [cpu.record()]

    try:
        return live_save(path, [(vm.ram_idstr, vm.memory)], [tracker], stop=stop, format=fmt, cpu=vm, live=live,
                         options=options, seal=seal)  # fmt: skip
    finally:
        vm.set_throttle(0)


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


def vm_run(config: GuestConfig = GuestConfig(), *, seconds: float = 2.0, iterations: int | None = None) -> VmRunReport:
    """Run the guest for ``seconds`` after its fill (or exactly ``iterations``), pause it and
    check its registers and RAM."""
    choice = choose_guest(config.kind)
    with make_guest(choice.kind, config) as vm:
        t0 = time.perf_counter()
        if iterations is not None:
            vm.run_until(0, FILL_TIMEOUT)
            fill = time.perf_counter() - t0
            t0 = time.perf_counter()
            cpu = vm.run_until(iterations, FILL_TIMEOUT)
        else:
            vm.start()
            vm.wait_filled(FILL_TIMEOUT)
            fill = time.perf_counter() - t0
            t0 = time.perf_counter()
            time.sleep(seconds)
            cpu = vm.pause()
        elapsed = time.perf_counter() - t0
        check = vm.check(cpu)
    rate = cpu.counter / elapsed if elapsed > 0 else 0.0
    return VmRunReport(choice.kind, choice.reason, config.mem_mib, fill, elapsed, cpu.counter, rate, check.to_dict())


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

    @property
    def ok(self) -> bool:
        """The save converged within its downtime limit and the paused source checked out."""
        return self.save.ok and (self.source_check is None or bool(self.source_check["ok"]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "save": self.save.to_dict(), "ok": self.ok}


def vm_save(
    path: str | os.PathLike[str],
    config: GuestConfig = GuestConfig(),
    *,
    format: str = "mapped-ram",
    warmup: float = 1.0,
    warmup_iterations: int | None = None,
    step_batches: int | None = None,
    verify_source: bool = True,
    live: LiveOptions = VM_LIVE_DEFAULTS,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> VmSaveReport:
    """Start the guest, let it run ``warmup`` seconds (or exactly ``warmup_iterations``), and
    save it live. ``step_batches`` drives it step by step (see :func:`live_save_guest`);
    ``seal`` seals the file before it gets its name."""
    choice = choose_guest(config.kind)
    if step_batches is not None and warmup_iterations is None:
        warmup_iterations = 0
    with make_guest(choice.kind, config) as vm:
        fill = _start(vm, warmup, warmup_iterations)
        if warmup_iterations is not None and step_batches is None:
            vm.resume()  # exact start, then free running
        stopped: list[GuestCpu] = []
        report = live_save_guest(vm, path, format, stopped, step_batches=step_batches, live=live, options=options,
                                 seal=seal)  # fmt: skip
        check = vm.check(stopped[0]).to_dict() if verify_source else None
    warm = warmup if warmup_iterations is None else 0.0
    return VmSaveReport(choice.kind, choice.reason, config.mem_mib, fill, warm, stopped[0].counter, report, check)


# -- restore ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmRestoreReport:
    path: str
    guest: str
    mem_mib: int
    restore: GuestRestoreReport
    counter: int  # the iteration the file stopped at
    at_restore: dict[str, Any] | None  # the restored guest, before it runs, against the recomputation
    # (None in map mode when the guest runs: checking first would read all of it before it starts)
    ran_seconds: float
    counter_after: int
    after: dict[str, Any] | None  # the guest after running on, paused again, against the recomputation
    seconds_to_first_instruction: float | None = None  # from the call; None: the guest did not run

    @property
    def ok(self) -> bool:
        checks = [c for c in (self.at_restore, self.after) if c is not None]
        return bool(checks) and all(bool(c["ok"]) for c in checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "restore": self.restore.to_dict(), "ok": self.ok}


def _restore_into(
    path: str | os.PathLike[str], *, mode: str, rate: float | None, options: EngineOptions,
    seal: SealOptions = SEAL_CHECK,
) -> tuple[Guest, GuestCpu, GuestRestoreReport]:  # fmt: skip
    """A fresh guest rebuilt from ``path`` in ``mode`` (decoded once, checked, the seal's
    digests too, before its RAM is written)."""
    with open_file(path) as mf:
        return restore_guest(mf, mode=mode, rate=rate, options=options, seal=seal)


def _resident(vm: Guest, timeout: float = FILL_TIMEOUT) -> None:
    """Wait until a lazily restored guest's RAM is all there; raise the fill's error if it failed."""
    loader = getattr(vm, "lazy", None)
    if loader is None:
        return
    if not loader.wait_resident(timeout):
        raise KvmError(f"the lazy restore did not make the guest's RAM resident within {timeout} s")
    if loader.error is not None:
        raise loader.error


def _first_instruction(vm: Guest, t0: float) -> float | None:
    """Seconds from ``t0`` to the guest's first instruction (None: it has not run)."""
    return None if vm.first_entry is None else vm.first_entry - t0


def _run_on(vm: Guest, cpu: GuestCpu, run: float, run_iterations: int | None) -> tuple[GuestCpu, float]:
    """Let a restored (or paused) guest run on: ``run`` seconds, or exactly ``run_iterations``."""
    t0 = time.perf_counter()
    if run_iterations is not None:
        later = vm.run_until(cpu.counter + run_iterations, FILL_TIMEOUT)
    else:
        vm.resume()
        time.sleep(run)
        later = vm.pause()
    return later, time.perf_counter() - t0


def vm_restore(
    path: str | os.PathLike[str],
    *,
    mode: str = "eager",
    run: float = 1.0,
    run_iterations: int | None = None,
    rate: float | None = None,
    lazy_fallback: bool = False,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions = SEAL_CHECK,
) -> VmRestoreReport:
    """Build a fresh guest from ``path`` in ``mode`` (eager, map or lazy: vm/restore.py),
    resume it for ``run`` seconds (or exactly ``run_iterations``) and check it.

    The guest's RAM is checked against the recomputation after it ran (before, in eager
    mode, too: in map and lazy mode a check would read the whole file before the first
    instruction; a lazy guest is checked once its RAM is resident). The time to the first
    instruction is the restore's time to ready plus the time from resume() to the guest's
    first entry (the check before it is left out). Where userfaultfd cannot be used, a lazy
    restore fails with the reason, or with ``lazy_fallback`` restores eagerly and says so.
    A sealed file's digests are checked first, in every mode (``seal``: the key, or no check).
    """
    try:
        vm, cpu, report = _restore_into(path, mode=mode, rate=rate, options=options, seal=seal)
    except UserfaultfdUnavailable as exc:
        if not lazy_fallback:
            raise
        vm, cpu, report = _restore_into(path, mode="eager", rate=rate, options=options, seal=seal)
        report = dataclasses.replace(report, notes=[*report.notes, f"restored eagerly: {exc.message}"])
    with vm:
        running = bool(run > 0 or run_iterations)
        if not running:
            _resident(vm)
        at_restore = vm.check(cpu).to_dict() if mode == "eager" or not running else None
        after = None
        counter_after = cpu.counter
        elapsed = 0.0
        first = None
        if running:
            t_resume = time.perf_counter()
            try:
                later, elapsed = _run_on(vm, cpu, run, run_iterations)
            except KvmError:
                _resident(vm)  # a lazy fill that failed stopped the guest: say why
                raise
            _resident(vm)
            counter_after = later.counter
            after = vm.check(later).to_dict()
            since = _first_instruction(vm, t_resume)
            first = None if since is None else report.seconds_to_ready + since
        loader = getattr(vm, "lazy", None)
        if loader is not None:
            report = report.complete(loader.stats())
        kind = vm.kind
    return VmRestoreReport(os.fspath(path), kind, report.ram_bytes >> 20, report, cpu.counter, at_restore,
                           elapsed, counter_after, after, first)  # fmt: skip


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
    restores: list[VmRestoreReport]  # one per restore mode (RESTORE_MODES)
    source_match: dict[str, bool]  # restored RAM and vCPU state equal the source's at the stop point
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """What the demo promised and did not hold (empty: everything held)."""
        out = []
        m = self.mapped_ram
        if not m.converged:
            out.append(
                f"the live save did not converge: it stopped at the pass limit ({len(m.passes) - 1} live passes)"
            )
        if not m.downtime_met:
            out.append(f"the downtime {m.downtime:.3f} s exceeded its limit of {m.downtime_limit:g} s")
        out += [f"the guest restored in {r.restore.mode} mode did not verify" for r in self.restores if not r.ok]
        out += [f"not so: {name}" for name, good in self.source_match.items() if not good]
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mapped_ram": self.mapped_ram.to_dict(),
            "legacy": self.legacy.to_dict(),
            "restores": [r.to_dict() for r in self.restores],
            "failures": self.failures,
            "ok": self.ok,
        }


def _same_memory(a: Any, b: Any, chunk: int = 64 << 20) -> bool:
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return len(x) == len(y) and all(np.array_equal(x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk))


def _replay_throttle(vm: Guest, schedule: list[int], live: LiveOptions) -> LiveOptions:
    """Live options that run ``len(schedule) - 1`` live passes and a stopped one with the guest's
    throttle of pass k at ``schedule[k]`` (no auto-converge nor dirty-limit: the throttle is replayed)."""
    vm.set_throttle(schedule[0] if schedule else 0)
    user = live.on_pass

    def on_pass(stats: PassStats) -> None:
        if not stats.stopped and stats.index < len(schedule):
            vm.set_throttle(schedule[stats.index])
        if user is not None:
            user(stats)

    return live.replace(auto_converge=None, dirty_limit=None, throttle_policy=None,
                        max_passes=max(1, len(schedule) - 1), downtime_limit=0.0, on_pass=on_pass)  # fmt: skip


def demo(
    workdir: str | os.PathLike[str],
    config: GuestConfig = GuestConfig(),
    *,
    warmup: float = 1.0,
    warmup_iterations: int | None = None,
    run: float = 1.0,
    run_iterations: int | None = None,
    step_batches: int | None = None,
    live: LiveOptions = VM_LIVE_DEFAULTS,
    options: EngineOptions = DEMO_OPTIONS,
    on_phase: Callable[[str], None] | None = None,
    seal: SealOptions | None = None,
) -> DemoReport:
    """Start the guest, save it live as mapped-ram, restore it into a fresh VM and compare it
    with the paused source, resume it and check it again; then let the source run on and save
    it live as a legacy stream for as many passes, with the same throttle pass by pass, to
    show what that format writes. The report is OK only if the mapped-ram save converged
    within its downtime limit and the restored guest verified (:attr:`DemoReport.failures`).
    ``seal`` seals both files; every restore then checks the seal first."""
    phase = on_phase or (lambda _: None)
    choice = choose_guest(config.kind)
    work = os.fspath(workdir)
    mapped_path, legacy_path = os.path.join(work, "guest.mig"), os.path.join(work, "guest-legacy.mig")
    if step_batches is not None and warmup_iterations is None:
        warmup_iterations = 0
    with make_guest(choice.kind, config) as source:
        phase(f"starting a {config.mem_mib} MiB {choice.kind} guest")
        fill = _start(source, warmup, warmup_iterations)
        if warmup_iterations is not None and step_batches is None:
            source.resume()
        phase("guest running; live save" + (f" after {warmup:g} s" if warmup_iterations is None else ""))
        stopped: list[GuestCpu] = []
        mapped = live_save_guest(source, mapped_path, "mapped-ram", stopped, step_batches=step_batches, live=live,
                                 options=options, seal=seal)  # fmt: skip
        cpu = stopped[0]
        restores, match = [], {}
        modes, skipped = _demo_modes(choice.kind)
        for mode in modes:
            phase(f"restoring into a fresh VM ({mode})")
            report, equal = _demo_restore(mapped_path, mode, source, cpu, config, run, run_iterations, options)
            restores.append(report)
            match.update({f"{name} ({mode})": good for name, good in equal.items()})
        phase("the source runs on; the same live save as a legacy stream, with the same throttle")
        if step_batches is None:
            source.resume()
        schedule = [p.throttle for p in mapped.passes]
        same = _replay_throttle(source, schedule, live)
        legacy = live_save_guest(source, legacy_path, "legacy", [], step_batches=step_batches, live=same,
                                 options=options, seal=seal)  # fmt: skip
    notes = list(mapped.notes) + skipped
    warm = warmup if warmup_iterations is None else 0.0
    return DemoReport(choice.kind, choice.reason, config.mem_mib, fill, warm, mapped, legacy, restores, match,
                      notes)  # fmt: skip


def _demo_modes(kind: str) -> tuple[list[str], list[str]]:
    """The restore modes the demo shows for a guest of ``kind``, and why any is left out."""
    if kind == "software":
        return [m for m in RESTORE_MODES if m != "lazy"], [
            "lazy restore not shown: the software guest's writes hold the interpreter lock the fault thread needs"
        ]
    problem = userfaultfd_problem()
    if problem is not None:
        return [m for m in RESTORE_MODES if m != "lazy"], [f"lazy restore not shown: {problem}"]
    return list(RESTORE_MODES), []


def _demo_restore(
    path: str,
    mode: str,
    source: Guest,
    cpu: GuestCpu,
    config: GuestConfig,
    run: float,
    run_iterations: int | None,
    options: EngineOptions,
) -> tuple[VmRestoreReport, dict[str, bool]]:
    """The demo's restore in ``mode``: RAM and vCPU compared with the source's at the stop
    point (before the guest runs), checked, run on, checked again. The time to the first
    instruction leaves the comparison out: it is the restore's time to ready plus the
    time from resume() to the guest's first entry."""
    vm, restored_cpu, restored = _restore_into(path, mode=mode, rate=config.rate, options=options)
    with vm:
        _resident(vm)  # the comparison reads all of it
        same = {
            "RAM equals the source's at the stop point": _same_memory(vm.memory, source.memory),
            "vCPU state equals the source's at the stop point": restored_cpu == cpu,
        }
        at_restore = vm.check(restored_cpu).to_dict()
        t_resume = time.perf_counter()
        later, elapsed = _run_on(vm, restored_cpu, run, run_iterations)
        after = vm.check(later).to_dict()
        first = _first_instruction(vm, t_resume)
        loader = getattr(vm, "lazy", None)
        if loader is not None:
            restored = restored.complete(loader.stats())
    first = None if first is None else restored.seconds_to_ready + first
    return VmRestoreReport(path, vm.kind, config.mem_mib, restored, cpu.counter, at_restore, elapsed, later.counter,
                           after, first), same  # fmt: skip

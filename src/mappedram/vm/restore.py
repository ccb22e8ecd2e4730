"""Restoring the built-in guest from a file: eagerly, or by mapping the file, and again and again.

Modes (``RESTORE_MODES``):

* ``eager``: fresh anonymous RAM; every page is read from the file (the engine's parallel
  restore, checked before the first byte is written) before the guest runs;
* ``lazy`` (the KVM guest): fresh anonymous RAM registered with userfaultfd; the guest runs
  at once, each page it touches is served from its slot by a fault thread, and prefetch
  threads install the rest in large runs at disk speed (vm/lazy.py). The software guest
  cannot: its writes run in Python with the interpreter lock held, which the fault
  thread needs;
* ``map``: the guest's RAM is a private (copy-on-write) mapping of the block's page run
  at ``pages_offset``: nothing is read before the guest runs; each page comes from the
  page cache on first touch, and a write copies it, so the file is never modified. Right
  only where every 0-bit slot reads as zeros: files this project writes say so in their
  trailer; in any other file (QEMU's) the 0-bit slots that store data are found (SEEK_DATA)
  and zeros are written over them in the mapping before the guest runs (ops/mapping.py).

Repeat restores (:class:`RestoreLoop`): the guest keeps its dirty log (KVM's, or the
software guest's owner tracker) from the restore on; :meth:`RestoreLoop.reset` puts back
only the pages it wrote since, and its vCPU state. In ``map`` mode a written page is
dropped from the private mapping (``MADV_DONTNEED``: it reads from the file again); in
``eager`` mode it is read from the file again (zeros for a 0-bit page).

References:
    Firecracker's MAP_PRIVATE snapshot memory; QEMU migration/ram.c (save_zero_page with
    mapped-ram leaves the slot as it was); Linux madvise(2) MADV_DONTNEED on private mappings.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mappedram._runs import bit_runs
from mappedram.errors import FormatError, UsageError
from mappedram.image import MigrationFile, RamBlock, open_file
from mappedram.ops.loader import RestoreReport, restore
from mappedram.ops.mapping import stale_slots
from mappedram.ops.options import DEFAULTS, EngineOptions
from mappedram.ops.seal import NO_CHECK, SEAL_CHECK, SealCheck, SealOptions, checked

from .config import RESTORE_MODES
from .cpustate import CpuState
from .guest import PAGE_SIZE, PARAMS_ADDR, STATUS_PAGE, Guest, GuestCpu
from .kvm import file_memory, kvm_available
from .lazy import LazyLoader, LazyOptions, LazyStats
from .microvm import MicroVM
from .softvm import SoftCpu, SoftVM
from .statecodec import read_guest_state

__all__ = ["RESTORE_MODES", "GuestRestoreReport", "ResetReport", "RestoreLoop", "restore_guest"]

_RESET_CHUNK = 8192  # pages gathered at a time by a repeat restore


@dataclass(frozen=True, slots=True)
class GuestRestoreReport:
    """How the guest's RAM was put in place (before it runs)."""

    mode: str
    ram_bytes: int
    seconds_to_ready: float  # from the call to RAM and vCPU in place, the guest ready to enter
    pages: int
    pages_read: int  # eager: pages copied from the file before the guest runs
    pages_zero: int  # pages whose bit is 0 (zeros, never read)
    pages_mapped: int  # map: pages the guest reads from the file on first touch
    stale_pages_zeroed: int  # map: 0-bit slots of the file that store bytes, overlaid with zeros
    stale_checked: bool  # map: the file's slots were looked at (False: its trailer vouches for them)
    eager: RestoreReport | None = None
    notes: list[str] = field(default_factory=list)
    lazy: LazyStats | None = None  # lazy: the fill, once the guest's RAM is resident (see complete())
    seal: SealCheck | None = None  # the seal checked before the guest's RAM was written or mapped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eager"] = None if self.eager is None else self.eager.to_dict()
        return d

    def complete(self, lazy: LazyStats) -> GuestRestoreReport:
        """This report with the lazy fill's figures."""
        return dataclasses.replace(self, lazy=lazy)


def _ram_block(mf: MigrationFile, ram_idstr: str) -> tuple[RamBlock, int]:
    block = mf.block(ram_idstr)
    if block.used_length % (1 << 20):
        raise FormatError("the guest's RAM is not a whole number of MiB", offset=block.entry_offset,
                          field="used_length", expected="a multiple of 0x100000", actual=block.used_length,
                          block=block.idstr, path=mf.path)  # fmt: skip
    return block, block.used_length >> 20


def _make_guest(cpu: GuestCpu, mf: MigrationFile, mem_mib: int, memory: mmap.mmap | None, *, rate: float | None,
                dirty_log: bool) -> Guest:  # fmt: skip
    if isinstance(cpu, SoftCpu):
        return SoftVM.from_state(cpu, mem_mib, rate=rate, memory=memory)
    reason = kvm_available()
    if reason is not None:
        raise UsageError(f"{mf.path} holds a KVM guest, and KVM cannot run here: {reason}")
    assert isinstance(cpu, CpuState)
    return MicroVM.from_state(cpu, mem_mib, rate=rate, dirty_log=dirty_log, memory=memory)


def restore_guest(
    mf: MigrationFile,
    *,
    mode: str = "eager",
    rate: float | None = None,
    dirty_log: bool = False,
    options: EngineOptions = DEFAULTS,
    lazy: LazyOptions | None = None,
    seal: SealOptions = SEAL_CHECK,
) -> tuple[Guest, GuestCpu, GuestRestoreReport]:
    """A fresh guest rebuilt from ``mf`` in ``mode`` (see the module docstring), not yet running.

    ``dirty_log`` keeps the guest's writes logged from the restore on (a :class:`RestoreLoop`
    needs it). The file is checked (decoded, its layout and vCPU state, and, in every mode, a
    seal's digests: ``seal``) before the guest's RAM is written or mapped; the seal check is
    not part of ``seconds_to_ready``.
    """
    if mode not in RESTORE_MODES:
        raise UsageError(f"unknown restore mode {mode!r}: expected one of {', '.join(RESTORE_MODES)}")
    check = checked(mf, seal, options)
    vm, cpu, report = _restore_guest(mf, mode, rate, dirty_log, options, lazy)
    return vm, cpu, dataclasses.replace(report, seal=check)


def _restore_guest(mf: MigrationFile, mode: str, rate: float | None, dirty_log: bool, options: EngineOptions,
                   lazy: LazyOptions | None) -> tuple[Guest, GuestCpu, GuestRestoreReport]:  # fmt: skip
    t0 = time.perf_counter()
    cpu = read_guest_state(mf)
    idstr = SoftVM.ram_idstr if isinstance(cpu, SoftCpu) else MicroVM.ram_idstr
    block, mem_mib = _ram_block(mf, idstr)
    present = int(np.count_nonzero(block.present))
    if mode == "eager":
        vm = _make_guest(cpu, mf, mem_mib, None, rate=rate, dirty_log=dirty_log)
        try:
            eager = restore(mf, {idstr: vm.memory}, options=options, seal=NO_CHECK)  # checked by the caller
        except BaseException:
            vm.close()
            raise
        return vm, cpu, GuestRestoreReport("eager", block.used_length, time.perf_counter() - t0, block.num_pages,
                                           present, block.num_pages - present, 0, 0, False, eager)  # fmt: skip
    lay = block.layout
    if lay is None:
        raise UsageError(f"{mf.path}: a legacy stream cannot be restored in {mode} mode (its pages have no fixed "
                         "slots): restore it with mode 'eager', or convert it to mapped-ram first")  # fmt: skip
    if mode == "lazy":
        return _lazy(mf, cpu, block, mem_mib, t0, rate=rate, dirty_log=dirty_log, lazy=lazy)
    if not block.slots:
        what = "compressed file" if block.compressed else "child of a chain (its parents hold pages)"
        raise UsageError(f"{mf.path}: map mode maps the file's page slots, and this {what} has none to map: "
                         "restore it with mode 'lazy' or 'eager'")  # fmt: skip
    stale = stale_slots(mf, block)
    memory = file_memory(mf.path, lay.pages_offset, block.used_length, identity=mf.file_id)
    notes = []
    try:
        if stale.count:
            words = np.frombuffer(memory, dtype=np.uint8).reshape(-1, lay.page_size)
            for first, n in stale.runs():
                words[first : first + n] = 0
            del words
            notes.append(f"{stale.count} page slots of {block.idstr!r} with bit 0 hold stale bytes (first: page "
                         f"{stale.first()}); the guest sees zeros there")  # fmt: skip
        vm = _make_guest(cpu, mf, mem_mib, memory, rate=rate, dirty_log=dirty_log)
    except BaseException:
        memory.close()
        raise
    return vm, cpu, GuestRestoreReport("map", block.used_length, time.perf_counter() - t0, block.num_pages, 0,
                                       block.num_pages - present, present, stale.count, not stale.trusted,
                                       None, notes)  # fmt: skip


def _lazy(mf: MigrationFile, cpu: GuestCpu, block: RamBlock, mem_mib: int, t0: float, *, rate: float | None,
          dirty_log: bool, lazy: LazyOptions | None) -> tuple[Guest, GuestCpu, GuestRestoreReport]:  # fmt: skip
    if not isinstance(cpu, CpuState):
        raise UsageError(f"{mf.path} holds a software guest, which cannot be restored lazily: its writes run in "
                         "Python holding the interpreter lock, which the page-fault thread needs: use map")  # fmt: skip
    reason = kvm_available()
    if reason is not None:
        raise UsageError(f"{mf.path} holds a KVM guest, and KVM cannot run here: {reason}")
    memory = mmap.mmap(-1, block.used_length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        loader = LazyLoader(mf, block, memory, lazy)
    except BaseException:
        memory.close()
        raise
    try:
        loader.install_now([PARAMS_ADDR // PAGE_SIZE, STATUS_PAGE])  # what the VMM itself reads
        vm = MicroVM.from_state(cpu, mem_mib, rate=rate, dirty_log=dirty_log, memory=memory)
    except BaseException:
        loader.close()
        memory.close()
        raise
    vm.lazy = loader
    loader.start()
    present = int(np.count_nonzero(block.present))
    return vm, cpu, GuestRestoreReport("lazy", block.used_length, time.perf_counter() - t0, block.num_pages, 0,
                                       block.num_pages - present, 0, 0, False)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResetReport:
    """One repeat restore: what was put back, and how long it took."""

    mode: str
    pages: int
    pages_rewritten: int  # pages the guest wrote since the last restore, put back from the file
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RestoreLoop:
    """A guest restored from one file, then restored again as often as wanted, at the cost
    of what it changed: :meth:`reset` pauses it, puts back the pages it wrote since the
    last restore and its vCPU state, and leaves it paused (``vm.resume()`` runs it on).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str = "map",
        rate: float | None = None,
        options: EngineOptions = DEFAULTS,
        seal: SealOptions = SEAL_CHECK,
    ) -> None:
        self.mf = open_file(path)
        try:
            self.vm, self.cpu, self.report = restore_guest(self.mf, mode=mode, rate=rate, dirty_log=True,
                                                           options=options, seal=seal)  # fmt: skip
        except BaseException:
            self.mf.close()
            raise
        try:
            self.mode = mode
            loader = getattr(self.vm, "lazy", None)
            if loader is not None and (not loader.wait_resident(600) or loader.error is not None):
                raise loader.error or UsageError("the lazy restore did not become resident")
            self._block = self.mf.block(self.vm.ram_idstr)
            self._stale = stale_slots(self.mf, self._block).pages if mode == "map" else None
            self.vm.dirty_pages()  # the log starts at the restore
        except BaseException:
            self.close()
            raise

    def reset(self) -> ResetReport:
        """Restore the guest again from the file: only the pages it wrote since the last
        restore, and its vCPU state. The guest is paused first and stays paused."""
        t0 = time.perf_counter()
        if self.vm.first_entry is not None:
            self.vm.pause()
        dirty = np.asarray(self.vm.dirty_pages(), dtype=np.bool_)
        ps = self._block.page_size
        starts, lengths = bit_runs(dirty)
        if self.mode == "map":
            memory = self.vm.memory
            for s, n in zip(starts.tolist(), lengths.tolist()):
                memory.madvise(mmap.MADV_DONTNEED, s * ps, n * ps)  # back to the file's bytes
            assert self._stale is not None
            again = dirty & self._stale
            if again.any():
                view = np.frombuffer(memory, dtype=np.uint8).reshape(-1, ps)
                view[again] = 0
                del view
        else:
            # gather the written pages' file data in large reads, then put each in its place
            pages = np.frombuffer(self.vm.memory, dtype=np.uint8).reshape(-1, ps)
            which = np.flatnonzero(dirty)
            buf = bytearray(min(len(which), _RESET_CHUNK) * ps)
            for at in range(0, len(which), _RESET_CHUNK):
                part = which[at : at + _RESET_CHUNK]
                chunk = memoryview(buf)[: len(part) * ps]
                self.mf.read_page_list(self._block, part, chunk)
                pages[part] = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, ps)
            del pages
        self.vm.rewind(self.cpu)
        return ResetReport(self.mode, self._block.num_pages, int(np.count_nonzero(dirty)),
                           time.perf_counter() - t0)  # fmt: skip

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            self.mf.close()

    def __enter__(self) -> RestoreLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

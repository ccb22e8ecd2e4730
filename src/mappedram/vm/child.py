"""``vm save --parent``: an incremental snapshot of the built-in guest (ops/chain.py).

The guest is restored from the parent with its writes logged from then on (KVM's dirty
log, or the software guest's own marks), runs on, and is paused; the pages it wrote since
the parent go to a child file, with its vCPU state. The guest stays paused while the
child is written: that is the pause the report gives (a full save of the same guest
writes every page instead).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mappedram.engine.pages import MemoryPages
from mappedram.format.vmstate import encode_device_state, encode_vmdesc_json
from mappedram.image import open_file
from mappedram.layout import StreamSpec, machine_has_switchover_start
from mappedram.ops.chain import ChildReport, parent_ref, write_child
from mappedram.ops.options import DEFAULTS, EngineOptions
from mappedram.ops.seal import SEAL_CHECK, SealOptions

from .microvm import MicroVM
from .restore import restore_guest

__all__ = ["VmChildReport", "vm_save_child"]

FILL_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class VmChildReport:
    guest: str
    mem_mib: int
    parent: str
    counter_from: int  # the parent's iteration
    counter: int  # the child's
    run_seconds: float
    pause_seconds: float  # guest paused until the child was written (and synced)
    pages_dirty: int
    child: ChildReport
    source_check: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.source_check["ok"])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def vm_save_child(
    path: str | os.PathLike[str],
    parent: str | os.PathLike[str],
    *,
    warmup: float = 1.0,
    warmup_iterations: int | None = None,
    rate: float | None = None,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
    parent_seal: SealOptions = SEAL_CHECK,
) -> VmChildReport:
    """Restore the guest from ``parent``, let it run ``warmup`` seconds (or exactly
    ``warmup_iterations``), pause it and write a child of ``parent`` holding the pages it
    wrote since (``seal`` seals the child)."""
    target = os.fspath(path)
    with open_file(parent) as pmf:
        ref = parent_ref(pmf, target, options)
        vm, cpu, _ = restore_guest(pmf, mode="eager", rate=rate, dirty_log=True, options=options.replace(
            progress=None, on_start=None), seal=parent_seal)  # fmt: skip
        with vm:
            tracker = vm.dirty_tracker()
            tracker.sync()  # the restore's own writes are not the guest's
            t0 = time.perf_counter()
            if warmup_iterations is not None:
                later = vm.run_until(cpu.counter + warmup_iterations, FILL_TIMEOUT)
            else:
                vm.resume()
                time.sleep(warmup)
                later = vm.pause()
            ran = time.perf_counter() - t0
            paused_at = time.perf_counter()
            dirty = np.asarray(tracker.sync(), dtype=np.bool_)
            state, devices = encode_device_state([later.record()], first_section_id=pmf.ram_section_id + 1)
            machine = pmf.machine_type or ""
            base = StreamSpec(machine_type=machine, capabilities=("mapped-ram",), ram_section_id=pmf.ram_section_id,
                              switchover_start=machine_has_switchover_start(machine), device_state=state,
                              vmdesc=encode_vmdesc_json(devices, page_size=pmf.page_size))  # fmt: skip
            size = len(memoryview(vm.memory).cast("B"))
            child = write_child(target, pmf, [(vm.ram_idstr, size, MemoryPages(memoryview(vm.memory).cast("B")))],
                                [dirty], base, options=options, seal=seal, ref=ref)  # fmt: skip
            pause = time.perf_counter() - paused_at
            check = vm.check(later).to_dict()
            mem_mib = size >> 20
            kind = "kvm" if isinstance(vm, MicroVM) else "soft"
    return VmChildReport(kind, mem_mib, pmf.path, cpu.counter, later.counter, ran, pause,
                         int(np.count_nonzero(dirty)), child, check)  # fmt: skip

"""The built-in guests' settings the CLI offers before it runs anything: guest kinds, restore
modes and the live-save defaults (kept apart from :mod:`.ops`, which loads KVM and the guests)."""

from __future__ import annotations

from mappedram.ops.converge import AutoConverge
from mappedram.ops.options import EngineOptions, LiveOptions

__all__ = ["GUEST_KINDS", "RESTORE_MODES", "VM_LIVE_DEFAULTS", "DEMO_OPTIONS"]

GUEST_KINDS = ("auto", "kvm", "software")
#: How a guest's RAM comes back (:mod:`.restore`).
RESTORE_MODES = ("eager", "map", "lazy")
#: How a live save of the built-in guest iterates by default: auto-converge on, and
#: enough passes for QEMU's throttle ramp (20 % + 10 % every second high pass) to reach 99 %.
VM_LIVE_DEFAULTS = LiveOptions(max_passes=30, downtime_limit=0.3, auto_converge=AutoConverge())
#: The demo's page I/O: O_DIRECT where the filesystem takes it and it is faster there.
DEMO_OPTIONS = EngineOptions()

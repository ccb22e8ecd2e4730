"""Auto-converge: slow the guest down until a live save can finish within its downtime limit.

Theory of operation (QEMU migration/ram.c, migration_trigger_throttle and
mig_throttle_guest_down; system/cpu-throttle.c, cpu_throttle_thread):

* At each dirty-bitmap sync the saver compares the bytes the guest dirtied during the
  pass just written with the bytes that pass sent. When the dirtied bytes exceed
  ``throttle_trigger_threshold`` percent of the sent bytes, a counter goes up; when it
  reaches 2 it is reset and the guest is throttled down: the first time to
  ``cpu_throttle_initial`` percent, then ``cpu_throttle_increment`` more each time (with
  ``cpu_throttle_tailslow``, by no more than what would bring the dirty rate to the
  threshold), up to ``max_cpu_throttle``. The counter is not reset by a calm pass (QEMU's
  ``dirty_rate_high_cnt`` is only ever incremented or reset after throttling).
* A throttle of ``pct`` percent means the guest sleeps ``pct / (100 - pct)`` times as long
  as it ran: QEMU sleeps a vCPU ``throttle_ratio * CPU_THROTTLE_TIMESLICE_NS`` after each
  timeslice it ran; the built-in guests sleep that share of each batch's run time
  (:meth:`mappedram.vm.guest.Guest.set_throttle`).

QEMU evaluates the rule at the first bitmap sync after at least a second (over the syncs
of that second: ``migration_bitmap_sync``); here each live pass is one period, so passes
shorter than a second ramp the throttle sooner than QEMU would.

This module is the policy only (numbers in, a percentage out); :mod:`.live` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mappedram.errors import UsageError

__all__ = ["AutoConverge", "ThrottleController", "CpuThrottle", "throttle_sleep"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoConverge:
    """QEMU's auto-converge parameters, with QEMU's names and defaults (migration/options.c)."""

    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99

    def __post_init__(self) -> None:
        # reference: migrate_params_check (the same ranges QEMU accepts)
        for name, lo, hi in (
            ("throttle_trigger_threshold", 1, 100),
            ("cpu_throttle_initial", 1, 99),
            ("cpu_throttle_increment", 1, 99),
            ("max_cpu_throttle", 1, 99),
        ):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise UsageError(f"{name.replace('_', '-')} must be {lo} .. {hi}, got {value}")
        if self.cpu_throttle_initial > self.max_cpu_throttle:
            # QEMU would set the initial throttle above the maximum; refuse that instead
            raise UsageError(
                f"cpu-throttle-initial ({self.cpu_throttle_initial}) must not exceed"
                f" max-cpu-throttle ({self.max_cpu_throttle})"
            )


class CpuThrottle(Protocol):
    """What a live save needs of the writer it throttles (the built-in guests implement it)."""

    def set_throttle(self, pct: int) -> None:
        """Sleep ``pct / (100 - pct)`` of the time run from now on (0: run freely)."""
        ...

    def run_seconds(self) -> float:
        """Seconds the writer has run so far, its throttle sleeps and pauses excluded."""
        ...

    @property
    def throttle(self) -> int:
        """The throttle in force, in percent."""
        ...


def throttle_sleep(ran: float, pct: int) -> float:
    """How long to sleep after running ``ran`` seconds at ``pct`` percent (cpu_throttle_thread)."""
    if pct <= 0:
        return 0.0
    return ran * pct / (100 - pct)


class ThrottleController:
    """The throttle decision at each sync (``migration_trigger_throttle``)."""

    def __init__(self, params: AutoConverge) -> None:
        self.params = params
        self.pct = 0  # the throttle in force (cpu_throttle_get_percentage)
        self.dirty_rate_high_cnt = 0

    # reference: migration_trigger_throttle
    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int) -> int:
        """The throttle to apply after a pass that sent ``bytes_xfer_period`` bytes while the
        guest dirtied ``bytes_dirty_period``."""
        bytes_dirty_threshold = bytes_xfer_period * self.params.throttle_trigger_threshold // 100
        if bytes_dirty_period > bytes_dirty_threshold:
            self.dirty_rate_high_cnt += 1
            if self.dirty_rate_high_cnt >= 2:
                self.dirty_rate_high_cnt = 0
                self._throttle_guest_down(bytes_dirty_period, bytes_dirty_threshold)
        return self.pct

    # reference: mig_throttle_guest_down
    def _throttle_guest_down(self, bytes_dirty_period: int, bytes_dirty_threshold: int) -> None:
        p = self.params
        if self.pct == 0:
            self.pct = p.cpu_throttle_initial
            return
        if not p.cpu_throttle_tailslow:
            throttle_inc = p.cpu_throttle_increment
        else:
            cpu_now = 100 - self.pct
            cpu_ideal = int(cpu_now * (bytes_dirty_threshold / bytes_dirty_period))  # uint64_t in QEMU
            throttle_inc = min(cpu_now - cpu_ideal, p.cpu_throttle_increment)
        self.pct = min(self.pct + throttle_inc, p.max_cpu_throttle)

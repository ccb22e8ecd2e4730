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

Dirty-limit (QEMU's ``dirty-limit`` capability, migration.c migration_dirty_limit_guest;
system/dirtylimit.c) is the other way QEMU makes a save converge, and it conflicts with
auto-converge (migrate_caps_check): the same rule fires, and from then on the guest's dirty
page rate is held to ``vcpu_dirty_limit`` MB/s instead of being cut by fixed steps. QEMU
measures each vCPU's dirty rate every ``x-vcpu-dirty-limit-period`` and adjusts its sleep
towards the quota (dirtylimit_set_throttle: sleep ``(current - quota) / current`` of the
time, at most 99 %); here each pass is the period, and the rate is measured per second the
guest ran, so the sleep share that holds it to the quota is computed at once:
``1 - quota / rate``, at most 99 % (DIRTYLIMIT_THROTTLE_PCT_MAX). QEMU offers it only with
KVM's dirty ring; the built-in guests apply it as they apply a throttle.

Dirty-limit from the start (``DirtyLimit(from_start=True)``) is what a QEMU user gets with
``set-vcpu-dirty-limit`` (system/dirtylimit.c qmp_set_vcpu_dirty_limit) issued before
``migrate``: the quota holds from pass 1 on, with no trigger to wait for. The rule needs a
rate before there is a pass to measure it by, so the saver measures one first as
``calc-dirty-rate`` does in its dirty-bitmap mode (migration/dirtyrate.c
calculate_dirtyrate_dirty_bitmap: sync, wait ``calc-time``, sync, count): the pages dirtied
in ``sample_seconds`` per second the guest ran. A guest that dirties its RAM faster than one
pass writes it would otherwise redirty most of it during pass 1 and rewrite it pass after
pass; held from the start, pass 1 sees few pages redirtied and the save converges after it.

This module is the policy only (numbers in, a percentage out); :mod:`.live` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mappedram.errors import UsageError

__all__ = [
    "AutoConverge",
    "DirtyLimit",
    "Converger",
    "SamplesFirst",
    "ThrottleController",
    "DirtyLimitController",
    "CpuThrottle",
    "throttle_sleep",
    "dirty_limit_throttle",
    "DIRTYLIMIT_THROTTLE_PCT_MAX",
]

#: The largest share of its time a dirty-limited vCPU sleeps, in percent (system/dirtylimit.c).
DIRTYLIMIT_THROTTLE_PCT_MAX = 99
MiB = 1 << 20


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

    def controller(self) -> Converger:
        return ThrottleController(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DirtyLimit:
    """QEMU's dirty-limit capability and its parameter, with QEMU's names and defaults
    (migration/options.c): once the trigger rule fires, the guest's dirty page rate is held
    to ``vcpu_dirty_limit`` MB/s (MiB per second, as QEMU's dirty rates)."""

    throttle_trigger_threshold: int = 50
    vcpu_dirty_limit: int = 1
    #: The quota holds from pass 1 on, as ``set-vcpu-dirty-limit`` before ``migrate``: no trigger.
    from_start: bool = False
    #: With ``from_start``: seconds the dirty rate is measured over before pass 1
    #: (calc-dirty-rate's calc-time; 0 for a writer that advances at each sync).
    sample_seconds: float = 0.05

    def __post_init__(self) -> None:
        # reference: migrate_params_check
        if not 1 <= self.throttle_trigger_threshold <= 100:
            raise UsageError(f"throttle-trigger-threshold must be 1 .. 100, got {self.throttle_trigger_threshold}")
        if self.vcpu_dirty_limit < 1:
            raise UsageError(f"vcpu-dirty-limit must be at least 1 MB/s, got {self.vcpu_dirty_limit}")
        if not 0 <= self.sample_seconds <= 60:  # calc-dirty-rate measures for 60 s at most
            raise UsageError(f"the dirty-rate sample must be 0 .. 60 s, got {self.sample_seconds}")

    def controller(self) -> Converger:
        return DirtyLimitController(self)


class Converger(Protocol):
    """A throttle policy: after each pass, the throttle the guest runs the next one at."""

    pct: int

    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int, dirty_rate: float = 0.0) -> int:
        """``dirty_rate``: bytes the guest dirtied per second it ran during the pass."""
        ...


@runtime_checkable
class SamplesFirst(Protocol):
    """A throttle policy that wants the writer's dirty rate before pass 1 (the saver then
    syncs, waits ``sample_seconds``, syncs, and applies what ``before_first_pass`` returns)."""

    #: None: no sample (the policy acts after pass 1 only)
    sample_seconds: float | None

    def before_first_pass(self, dirty_rate: float) -> int:
        """The throttle of pass 1, given the bytes the writer dirtied per second it ran."""
        ...


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
    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int, dirty_rate: float = 0.0) -> int:
        """The throttle to apply after a pass that sent ``bytes_xfer_period`` bytes while the
        guest dirtied ``bytes_dirty_period`` (``dirty_rate`` is not used by this rule)."""
        bytes_dirty_threshold = bytes_xfer_period * self.params.throttle_trigger_threshold // 100
        if _triggered(self, bytes_dirty_period, bytes_dirty_threshold):
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


class _Counter(Protocol):
    dirty_rate_high_cnt: int


def _triggered(state: _Counter, bytes_dirty_period: int, bytes_dirty_threshold: int) -> bool:
    """The trigger of migration_trigger_throttle: a second period whose dirtied bytes exceed the threshold."""
    if bytes_dirty_period > bytes_dirty_threshold:
        state.dirty_rate_high_cnt += 1
        if state.dirty_rate_high_cnt >= 2:
            state.dirty_rate_high_cnt = 0
            return True
    return False


def dirty_limit_throttle(dirty_rate: float, quota_mb_s: int) -> int:
    """The throttle, in percent, that holds a writer dirtying ``dirty_rate`` bytes per second
    it runs to ``quota_mb_s`` MiB per second (the sleep share of dirtylimit_set_throttle)."""
    current = dirty_rate / MiB
    if current <= quota_mb_s:
        return 0
    return min(math.ceil(100 * (1 - quota_mb_s / current)), DIRTYLIMIT_THROTTLE_PCT_MAX)


class DirtyLimitController:
    """The dirty-limit decision at each sync (migration_trigger_throttle's dirty-limit branch,
    then dirtylimit_adjust_throttle at every later period)."""

    def __init__(self, params: DirtyLimit) -> None:
        self.params = params
        self.pct = 0
        self.dirty_rate_high_cnt = 0
        # dirtylimit_in_service: the limit was set (migration_dirty_limit_guest, or
        # set-vcpu-dirty-limit before the save)
        self.in_service = params.from_start
        self.sample_seconds = params.sample_seconds if params.from_start else None

    # reference: qmp_set_vcpu_dirty_limit, then dirtylimit_set_throttle with calc-dirty-rate's figure
    def before_first_pass(self, dirty_rate: float) -> int:
        """With ``from_start``: the throttle that holds the rate measured before pass 1 to the quota."""
        if self.in_service:
            self.pct = dirty_limit_throttle(dirty_rate, self.params.vcpu_dirty_limit)
        return self.pct

    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int, dirty_rate: float = 0.0) -> int:
        """The throttle to apply after a pass that sent ``bytes_xfer_period`` bytes while the
        guest dirtied ``bytes_dirty_period``, at ``dirty_rate`` bytes per second it ran."""
        bytes_dirty_threshold = bytes_xfer_period * self.params.throttle_trigger_threshold // 100
        if _triggered(self, bytes_dirty_period, bytes_dirty_threshold):
            self.in_service = True
        if self.in_service:
            self.pct = dirty_limit_throttle(dirty_rate, self.params.vcpu_dirty_limit)
        return self.pct

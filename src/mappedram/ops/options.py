"""The engine options every operation that moves pages takes, as one object.

An operation takes ``options: EngineOptions`` (default :data:`DEFAULTS`) instead of
loose keyword arguments, so the CLI, the vm operations and library callers pass the same
six settings the same way, and mypy sees the whole boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mappedram.errors import UsageError

from .converge import AutoConverge, Converger, DirtyLimit

__all__ = [
    "EngineOptions",
    "DEFAULTS",
    "DEFAULT_CHANNELS",
    "Progress",
    "OnStart",
    "FORMATS",
    "LiveOptions",
    "LIVE_DEFAULTS",
    "PassStats",
    "DirtySample",
    "DirectIo",
    "DIRECT_IO_MODES",
    "direct_mode",
    "CONVERT_FORMATS",
    "EXPORT_FORMATS",
    "DEFAULT_MACHINE",
    "SEAL_ALGORITHMS",
]

#: Called with the bytes of RAM each finished piece of work covered.
Progress = Callable[[int], None]
#: Called once, before the first page moves, with the total bytes the operation will cover.
OnStart = Callable[[int], None]

#: The choices the operations offer, here so the CLI lists them without loading the operations.
#: Formats ``convert`` writes.
CONVERT_FORMATS = ("mapped-ram", "legacy")
#: Formats ``export`` writes.
EXPORT_FORMATS = ("elf", "raw")
#: The machine type a save writes unless told otherwise.
DEFAULT_MACHINE = "pc-q35-10.0"
#: A seal's digests, the default first (format/seal.py ALGORITHMS, which tests hold equal).
SEAL_ALGORITHMS = ("blake3", "sha256")

#: How page I/O meets the page cache: "auto" (O_DIRECT where the filesystem takes it and it
#: is faster there), "on" or "off"; True and False mean "on" and "off".
DirectIo = Literal["auto", "on", "off"] | bool
DIRECT_IO_MODES = ("auto", "on", "off")


def direct_mode(value: DirectIo) -> str:
    """``value`` as one of :data:`DIRECT_IO_MODES`."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in DIRECT_IO_MODES:
        raise ValueError(f"direct_io must be one of {', '.join(DIRECT_IO_MODES)} (or a bool), got {value!r}")
    return value


#: Parallel channels (threads, each with its own file descriptors) unless told otherwise.
DEFAULT_CHANNELS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineOptions:
    """How an operation moves pages.

    Args:
        channels: parallel channels (threads with their own descriptors and buffers).
        direct_io: page I/O with O_DIRECT, bypassing the page cache: "auto" (the default:
            where the filesystem takes it and a probe found it faster there), "on" or "off"
            (or True, False). Reports say what was chosen and why.
        direct_io_fallback: with ``direct_io`` "on", use the page cache where the filesystem
            refuses O_DIRECT (the report says so) instead of failing.
        durable: fsync the file and its directory before a save reports success.
        progress: called with the RAM bytes each finished piece of work covered.
        on_start: called once with the total bytes, before the first page moves.
    """

    channels: int = DEFAULT_CHANNELS
    direct_io: DirectIo = "auto"
    direct_io_fallback: bool = False
    durable: bool = True
    progress: Progress | None = None
    on_start: OnStart | None = None

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def started(self, total: int) -> None:
        if self.on_start is not None:
            self.on_start(total)


DEFAULTS = EngineOptions()

#: The formats a live save writes.
FORMATS = ("mapped-ram", "legacy")


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveOptions:
    """How a live save iterates (QEMU's migration parameters of the same names).

    Args:
        max_passes: live passes at most before the guest is stopped whatever is left.
        downtime_limit: seconds the final pass (guest stopped) may take: iteration stops
            once the pages left fit it at the bandwidth measured (QEMU's downtime-limit).
        bandwidth_limit: bytes per second written at most (QEMU's max-bandwidth); None: no cap.
        downtime_margin: the share of ``downtime_limit`` the estimated final pass may fill
            (pages left / bandwidth of the last dirty passes). The final pass also writes the
            pages dirtied until the guest stops, the bitmaps and the tail, and a pass's
            bandwidth varies from one to the next: 1.0 is QEMU's rule, the default leaves room.
        auto_converge: throttle the guest when it dirties pages faster than they are sent
            (QEMU's auto-converge capability and its parameters); None: never throttle.
        dirty_limit: instead, hold the guest's dirty rate to a quota once the same rule fires
            (QEMU's dirty-limit capability, which conflicts with auto-converge); None: off.
        throttle_policy: instead of either, a policy of one's own: called once per save for
            a :class:`Converger`, whose ``after_pass`` gives the throttle of each next pass.
        on_pass: called with each pass's statistics as it ends.
    """

    max_passes: int = 10
    downtime_limit: float = 0.3
    downtime_margin: float = 0.5
    bandwidth_limit: float | None = None
    auto_converge: AutoConverge | None = None
    dirty_limit: DirtyLimit | None = None
    throttle_policy: Callable[[], Converger] | None = None
    on_pass: Callable[[PassStats], None] | None = None

    def __post_init__(self) -> None:
        if self.auto_converge is not None and self.dirty_limit is not None:
            # reference: migrate_caps_check
            raise UsageError("dirty-limit conflicts with auto-converge: enable one of them")
        if self.throttle_policy is not None and (self.auto_converge or self.dirty_limit) is not None:
            raise UsageError("a throttle policy of one's own replaces auto-converge and dirty-limit: give one")

    def replace(self, **changes: Any) -> LiveOptions:
        return dataclasses.replace(self, **changes)

    def converger(self) -> Converger | None:
        """The throttle policy these options ask for (None: the guest is never throttled)."""
        if self.throttle_policy is not None:
            return self.throttle_policy()
        params = self.auto_converge or self.dirty_limit
        return None if params is None else params.controller()


LIVE_DEFAULTS = LiveOptions()


@dataclass(frozen=True, slots=True)
class PassStats:
    """One pass of a live save."""

    index: int  # 1-based
    stopped: bool  # the final pass, sent with the guest stopped
    pages_sent: int  # pages this pass covered: every page in pass 1, the dirty ones after
    pages_written: int  # of those, non-zero pages written (PAGE records in legacy)
    pages_zero: int  # of those, zero pages (bit cleared / ZERO records)
    bytes_written: int  # bytes this pass added to the file (page data and records)
    seconds: float
    throttle: int  # percent of the guest's time spent asleep (auto-converge) while this pass ran
    pages_dirtied: int  # pages the guest dirtied while this pass ran (0 for the stopped pass)
    run_seconds: float  # seconds the guest ran while this pass ran (throttle sleeps excluded)
    dirty_rate: float  # pages_dirtied per second of guest run time (0 when it did not run)
    direct_io: bool = False  # written with O_DIRECT (pass 1, or a dense pass of dirty pages), not the page cache
    # of pages_dirtied, those this pass wrote itself after they were dirtied: not sent again (ops/passone.py)
    pages_caught: int = 0


@dataclass(frozen=True, slots=True)
class DirtySample:
    """The writer's dirty rate measured before pass 1, for a policy that throttles from the
    start (calc-dirty-rate's figures: migration/dirtyrate.c calculate_dirtyrate_dirty_bitmap)."""

    seconds: float  # wall seconds the sample took (its two syncs included)
    pages_dirtied: int
    run_seconds: float  # seconds the writer ran meanwhile
    dirty_rate: float  # pages_dirtied per second run (0 when it did not run)
    throttle: int  # percent: what the policy set for pass 1 from it

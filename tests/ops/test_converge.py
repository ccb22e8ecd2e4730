"""Auto-converge and dirty-limit: QEMU's throttle rules, pass by pass, and live saves that converge because of them.

The rule is checked against QEMU's own arithmetic (migration/ram.c, migration_trigger_throttle
and mig_throttle_guest_down) on exact numbers; the live saves use a writer that is stepped
before each sync (no thread), whose dirtying shrinks as its throttle grows, so every pass and
every throttle step is the same on any machine. Convergence there is decided by pages left:
with a downtime limit of 0 a save converges exactly when a pass leaves nothing dirty.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mappedram.errors import UsageError
from mappedram.ops import AutoConverge, DirtyLimit, EngineOptions, LiveOptions, OwnerTracker, live_save, restore
from mappedram.ops.converge import (
    DirtyLimitController,
    SamplesFirst,
    ThrottleController,
    dirty_limit_throttle,
    throttle_sleep,
)
from tests.helpers import strategies as mst

PAGE = 4096
MiB = 1 << 20


def test_qemu_defaults_and_ranges() -> None:
    a = AutoConverge()
    assert (a.throttle_trigger_threshold, a.cpu_throttle_initial, a.cpu_throttle_increment, a.max_cpu_throttle) == (
        50, 20, 10, 99)  # fmt: skip
    assert not a.cpu_throttle_tailslow
    for bad in ({"cpu_throttle_initial": 0}, {"max_cpu_throttle": 100}, {"throttle_trigger_threshold": 101},
                {"cpu_throttle_initial": 50, "max_cpu_throttle": 40}):  # fmt: skip
        with pytest.raises(UsageError, match=r"must (be|not exceed)"):
            AutoConverge(**bad)  # type: ignore[arg-type]


def test_throttle_needs_two_high_periods_each_time() -> None:
    """dirty_rate_high_cnt counts periods over the threshold; a calm period does not reset it."""
    c = ThrottleController(AutoConverge())
    sent = 1000
    steps = [(600, 0), (600, 20), (100, 20), (600, 20), (600, 30), (600, 30), (501, 40), (500, 40), (700, 40)]
    got = []
    for dirtied, _ in steps:
        got.append(c.after_pass(dirtied, sent))
    assert got == [want for _, want in steps]  # 500 is not over 50 % of 1000: no count


def test_throttle_stops_at_the_maximum() -> None:
    c = ThrottleController(AutoConverge(max_cpu_throttle=45))  # 20, 30, 40, then 45 at most
    got = [c.after_pass(10, 10) for _ in range(12)]
    assert got == [0, 20, 20, 30, 30, 40, 40, 45, 45, 45, 45, 45]


def test_tailslow_takes_smaller_steps_near_the_threshold() -> None:
    """cpu_ideal = cpu_now * threshold / dirtied; the step is at most the increment."""
    c = ThrottleController(AutoConverge(cpu_throttle_tailslow=True))
    c.after_pass(1000, 1000)
    assert c.after_pass(1000, 1000) == 20  # first time: the initial value
    c.after_pass(520, 1000)
    # cpu_now 80, cpu_ideal = (uint64) 80 * 500 / 520 = 76: the step is 80 - 76 = 4
    assert c.after_pass(520, 1000) == 24
    c.after_pass(4000, 1000)
    assert c.after_pass(4000, 1000) == 34  # far over the threshold: the full increment


@given(mst.auto_converge_params, mst.pass_bytes)
def test_throttle_never_exceeds_its_maximum_nor_goes_down(params: dict[str, object], passes: list[tuple[int, int]]):
    c = ThrottleController(AutoConverge(**params))  # type: ignore[arg-type]
    last = 0
    for dirtied, sent in passes:
        pct = c.after_pass(dirtied, sent)
        assert last <= pct <= c.params.max_cpu_throttle
        assert pct == 0 or pct >= c.params.cpu_throttle_initial
        last = pct


def test_throttle_sleep_is_qemus_ratio() -> None:
    assert throttle_sleep(0.01, 0) == 0.0
    assert throttle_sleep(0.01, 50) == pytest.approx(0.01)
    assert throttle_sleep(0.01, 99) == pytest.approx(0.99)


def test_dirty_limit_defaults_ranges_and_conflict() -> None:
    d = DirtyLimit()
    assert (d.throttle_trigger_threshold, d.vcpu_dirty_limit) == (50, 1)  # QEMU's defaults
    for bad in ({"vcpu_dirty_limit": 0}, {"throttle_trigger_threshold": 0}):
        with pytest.raises(UsageError, match="must be"):
            DirtyLimit(**bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="dirty-limit conflicts with auto-converge"):
        LiveOptions(auto_converge=AutoConverge(), dirty_limit=DirtyLimit())
    assert LiveOptions().converger() is None
    assert isinstance(LiveOptions(dirty_limit=d).converger(), DirtyLimitController)
    assert isinstance(LiveOptions(auto_converge=AutoConverge()).converger(), ThrottleController)


def test_dirty_limit_throttle_is_the_sleep_share_that_meets_the_quota() -> None:
    """A writer dirtying r MiB per second it runs, throttled to pct %, dirties r * (100 - pct) / 100."""
    assert dirty_limit_throttle(0.0, 1) == 0
    assert dirty_limit_throttle(1.0 * MiB, 1) == 0  # at the quota: no sleep
    assert dirty_limit_throttle(2.0 * MiB, 1) == 50
    assert dirty_limit_throttle(4.0 * MiB, 1) == 75
    assert dirty_limit_throttle(3.0 * MiB, 1) == 67  # 66.7 % rounded up: at or under the quota
    assert dirty_limit_throttle(1000.0 * MiB, 1) == 99  # DIRTYLIMIT_THROTTLE_PCT_MAX
    assert dirty_limit_throttle(1000.0 * MiB, 400) == 60


@given(st.floats(0, 1e12), st.integers(1, 10_000))
def test_dirty_limit_meets_its_quota_unless_at_the_maximum(rate: float, quota: int) -> None:
    pct = dirty_limit_throttle(rate, quota)
    assert 0 <= pct <= 99
    if pct < 99:
        assert rate * (100 - pct) / 100 <= quota * MiB * (1 + 1e-12)
    if pct > 0:  # no more sleep than needed: one percent less would exceed the quota
        assert rate * (101 - pct) / 100 > quota * MiB


def test_dirty_limit_fires_by_the_same_rule_then_follows_the_rate() -> None:
    """Nothing until two periods over the threshold (as auto-converge); from then on the
    throttle at every sync is the one that holds the measured rate to the quota, up or down."""
    c = DirtyLimitController(DirtyLimit(vcpu_dirty_limit=1))
    rate = 4.0 * MiB
    assert c.after_pass(600, 1000, rate) == 0  # high once
    assert c.after_pass(100, 1000, rate) == 0  # calm: the count stays
    assert not c.in_service
    assert c.after_pass(600, 1000, rate) == 75  # high twice: the limit is set
    assert c.in_service
    assert c.after_pass(10, 1000, 2.0 * MiB) == 50  # in service: follows the rate, calm or not
    assert c.after_pass(10, 1000, 0.5 * MiB) == 0
    assert c.after_pass(10, 1000, 1000.0 * MiB) == 99


class ThrottledWriter:
    """Writes ``base * (100 - throttle) / 100 - floor`` fresh pages before each sync: a
    writer that a throttle slows down, stepped by the save (no thread, no clock)."""

    def __init__(self, npages: int, base: int, floor: int) -> None:
        self.buf = mmap.mmap(-1, npages * PAGE)
        self.words = np.frombuffer(self.buf, dtype=np.uint64).reshape(-1, PAGE // 8)
        self.words[:] = 1
        self.tracker = OwnerTracker(npages)
        self.base, self.floor = base, floor
        self.pct = 0
        self.throttles: list[int] = []
        self.ran = 0.0
        self.step_no = 0
        self.stopped = False

    # CpuThrottle
    def set_throttle(self, pct: int) -> None:
        self.pct = pct
        self.throttles.append(pct)

    def run_seconds(self) -> float:
        return self.ran

    @property
    def throttle(self) -> int:
        return self.pct

    # DirtyTracker
    @property
    def npages(self) -> int:
        return self.tracker.npages

    def sync(self) -> np.ndarray:
        if not self.stopped:
            n = max(0, self.base * (100 - self.pct) // 100 - self.floor)
            self.step_no += 1
            pages = (np.arange(n) * 7 + self.step_no) % self.npages
            self.words[pages, 0] = self.step_no + 2
            self.tracker.mark_pages(pages)
            self.ran += 1.0  # one "second" of run time per step, for the dirty rate
        return self.tracker.sync()

    def stop(self) -> list[object]:
        self.stopped = True
        return []


def test_auto_converge_throttles_until_the_save_converges(tmp_path: Path) -> None:
    """Unthrottled, the writer dirties 1000 pages a step and never lets the save converge;
    auto-converge raises its throttle (20 %, then +10 % every second high pass) until its
    dirtying stops (at 60 %: 1000 * 40 % - 400 = 0 pages): the save then converges."""
    writer = ThrottledWriter(2048, base=1000, floor=400)
    report = live_save(tmp_path / "a.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop, cpu=writer,
                       live=LiveOptions(max_passes=30, downtime_limit=0.0, auto_converge=AutoConverge()),
                       options=EngineOptions(durable=False))  # fmt: skip
    assert report.converged and report.auto_converge and report.stop_reason == "converged"
    assert not report.ok and not report.downtime_met  # a downtime of 0 s is never met: not OK, and it says so
    assert writer.throttles == [20, 30, 40, 50, 60]
    live = [p for p in report.passes if not p.stopped]
    # Pass 1 sends all 2048 pages: 600 dirtied is under half of it. Each later pass sends the
    # previous pass's dirty set, and every second pass that dirties over half of what it sent
    # raises the throttle. Pass 10 dirties exactly half (100 of 200): not over, not counted.
    assert [p.throttle for p in live] == [0, 0, 0, 20, 20, 30, 30, 40, 40, 50, 50, 50, 60]
    assert [p.pages_dirtied for p in live] == [600, 600, 600, 400, 400, 300, 300, 200, 200, 100, 100, 100, 0]
    assert [p.pages_sent for p in live] == [2048, 600, 600, 600, 400, 400, 300, 300, 200, 200, 100, 100, 100]
    assert [p.dirty_rate for p in live] == [float(p.pages_dirtied) for p in live]  # one second of run per step
    assert report.final_throttle == 60 and report.passes[-1].pages_sent == 0


def test_without_auto_converge_the_same_writer_never_converges(tmp_path: Path) -> None:
    writer = ThrottledWriter(2048, base=1000, floor=400)
    report = live_save(tmp_path / "b.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop, cpu=writer,
                       live=LiveOptions(max_passes=8, downtime_limit=0.0), options=EngineOptions(durable=False))  # fmt: skip
    assert not report.converged and not report.ok and report.stop_reason == "max-passes"
    assert writer.throttles == [] and all(p.throttle == 0 for p in report.passes)
    assert len(report.passes) == 9 and report.passes[-1].pages_sent == 600


def test_auto_converge_needs_the_writers_throttle(tmp_path: Path) -> None:
    writer = ThrottledWriter(16, base=10, floor=0)
    with pytest.raises(UsageError, match="auto-converge needs"):
        live_save(tmp_path / "c.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop,
                  live=LiveOptions(auto_converge=AutoConverge()))  # fmt: skip


class RunTimeWriter(ThrottledWriter):
    """Dirties ``base`` pages per second it runs, and runs ``(100 - throttle) / 100`` of each
    step: its rate per run second stays ``base`` whatever the throttle, as a guest's does."""

    def sync(self) -> np.ndarray:
        if not self.stopped:
            n = self.base * (100 - self.pct) // 100
            self.step_no += 1
            pages = (np.arange(n) * 7 + self.step_no) % self.npages
            self.words[pages, 0] = self.step_no + 2
            self.tracker.mark_pages(pages)
            self.ran += (100 - self.pct) / 100
        return self.tracker.sync()


def test_dirty_limit_holds_the_writers_rate_from_the_trigger_on(tmp_path: Path) -> None:
    """1000 pages per second run is 3.9 MiB/s; at a 1 MB/s limit the writer sleeps 75 % from the
    trigger on and dirties 250 pages a step (0.98 MiB/s), where auto-converge would still be
    at 20 %."""
    writer = RunTimeWriter(4096, base=1000, floor=0)
    report = live_save(tmp_path / "d.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop, cpu=writer,
                       live=LiveOptions(max_passes=6, downtime_limit=0.0, dirty_limit=DirtyLimit()),
                       options=EngineOptions(durable=False))  # fmt: skip
    assert report.dirty_limit == 1 and not report.auto_converge and report.stop_reason == "max-passes"
    live = [p for p in report.passes if not p.stopped]
    # pass 1 sends 4096 pages (1000 dirtied: under half); passes 2 and 3 send 1000 and see 1000
    assert [p.pages_dirtied for p in live] == [1000, 1000, 1000, 250, 250, 250]
    assert [p.throttle for p in live] == [0, 0, 0, 75, 75, 75]
    assert all(p.dirty_rate == pytest.approx(1000.0) for p in live)  # per second run
    assert writer.throttles == [75] and report.final_throttle == 75


def test_dirty_limit_from_the_start_throttles_pass_1_by_a_sampled_rate(tmp_path: Path) -> None:
    """set-vcpu-dirty-limit before migrate: the rate is sampled first (one step: 1000 pages in
    one second run, 3.9 MiB/s), so pass 1 already runs at 75 % and no trigger is waited for;
    with the trigger (the test above) passes 1 to 3 ran at 0 %."""
    writer = RunTimeWriter(4096, base=1000, floor=0)
    limit = DirtyLimit(from_start=True, sample_seconds=0.0)  # the writer advances at each sync
    report = live_save(tmp_path / "s.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop, cpu=writer,
                       live=LiveOptions(max_passes=3, downtime_limit=0.0, dirty_limit=limit),
                       options=EngineOptions(durable=False))  # fmt: skip
    assert report.sample is not None
    assert (report.sample.pages_dirtied, report.sample.run_seconds, report.sample.throttle) == (1000, 1.0, 75)
    assert report.sample.dirty_rate == pytest.approx(1000.0) and report.sample.seconds >= 0
    live = [p for p in report.passes if not p.stopped]
    assert [p.throttle for p in live] == [75, 75, 75]
    assert [p.pages_dirtied for p in live] == [250, 250, 250]
    assert writer.throttles == [75] and report.to_dict()["sample"]["throttle"] == 75
    # the sample's pages went out with pass 1: the file holds every page as the writer left it
    back = bytearray(len(writer.buf))
    restore(report.path, {"pc.ram": back}, zero_absent=True)
    assert back == writer.buf[:]


def test_only_dirty_limit_from_the_start_samples_first() -> None:
    held = DirtyLimitController(DirtyLimit(from_start=True, vcpu_dirty_limit=2))
    assert held.in_service and held.sample_seconds == 0.05 and isinstance(held, SamplesFirst)
    assert held.before_first_pass(8.0 * MiB) == 75 and held.pct == 75
    assert held.after_pass(0, 4096, 1.0 * MiB) == 0  # in service: follows each pass's rate, no trigger
    triggered = DirtyLimitController(DirtyLimit())
    assert triggered.sample_seconds is None and triggered.before_first_pass(8.0 * MiB) == 0
    assert not isinstance(ThrottleController(AutoConverge()), SamplesFirst)
    with pytest.raises(UsageError, match=r"dirty-rate sample must be 0 \.\. 60 s"):
        DirtyLimit(from_start=True, sample_seconds=-1)


def test_dirty_limit_needs_the_writers_throttle(tmp_path: Path) -> None:
    writer = ThrottledWriter(16, base=10, floor=0)
    with pytest.raises(UsageError, match="dirty-limit needs"):
        live_save(tmp_path / "e.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop,
                  live=LiveOptions(dirty_limit=DirtyLimit()))  # fmt: skip


class Recorder:
    """A throttle policy of one's own: 99 % once any pass has run, and what it was told."""

    def __init__(self) -> None:
        self.pct = 0
        self.seen: list[tuple[int, int, float]] = []

    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int, dirty_rate: float = 0.0) -> int:
        self.seen.append((bytes_dirty_period, bytes_xfer_period, dirty_rate))
        self.pct = 99
        return self.pct


def test_a_throttle_policy_of_ones_own_sets_each_next_pass(tmp_path: Path) -> None:
    """The policy is made once per save, told each live pass's figures, and its answer is the
    throttle of the next pass: 99 % from pass 2 on, the earliest a measured rate allows."""
    made: list[Recorder] = []

    def policy() -> Recorder:
        made.append(Recorder())
        return made[-1]

    writer = RunTimeWriter(4096, base=1000, floor=0)
    report = live_save(tmp_path / "f.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop, cpu=writer,
                       live=LiveOptions(max_passes=3, downtime_limit=0.0, throttle_policy=policy),
                       options=EngineOptions(durable=False))  # fmt: skip
    assert len(made) == 1 and not report.auto_converge and report.dirty_limit is None
    live = [p for p in report.passes if not p.stopped]
    assert [p.throttle for p in live] == [0, 99, 99]
    assert [p.pages_dirtied for p in live] == [1000, 10, 10]  # 1000 * 1 % a step once throttled
    assert made[0].seen[0] == (1000 * PAGE, 4096 * PAGE, pytest.approx(1000.0 * PAGE))
    assert writer.throttles == [99] and report.final_throttle == 99
    with pytest.raises(UsageError, match="replaces auto-converge and dirty-limit"):
        LiveOptions(throttle_policy=policy, dirty_limit=DirtyLimit())
    with pytest.raises(UsageError, match="a throttle policy needs"):
        live_save(tmp_path / "g.mig", [("pc.ram", writer.buf)], [writer], stop=writer.stop,
                  live=LiveOptions(throttle_policy=policy))  # fmt: skip

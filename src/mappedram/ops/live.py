"""Live save: write RAM while its owner keeps writing it, in passes that converge.

Theory of operation (QEMU's precopy, migration/migration.c migration_iteration_run and
migration/ram.c ram_save_iterate / migration_bitmap_sync / ram_save_complete):

* Rule 1, sync then send. Each pass first syncs the dirty trackers, then reads and writes
  the pages they named. A write that lands after the sync is named by the next sync, so
  a page is never left stale once the last pass (guest stopped) is written. Pass 1 syncs
  cheap trackers as it goes too (:mod:`.passone`): what a sync names in a chunk pass 1 had
  not started yet is written by pass 1 itself, after that sync, so pass 2 skips it.
* Rule 2, mapped-ram writes in place. Pass 1 writes every non-zero page at its slot; a
  later pass rewrites only dirtied pages at the same slots, and a page that became zero
  only clears its bit. The file is exactly the planned layout (``plan_file``) whatever
  the number of passes: it never grows with the dirty rate.
* Rule 3, legacy appends. The streamed format has no slots: each pass appends its pages
  as PAGE/ZERO records (one PART section per pass, the last pass in the END section), so
  the file grows by every pass's dirty set; the reader applies them in order.
* Rule 4, stop and finish. Iteration ends when the final pass of the pages left is
  expected to fit the downtime limit (QEMU's threshold_size = bandwidth *
  downtime_limit, here with a margin: ``downtime_margin`` of the limit), or when nothing
  is left, or after ``max_passes``. :mod:`.passcost` expects: with O_DIRECT a pass of
  dirty pages goes as page-cache writes of its runs or as O_DIRECT extents merged across
  clean gaps, whichever is faster at the speeds the earlier passes measured (the slower
  of each way's last two), and the final pass is judged the way it would go; without
  O_DIRECT, pages left / the bandwidth of the last passes of dirty pages (pass 1, which
  writes every page in file order, is no measure of how fast scattered pages go). A live
  pass that went by the page cache beside O_DIRECT is written back in the background while
  the next passes run (the closing fsync then waits for little). Then the ``stop`` callback pauses
  the guest and returns its device state; the final pass sends what is still dirty;
  then the bitmaps, the device sections, QEMU_VM_EOF and the vmdesc are written.
* Rule 5, auto-converge (:mod:`.converge`). After each live pass, when the bytes the
  guest dirtied during it exceed the trigger threshold of the bytes it sent, twice, the
  guest is throttled (20 %, +10 % each time, up to 99 %): it then dirties pages slower
  than they are sent, and the set left shrinks until it fits the downtime limit. With
  dirty-limit instead, the same trigger holds the guest's dirty rate to a quota from
  then on (the throttle recomputed from each pass's measured rate). With dirty-limit from
  the start (set-vcpu-dirty-limit before migrate), the saver first measures the guest's
  dirty rate over a short sample (calc-dirty-rate: sync, wait, sync; what it saw dirtied
  is sent by pass 1 anyway) and pass 1 already runs at the throttle that holds it.
* Rule 6, the report tells what happened: the stop reason (converged, or the pass limit
  reached) and the downtime measured against its limit; :attr:`LiveSaveReport.ok` holds
  only when both were met. The dirty rate of a pass is the pages it saw dirtied per
  second the guest ran (its throttle sleeps excluded), not RAM over wall time.
* The save protocol is :mod:`mappedram.ops.protocol`'s: temporary file, fsync, rename,
  fsync of the directory; a failure (in ``stop`` too) leaves nothing at the target.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.engine.autodirect import DirectChoice
from mappedram.engine.executor import Channel, Throttle, run_tasks
from mappedram.engine.fileio import Writeback, allocated_bytes, file_size, pwrite_full
from mappedram.engine.pages import MemoryPages, PageSource, PageWriteChannel, WriteTask
from mappedram.engine.sequential import SequentialWriter
from mappedram.errors import UsageError
from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import TARGET_PAGE_SIZE
from mappedram.format.vmstate import DeviceRecord, encode_device_state, encode_vmdesc_json
from mappedram.layout import StreamSpec, machine_has_switchover_start, plan_file, plan_legacy

from .converge import CpuThrottle, SamplesFirst
from .options import DEFAULTS, FORMATS, LIVE_DEFAULTS, DirtySample, EngineOptions, LiveOptions, PassStats, Progress
from .passcost import DENSE_GAP, EXTENTS, RUNS, PassCosts, pass_shape
from .passone import Chunk, PassOneSync
from .protocol import CHUNK_PAGES, Written, commit, resolve_direct
from .seal import SealOptions, SealReport, sealed_body
from .trackers import DirtyTracker
from .writer import DEFAULT_MACHINE, LEGACY_STAGING, TimedReport, append_records, block_view, check_machine_type

__all__ = ["FORMATS", "LiveOptions", "LIVE_DEFAULTS", "PassStats", "LiveSaveReport", "live_save", "StopGuest"]

#: Writers of a pass of scattered dirty pages (page-cache writes; see _mapped_body).
DIRTY_PASS_CHANNELS = 1
Bits = npt.NDArray[np.bool_]
StopGuest = Callable[[], Sequence[DeviceRecord]]


@dataclass(frozen=True, slots=True)
class LiveSaveReport(TimedReport):
    path: str
    format: str
    file_size: int
    allocated_bytes: int  # what the file occupies on disk (zero pages are holes in mapped-ram)
    planned_size: int | None  # mapped-ram: the layout planner's size (equal to file_size)
    machine_type: str
    ram_bytes: int
    channels: int
    direct_io: bool
    passes: list[PassStats]
    stop_reason: str  # "converged" (the rest fit the downtime limit) or "max-passes"
    downtime: float  # seconds from the stop request to the last byte of the stream
    bandwidth: float  # page bytes per second: the slower of the last two live passes of dirty pages (0: none)
    expected_final: float  # seconds the final pass was expected to take when the guest was stopped (0: not known)
    downtime_limit: float
    bandwidth_limit: float | None
    auto_converge: bool
    final_throttle: int  # percent, when the guest was stopped
    dirty_limit: int | None  # MB/s the guest's dirty rate was held to once dirty-limit fired (None: off)
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    seal: SealReport | None = None  # sealed before it got its name
    direct_io_reason: str = ""  # what chose direct_io for pass 1, and why (ops/protocol.py resolve_direct)
    sample: DirtySample | None = None  # the dirty rate measured before pass 1 (dirty-limit from the start)

    @property
    def growth(self) -> float:
        """File size as a multiple of the RAM it holds."""
        return self.file_size / self.ram_bytes if self.ram_bytes else 0.0

    @property
    def converged(self) -> bool:
        return self.stop_reason == "converged"

    @property
    def downtime_met(self) -> bool:
        return self.downtime <= self.downtime_limit

    @property
    def ok(self) -> bool:
        """The save converged and the guest was stopped no longer than the downtime limit."""
        return self.converged and self.downtime_met

    def to_dict(self) -> dict[str, Any]:
        d = TimedReport.to_dict(self)
        d.update(growth=self.growth, converged=self.converged, downtime_met=self.downtime_met, ok=self.ok)
        return d


class _Loop:
    """The pass loop shared by both formats; ``send`` writes one pass of pages."""

    def __init__(
        self,
        trackers: Sequence[DirtyTracker],
        npages: Sequence[int],
        live: LiveOptions,
        cpu: CpuThrottle | None,
        progress: Progress | None,
    ) -> None:
        self.trackers = trackers
        self.npages = npages
        self.live = live
        self.cpu = cpu
        self.controller = live.converger()
        if self.controller is not None and cpu is not None:
            self.controller.pct = cpu.throttle  # QEMU starts from the throttle in force (cpu_throttle_get_percentage)
        self.throttle = Throttle(live.bandwidth_limit)
        self.progress = progress
        self.passes: list[PassStats] = []
        self.bandwidth = 0.0
        self.rates: list[float] = []  # page bytes per second of each live pass of dirty pages
        self.stop_reason = ""
        # the final pass's expected seconds for a pending dirty set (None: not known); without
        # it, pending bytes / bandwidth (QEMU's rule)
        self.expect: Callable[[list[Bits]], float | None] | None = None
        self.expected_final = 0.0  # what it expected when the guest was stopped (0: not known)
        self.downtime = 0.0
        self.t_stop = 0.0
        self._clock = 0.0  # guest run seconds (or wall seconds) at the last sync
        self.sample: DirtySample | None = None
        # set by a ``send`` that synced the trackers during pass 1 (.passone)
        self.pass_one: PassOneSync | None = None

    def _guest_clock(self) -> float:
        return self.cpu.run_seconds() if self.cpu is not None else time.perf_counter()

    def _sync(self) -> tuple[list[Bits], int, float]:
        """Sync every tracker: the dirty pages, their count, and the guest's run seconds since the last sync."""
        dirty = [t.sync() for t in self.trackers]
        now = self._guest_clock()
        ran, self._clock = now - self._clock, now
        return dirty, sum(int(np.count_nonzero(d)) for d in dirty), ran

    def _record(
        self,
        stopped: bool,
        sent: int,
        result: tuple[int, int, int, bool],
        seconds: float,
        throttle: int,
        dirtied: int,
        ran: float,
        caught: int = 0,
    ) -> PassStats:
        written, zero, nbytes, direct = result
        rate = dirtied / ran if ran > 0 else 0.0
        stats = PassStats(len(self.passes) + 1, stopped, sent, written, zero, nbytes, seconds, throttle, dirtied,
                          ran, rate, direct, caught)  # fmt: skip
        self.passes.append(stats)
        if not stopped and seconds > 0 and written and len(self.passes) > 1:
            # Only passes of dirty pages say how fast the final pass will go: pass 1 writes
            # every page in order, far faster than scattered dirty pages are written.
            self.rates.append(written * TARGET_PAGE_SIZE / seconds)  # page data per second
            # the slower of the last two: one pass's rate varies with what else the machine does
            self.bandwidth = min(self.rates[-2:])
        if self.live.on_pass is not None:
            self.live.on_pass(stats)
        return stats

    # reference: calculate_dirtyrate_dirty_bitmap (sync, wait calc-time, sync), then qmp_set_vcpu_dirty_limit
    def _sample(self) -> None:
        """For a policy that throttles from the start: measure the writer's dirty rate, then
        apply the throttle the policy sets for pass 1 (pass 1 sends every page anyway)."""
        policy = self.controller
        if self.cpu is None or not isinstance(policy, SamplesFirst) or policy.sample_seconds is None:
            return
        t0 = time.perf_counter()
        if policy.sample_seconds > 0:
            time.sleep(policy.sample_seconds)
        _, count, ran = self._sync()
        rate = count / ran if ran > 0 else 0.0
        pct = policy.before_first_pass(rate * TARGET_PAGE_SIZE)
        if pct != self.cpu.throttle:
            self.cpu.set_throttle(pct)
        self.sample = DirtySample(time.perf_counter() - t0, count, ran, rate, pct)

    def _throttle(self) -> int:
        return self.cpu.throttle if self.cpu is not None else 0

    # reference: migration_iteration_run (pending vs threshold), migration_bitmap_sync, ram_save_complete
    def run(
        self, send: Callable[[list[Bits] | None, bool], tuple[int, int, int, bool]], stop: StopGuest
    ) -> Sequence[DeviceRecord]:
        for t in self.trackers:  # start tracking: what was written before is sent in pass 1 anyway
            t.sync()
        self._clock = self._guest_clock()
        self._sample()
        dirty: list[Bits] | None = None
        sent = sum(self.npages)
        while True:
            throttle = self._throttle()
            t0 = time.perf_counter()
            result = send(dirty, False)
            seconds = time.perf_counter() - t0  # the pass alone: the sync that follows is not its cost
            dirty, count, ran = self._sync()
            dirtied = count
            if self.pass_one is not None:  # pass 1 synced as it went: keep only what it wrote before the dirt
                dirty, seen = self.pass_one.finish(dirty)
                self.pass_one = None
                count = sum(int(np.count_nonzero(d)) for d in dirty)
                dirtied = sum(int(np.count_nonzero(d)) for d in seen)
            stats = self._record(False, sent, result, seconds, throttle, dirtied, ran, dirtied - count)
            pending = count * TARGET_PAGE_SIZE
            if self.controller is not None and self.cpu is not None:
                # reference: migration_trigger_throttle (bytes dirtied vs bytes sent in the period)
                # (the bytes of the pages sent: a dense pass also rewrites clean pages, which QEMU never sends)
                pct = self.controller.after_pass(pending, stats.pages_written * TARGET_PAGE_SIZE,
                                                 stats.dirty_rate * TARGET_PAGE_SIZE)  # fmt: skip
                if pct != throttle:
                    self.cpu.set_throttle(pct)
            # reference: migration_iteration_run (pending_size <= threshold_size = bandwidth * downtime_limit)
            budget = self.live.downtime_limit * self.live.downtime_margin
            if self.expect is not None:
                expected = self.expect(dirty)
            else:
                expected = pending / self.bandwidth if self.bandwidth > 0 else None
            self.expected_final = expected or 0.0
            if pending == 0 or (expected is not None and expected <= budget):
                self.stop_reason = "converged"
                break
            if len(self.passes) >= self.live.max_passes:
                self.stop_reason = "max-passes"
                break
            sent = count
        self.t_stop = time.perf_counter()
        records = stop()
        last, _, _ = self._sync()
        final = [a | b for a, b in zip(last, dirty)]
        t0 = time.perf_counter()
        result = send(final, True)
        seconds = time.perf_counter() - t0
        self._record(True, sum(int(np.count_nonzero(d)) for d in final), result, seconds, self._throttle(), 0, 0.0)
        return records


def live_save(
    path: str | os.PathLike[str],
    blocks: Mapping[str, object] | Sequence[tuple[str, object]],
    trackers: Sequence[DirtyTracker],
    *,
    stop: StopGuest,
    format: str = "mapped-ram",
    machine_type: str = DEFAULT_MACHINE,
    ram_section_id: int = 1,
    cpu: CpuThrottle | None = None,
    live: LiveOptions = LIVE_DEFAULTS,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> LiveSaveReport:
    """Save RAM that keeps changing, in passes, as a mapped-ram (or legacy) file QEMU loads.

    ``blocks`` are the guest's RAM buffers (by QEMU block name, largest first) and
    ``trackers`` their dirty trackers, one per block, in the same order. ``stop`` is
    called once, after the last live pass: it must stop every writer of the buffers and
    return the guest's device state (:class:`DeviceRecord` s, written as FULL sections
    with their vmdesc entries). ``cpu`` is the writer's throttle and run-time clock:
    needed for auto-converge and dirty-limit, and it makes the dirty rate a rate per second the writer
    ran (else per wall-clock second). ``live`` says how to iterate and ``options`` how
    pages are written (``progress`` is called with the RAM bytes each piece of work covered).
    The report says whether the save converged and met its downtime limit (:attr:`LiveSaveReport.ok`).
    ``seal`` seals the file once the guest is stopped and the stream complete, before it
    gets its name (not part of the downtime).
    """
    if cpu is None and live.converger() is not None:
        what = ("auto-converge" if live.auto_converge is not None else
                "dirty-limit" if live.dirty_limit is not None else "a throttle policy")  # fmt: skip
        raise UsageError(f"{what} needs the writer's throttle (cpu=)")
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    check_machine_type(machine_type)
    if live.max_passes < 1:
        raise UsageError(f"max_passes must be at least 1, not {live.max_passes}")
    if live.downtime_limit < 0:
        raise UsageError(f"downtime_limit must not be negative, got {live.downtime_limit}")
    if not 0 < live.downtime_margin <= 1:
        raise UsageError(f"downtime_margin must be within (0, 1], got {live.downtime_margin}")
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    if len(trackers) != len(items):
        raise UsageError(f"{len(items)} blocks but {len(trackers)} dirty trackers: give one per block")
    ps = TARGET_PAGE_SIZE
    views: list[tuple[str, memoryview]] = []
    for (name, buf), tracker in zip(items, trackers):
        view = block_view(buf, writable=False, name=name)
        if len(view) == 0 or len(view) % ps:
            raise UsageError(f"block {name!r}: size {len(view)} is not a positive multiple of {ps}")
        if tracker.npages != len(view) // ps:
            raise UsageError(f"block {name!r}: tracker covers {tracker.npages} pages, the block {len(view) // ps}")
        views.append((name, view))
    target = os.fspath(path)
    layout = [(name, len(view)) for name, view in views]
    loop = _Loop(trackers, [size // ps for _, size in layout], live, cpu, options.progress)

    def spec(records: Sequence[DeviceRecord], mapped: bool) -> StreamSpec:
        state, devices = encode_device_state(list(records), first_section_id=ram_section_id + 1)
        return StreamSpec(
            machine_type=machine_type,
            capabilities=("mapped-ram",) if mapped else (),
            ram_section_id=ram_section_id,
            parts=max(1, len(loop.passes) - 1),
            switchover_start=machine_has_switchover_start(machine_type),
            device_state=state,
            vmdesc=encode_vmdesc_json(devices, page_size=ps),
        )

    notes: list[str] = []
    planned: list[int] = []
    if format == "mapped-ram":
        choice = resolve_direct(target, options, "write")
        body = _mapped_body(views, layout, spec, loop, stop, options.channels, choice.direct, planned)
    else:
        choice = DirectChoice(False, "legacy stream: the page cache (its records are not aligned)")
        body = _legacy_body(views, layout, spec, loop, stop)
    written = commit(target, None, options.durable, notes, sealed_body(body, seal, 0, options))
    return LiveSaveReport(
        path=target,
        format=format,
        file_size=written.file_size,
        allocated_bytes=allocated_bytes(target),
        planned_size=planned[0] if planned else None,
        machine_type=machine_type,
        ram_bytes=written.pages * ps,
        channels=written.channels,
        direct_io=choice.direct,
        direct_io_reason=choice.reason,
        passes=loop.passes,
        stop_reason=loop.stop_reason,
        downtime=loop.downtime,
        bandwidth=loop.bandwidth,
        expected_final=loop.expected_final,
        downtime_limit=live.downtime_limit,
        bandwidth_limit=live.bandwidth_limit,
        auto_converge=live.auto_converge is not None,
        dirty_limit=None if live.dirty_limit is None else live.dirty_limit.vcpu_dirty_limit,
        final_throttle=loop.passes[-1].throttle,
        seconds=written.seconds,
        notes=notes,
        seal=None if written.seal is None else dataclasses.replace(written.seal, path=target),
        sample=loop.sample,
    )


def _mapped_body(
    views: list[tuple[str, memoryview]],
    layout: list[tuple[str, int]],
    spec: Callable[[Sequence[DeviceRecord], bool], StreamSpec],
    loop: _Loop,
    stop: StopGuest,
    channels: int,
    direct: bool,
    planned: list[int],
) -> Callable[[int, str], Written]:
    ps = TARGET_PAGE_SIZE
    sources: list[PageSource] = [MemoryPages(v) for _, v in views]

    def body(fd: int, work: str) -> Written:
        t0 = time.perf_counter()
        plan = plan_file(layout, spec([], True))  # page offsets do not depend on the tail
        pwrite_full(fd, plan.head, plan.start, work)
        for at, data in plan.entries:
            pwrite_full(fd, data, at, work)
        bits = [np.zeros(size // ps, dtype=np.bool_) for _, size in layout]
        used = [0]
        costs = PassCosts(direct)
        loop.expect = lambda dirty: costs.expected(pass_shape(dirty, ps))
        writeback = Writeback(fd)

        # reference: ram_save_iterate, ram_find_and_save_block, multifd_queue_page (mapped-ram slots)
        def send(dirty: list[Bits] | None, stopped: bool) -> tuple[int, int, int, bool]:
            tasks = []
            for i, lay in enumerate(plan.ram.blocks):
                n = len(bits[i])
                for first in range(0, n, CHUNK_PAGES):
                    count = min(CHUNK_PAGES, n - first)
                    mask = None if dirty is None else dirty[i][first : first + count]
                    if mask is not None and not mask.any():
                        continue
                    tasks.append(
                        WriteTask(i, first, count, lay.pages_offset + first * ps, bits[i][first : first + count], mask)
                    )
            if not tasks:
                return 0, 0, 0, False
            made: list[PageWriteChannel] = []
            if dirty is None:
                way = EXTENTS if direct else RUNS
            else:
                way = costs.choose(pass_shape(dirty, ps), final=stopped)
            dense = dirty is not None and way == EXTENTS

            early = None
            if dirty is None and PassOneSync.applies(loop.trackers):
                chunks = [Chunk(t.source, t.first_page, t.npages) for t in tasks]
                early = loop.pass_one = PassOneSync(loop.trackers, tasks, chunks, sum(c.count for c in chunks) * ps)

            def make_channel(_: int) -> Channel[WriteTask]:
                ch = PageWriteChannel(work, sources, ps, CHUNK_PAGES, direct=direct, on_write=loop.throttle,
                                      merge_gap=DENSE_GAP, dense=dense, volatile=True)  # fmt: skip
                made.append(ch)
                return ch if early is None else early.channel(ch)

            # Pass 1 writes whole extents, in parallel, and so does a pass of dirty pages that
            # goes by extents (ops/passcost.py). The others write scattered dirty pages through
            # the page cache, where parallel writers only contend for the file's lock
            # (measured, 40,000 random pages: 6.9 us a page with one writer, 12.9 with four).
            width = channels if dirty is None or dense else DIRTY_PASS_CHANNELS
            t0 = time.perf_counter()
            progress = loop.progress if early is None else early.with_progress(loop.progress)
            run_tasks(tasks, make_channel, channels=max(1, min(width, len(tasks))), progress=progress)
            costs.record(way, sum(ch.bytes_written for ch in made), time.perf_counter() - t0, first=dirty is None)
            if direct and way == RUNS and not stopped:
                # A live pass through the page cache beside O_DIRECT goes to the disk in the
                # background while the guest and the next passes run on: the closing fsync
                # waits for less. Once the pass is written, not as it goes: on 2 cores a flush
                # beside the pass slowed it by half, and the guest dirtied more for the next
                # (1 GiB, 6 runs each: 0.99 s in all, downtime 0.085 s; as it goes, 1.04 and
                # 0.114 s). Not without O_DIRECT either: pass 1's gigabytes would then be
                # flushed under the next passes' writes, measured no faster in all.
                writeback.submit(0, 0)
            used[0] = max(used[0], len(made))
            if dirty is None:
                sent = sum(len(b) for b in bits)
                written = sum(int(np.count_nonzero(b)) for b in bits)
            else:
                sent = sum(int(np.count_nonzero(d)) for d in dirty)
                written = sum(int(np.count_nonzero(b & d)) for b, d in zip(bits, dirty))
            return written, sent - written, sum(ch.bytes_written for ch in made), direct and way == EXTENTS

        t1 = time.perf_counter()
        try:
            records = loop.run(send, stop)
            final = plan_file(layout, spec(records, True))
            if final.ram != plan.ram:
                raise AssertionError("the page layout moved with the device state")
            # reference: ram_save_complete (mapped-ram: the bitmaps are written at completion)
            for lay, b in zip(final.ram.blocks, bits):
                pwrite_full(fd, encode_bitmap(b), lay.bitmap_offset, work)
            pwrite_full(fd, final.tail, final.ram.eos_offset, work)
            t2 = time.perf_counter()
        finally:
            writeback.wait()  # the guest stays stopped: like the closing fsync, not downtime
        t3 = time.perf_counter()
        loop.downtime = t2 - loop.t_stop
        size = file_size(fd, work)
        if size != final.file_size:
            raise AssertionError(f"{work}: file is {size} bytes, the layout plans {final.file_size}")
        planned.append(final.file_size)
        return Written(
            pages=sum(len(b) for b in bits),
            pages_written=sum(int(np.count_nonzero(b)) for b in bits),
            bytes_written=sum(p.bytes_written for p in loop.passes),
            channels=used[0],
            file_size=size,
            seconds={"setup": t1 - t0, "live": loop.t_stop - t1, "stopped": t2 - loop.t_stop, "writeback": t3 - t2},
        )

    return body


def _legacy_body(
    views: list[tuple[str, memoryview]],
    layout: list[tuple[str, int]],
    spec: Callable[[Sequence[DeviceRecord], bool], StreamSpec],
    loop: _Loop,
    stop: StopGuest,
) -> Callable[[int, str], Written]:
    ps = TARGET_PAGE_SIZE
    words = [np.frombuffer(v, dtype=np.uint64).reshape(-1, ps // 8) for _, v in views]

    def body(fd: int, work: str) -> Written:
        t0 = time.perf_counter()
        plan = plan_legacy(layout, spec([], False))
        out = SequentialWriter(fd, work, plan.start, buffer_bytes=LEGACY_STAGING)
        out.append(plan.head)

        # reference: ram_save_iterate / ram_save_complete -> ram_save_target_page_legacy
        def send(dirty: list[Bits] | None, stopped: bool) -> tuple[int, int, int, bool]:
            if len(loop.passes) > 0:  # pass 1 follows the PART header ending ``head``
                out.append(plan.end_head if stopped else plan.part_head)
            before = out.offset
            written = sent = 0
            for i, (idstr, _) in enumerate(layout):
                pages = np.arange(len(words[i])) if dirty is None else np.flatnonzero(dirty[i])
                for k in range(0, len(pages), CHUNK_PAGES):
                    chosen = pages[k : k + CHUNK_PAGES]
                    data = words[i][chosen]  # a copy: the records hold one instant of each page
                    nonzero: Bits = np.asarray(data.any(axis=1), dtype=np.bool_)
                    addrs = chosen.astype(np.uint64) * np.uint64(ps)
                    size = append_records(out, idstr if k == 0 else None, addrs, data.view(np.uint8), nonzero)
                    written += int(np.count_nonzero(nonzero))
                    sent += len(chosen)
                    loop.throttle(size)
                    if loop.progress is not None:
                        loop.progress(len(chosen) * ps)
            if not stopped:
                out.append(plan.pass_end)
            out.flush()
            return written, sent - written, out.offset - before, False

        t1 = time.perf_counter()
        try:
            records = loop.run(send, stop)
            out.append(plan_legacy(layout, spec(records, False)).end_tail)
        except BaseException:
            out.discard()  # a failed save never writes its end
            raise
        out.close()
        t2 = time.perf_counter()
        loop.downtime = t2 - loop.t_stop
        final = loop.passes[-1]
        return Written(
            pages=sum(len(w) for w in words),
            pages_written=final.pages_written,
            bytes_written=out.offset - plan.start,
            channels=1,
            file_size=out.offset,
            seconds={"setup": t1 - t0, "live": loop.t_stop - t1, "stopped": t2 - loop.t_stop},
        )

    return body

"""Pass 1 syncs the trackers as it goes and keeps for pass 2 only the dirt behind it
(ops/passone.py): a page dirtied ahead of pass 1 goes out with its new bytes in pass 1
itself. What must hold: what is dropped was read after the sync that named it, so the
file still holds the RAM at the stop point; what is kept is exactly the rest."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from mappedram import ops
from mappedram.ops import EngineOptions, LiveOptions
from mappedram.ops.live import live_save
from mappedram.ops.passone import Chunk, PassOneSync
from mappedram.ops.protocol import CHUNK_PAGES
from mappedram.ops.trackers import CompareTracker, OwnerTracker, syncs_cheaply
from tests.ops.test_live import PAGE, ScriptedTracker, SteppingTracker, Writer, _assert_same, _file_ram, _ram


class _Task:
    pass


class _Recorder:
    def __init__(self) -> None:
        self.ran: list[object] = []

    def run(self, task: object) -> int:
        self.ran.append(task)
        return 0

    def close(self) -> None:
        pass


def test_a_sync_drops_the_dirt_of_chunks_not_started() -> None:
    owner = OwnerTracker(64)
    tasks = [_Task() for _ in range(8)]
    chunks = [Chunk(0, 8 * k, 8) for k in range(8)]
    p1 = PassOneSync([owner], tasks, chunks, total=64 * PAGE, syncs=8)  # a sync every 8 pages' worth
    inner = _Recorder()
    ch = p1.channel(inner)
    for k in (0, 1, 2):
        ch.run(tasks[k])  # started (and run) before the sync: their dirt is kept
    assert inner.ran == tasks[:3]
    owner.mark_pages(np.array([3, 17, 20, 40, 63]))  # behind: 3, 17, 20; ahead: 40, 63
    p1.progress(8 * PAGE)
    assert p1.syncs == 1
    np.testing.assert_array_equal(np.flatnonzero(p1.kept[0]), [3, 17, 20])
    np.testing.assert_array_equal(np.flatnonzero(p1.seen[0]), [3, 17, 20, 40, 63])
    p1.progress(PAGE)  # not yet the next step
    assert p1.syncs == 1
    ch.run(tasks[5])  # out of order: started, so kept
    owner.mark_pages(np.array([41, 44]))  # ahead, chunk 5 started: 44 is kept, 41 (chunk 5) too
    owner.mark_pages(np.array([33]))  # chunk 4: not started, dropped
    p1.progress(7 * PAGE)
    assert p1.syncs == 2
    np.testing.assert_array_equal(np.flatnonzero(p1.kept[0]), [3, 17, 20, 41, 44])
    owner.mark_pages(np.array([60]))
    kept, seen = p1.finish([owner.sync()])  # the sync after pass 1 keeps everything it names
    np.testing.assert_array_equal(np.flatnonzero(kept[0]), [3, 17, 20, 41, 44, 60])
    np.testing.assert_array_equal(np.flatnonzero(seen[0]), [3, 17, 20, 33, 40, 41, 44, 60, 63])


def test_the_syncs_stop_before_the_end_of_the_pass() -> None:
    owner = OwnerTracker(16)
    tasks = [_Task() for _ in range(16)]
    p1 = PassOneSync([owner], tasks, [Chunk(0, k, 1) for k in range(16)], total=16 * PAGE, syncs=4)
    for _ in range(16):
        p1.progress(PAGE)
    assert p1.syncs == 3  # at 4, 8 and 12 pages; the fourth is the sync after the pass


def test_only_cheap_trackers_are_synced_during_pass_1() -> None:
    buf = _ram(1, 10)
    owner = OwnerTracker(len(buf) // PAGE)
    assert syncs_cheaply(owner) and PassOneSync.applies([owner])
    assert not syncs_cheaply(CompareTracker(buf))  # reads all of memory at each sync
    assert not PassOneSync.applies([owner, CompareTracker(buf)]) and not PassOneSync.applies([])


class CheapScripted(ScriptedTracker):
    cheap_sync = True


def test_pass_2_sends_only_the_dirt_behind_pass_1(tmp_path: Path) -> None:
    npages = 4 * CHUNK_PAGES  # pass 1: four tasks, run one after the other (one channel)
    buf = _ram(npages * PAGE >> 20, npages)
    c = CHUNK_PAGES
    behind, ahead = [10, c + 20, 2 * c + 5], [c + 100, 3 * c + 7]
    steps = [
        {"write": [10, c + 100]},  # after task 0: task 1 not started
        {"write": [c + 20, 3 * c + 7]},  # after task 1
        {"write": [2 * c + 5]},  # after task 2: written already
        {}, {},  # the last sync during pass 1, the sync after it
    ]  # fmt: skip
    tracker = CheapScripted(buf, steps)
    out = tmp_path / "p1.mig"
    report = live_save(out, [("pc.ram", buf)], [tracker], stop=list, live=LiveOptions(max_passes=2, downtime_limit=0.0), options=EngineOptions(channels=1, durable=False))  # fmt: skip
    first, second = report.passes[0], report.passes[1]
    assert tracker.syncs >= 6 and not tracker.steps
    assert first.pages_dirtied == len(behind) + len(ahead) and first.pages_caught == len(ahead)
    assert second.pages_sent == len(behind)
    _assert_same(_file_ram(out), bytes(buf))  # the pages dirtied ahead went out in pass 1
    v = ops.verify(out)
    assert v.ok, v.problems


class CheapStepping(SteppingTracker):
    cheap_sync = True


def test_a_running_writer_and_four_channels_leave_the_ram_at_the_stop_point(tmp_path: Path) -> None:
    buf: mmap.mmap = _ram(64, 12000)
    writer = Writer(buf, OwnerTracker(len(buf) // PAGE))
    writer.start()
    out = tmp_path / "live.mig"
    report = live_save(out, {"pc.ram": buf}, [CheapStepping(writer)], stop=writer.stop, live=LiveOptions(max_passes=3, downtime_limit=0.0), options=EngineOptions(channels=4, durable=False))  # fmt: skip
    assert writer.at_stop is not None and len(report.passes) == 4
    assert report.passes[0].pages_dirtied >= report.passes[0].pages_caught >= 0
    assert report.passes[1].pages_sent == report.passes[0].pages_dirtied - report.passes[0].pages_caught
    _assert_same(_file_ram(out), writer.at_stop)

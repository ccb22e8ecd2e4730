"""Live saves: a writer keeps changing the RAM while the passes run.

The writer here is a thread that owns the buffer and marks what it writes
(OwnerTracker), as an emulator would; the KVM guest's own tests are in test_kvm.py and
test_vm.py. What must hold: the file holds exactly the RAM at the stop point, in both
formats; a mapped-ram file is exactly its planned size whatever the number of passes;
a legacy file grows with each pass; the trackers agree with each other.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.errors import UsageError
from mappedram.format.vmstate import DeviceRecord
from mappedram.layout import StreamSpec, plan_file
from mappedram.ops import EngineOptions, LiveOptions
from mappedram.ops import live as live_mod
from mappedram.ops.live import live_save
from mappedram.ops.passcost import EXTENTS, PassCosts
from mappedram.ops.trackers import CompareTracker, OwnerTracker

PAGE = 4096


class Writer:
    """Writes a counter into pseudo-random pages of ``buf`` (8 pages per step), then marks them."""

    def __init__(
        self, buf: mmap.mmap, tracker: OwnerTracker | None = None, *, hot_pages: int | None = None, seed: int = 7
    ) -> None:
        self.words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
        self.tracker = tracker
        self.rng = np.random.default_rng(seed)
        self.hot = hot_pages or len(self.words)
        self.counter = 0
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.at_stop: bytes | None = None
        self.lock = threading.Lock()  # one writer at a time (the thread, or SteppingTracker)

    def step(self, n: int = 8) -> np.ndarray:
        pages = self.rng.integers(0, self.hot, size=n)
        self.counter += 1
        value = np.uint64(self.counter | 1 << 40)  # never a value the fill wrote: every write changes its page
        self.words[pages, 0] = value
        self.words[pages[::2], 1:] = value  # half of them rewritten whole
        if self.tracker is not None:
            self.tracker.mark_pages(pages)  # after the write
        return pages

    def zero(self, pages: np.ndarray) -> None:
        self.words[pages] = 0
        if self.tracker is not None:
            self.tracker.mark_pages(pages)

    def start(self) -> None:
        def run() -> None:
            while not self.stop_event.is_set():
                with self.lock:
                    self.step()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> list[DeviceRecord]:
        self.stop_event.set()
        assert self.thread is not None
        self.thread.join()
        self.at_stop = bytes(memoryview(self.words).cast("B"))
        body = self.counter.to_bytes(8, "big")
        return [DeviceRecord("test-writer", 0, 1, body, ({"name": "counter", "type": "uint64", "size": 8},))]


class SteppingTracker:
    """The writer's tracker, with one more write of the writer before each sync: every pass
    then has pages to send however the threads are scheduled."""

    def __init__(self, writer: Writer) -> None:
        assert writer.tracker is not None
        self.writer, self.tracker = writer, writer.tracker

    @property
    def npages(self) -> int:
        return self.tracker.npages

    def sync(self) -> np.ndarray:
        if not self.writer.stop_event.is_set():
            with self.writer.lock:
                self.writer.step()
        return self.tracker.sync()


def _ram(mib: int, fill_pages: int) -> mmap.mmap:
    buf = mmap.mmap(-1, mib << 20)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
    words[:fill_pages] = np.arange(1, fill_pages + 1, dtype=np.uint64)[:, None]
    return buf


def _file_ram(path: Path, name: str = "pc.ram") -> bytes:
    with mappedram.open_file(path) as f:
        b = f.block(name)
        return f.read_pages(b, 0, b.num_pages)


def _assert_same(actual: bytes, expected: bytes) -> None:
    if actual != expected:
        a = np.frombuffer(actual, np.uint8).reshape(-1, PAGE)
        e = np.frombuffer(expected, np.uint8).reshape(-1, PAGE)
        bad = np.flatnonzero((a != e).any(axis=1))
        pytest.fail(f"{len(bad)} pages differ from the RAM at the stop point, first {bad[:8].tolist()}")


def test_trackers_agree_on_one_workload() -> None:
    buf = _ram(8, 1000)
    owner = OwnerTracker(len(buf) // PAGE)
    shadow = CompareTracker(buf, method="shadow", chunk_pages=300)
    digest = CompareTracker(buf, method="digest", chunk_pages=300)
    writer = Writer(buf, owner)
    assert not owner.sync().any() and not shadow.sync().any() and not digest.sync().any()
    for round_ in range(6):
        written = np.unique(np.concatenate([writer.step(16) for _ in range(50 * (round_ + 1))]))
        if round_ % 2:  # zero five pages that hold data and were not written this round
            nonzero = np.flatnonzero(writer.words.any(axis=1))
            gone = np.setdiff1d(nonzero, written)[:5]
            writer.zero(gone)
            written = np.union1d(written, gone)
        expected = np.zeros(len(buf) // PAGE, dtype=bool)
        expected[written] = True
        got_owner, got_shadow, got_digest = owner.sync(), shadow.sync(), digest.sync()
        np.testing.assert_array_equal(got_owner, expected)
        np.testing.assert_array_equal(got_shadow, expected)
        np.testing.assert_array_equal(got_digest, expected)
    assert not owner.sync().any() and not shadow.sync().any() and not digest.sync().any()


def test_compare_tracker_sees_any_single_word_change() -> None:
    buf = _ram(1, 0)
    digest = CompareTracker(buf, method="digest")
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
    rng = np.random.default_rng(1)
    for _ in range(200):
        page, word = int(rng.integers(0, len(words))), int(rng.integers(0, PAGE // 8))
        words[page, word] ^= np.uint64(1) << np.uint64(int(rng.integers(0, 64)))
        assert np.flatnonzero(digest.sync()).tolist() == [page]


@pytest.mark.parametrize("fmt", ["mapped-ram", "legacy"])
@pytest.mark.parametrize("channels", [1, 4])
def test_live_save_holds_the_ram_at_the_stop_point(tmp_path: Path, fmt: str, channels: int) -> None:
    buf = _ram(32, 4000)
    tracker = OwnerTracker(len(buf) // PAGE)
    writer = Writer(buf, tracker, hot_pages=3000)
    writer.start()
    out = tmp_path / "live.mig"
    seen = []
    report = live_save(out, {"pc.ram": buf}, [SteppingTracker(writer)], stop=writer.stop, format=fmt, live=LiveOptions(max_passes=4, downtime_limit=0.0, on_pass=seen.append), options=EngineOptions(channels=channels, durable=False))
    assert writer.at_stop is not None
    assert report.stop_reason == "max-passes" and len(report.passes) == 5 and report.passes[-1].stopped
    assert seen == report.passes
    assert all(p.pages_sent > 0 for p in report.passes[1:]), report.passes
    assert report.file_size == out.stat().st_size
    v = ops.verify(out)
    assert v.ok, v.problems
    _assert_same(_file_ram(out), writer.at_stop)
    with mappedram.open_file(out) as f:
        assert f.format_name == fmt
        assert f.vmdesc is not None and [d["name"] for d in f.vmdesc.devices] == ["test-writer"]
        (section,) = f.device_sections
        blob = f.device_state()
        start = section.body_offset - section.offset
        assert blob[start : start + 8] == writer.counter.to_bytes(8, "big")


def test_mapped_ram_size_is_the_plan_whatever_the_passes(tmp_path: Path) -> None:
    sizes = []
    for passes in (1, 3, 8):
        buf = _ram(16, 2000)
        tracker = OwnerTracker(len(buf) // PAGE)
        writer = Writer(buf, tracker)
        writer.start()
        report = live_save(tmp_path / f"p{passes}.mig", [("pc.ram", buf)], [SteppingTracker(writer)], stop=writer.stop, live=LiveOptions(max_passes=passes, downtime_limit=0.0), options=EngineOptions(durable=False))
        assert len(report.passes) == passes + 1
        assert report.file_size == report.planned_size == (tmp_path / f"p{passes}.mig").stat().st_size
        _assert_same(_file_ram(tmp_path / f"p{passes}.mig"), writer.at_stop)  # type: ignore[arg-type]
        sizes.append(report.file_size)
    # Only the empty PART sections (18 bytes each, one per live pass after the first, as
    # QEMU writes one per iteration) differ: the page regions never grow.
    assert sizes[1] - sizes[0] == 2 * 18 and sizes[2] - sizes[0] == 7 * 18, sizes
    eos = plan_file([("pc.ram", 16 << 20)], StreamSpec(machine_type="pc-q35-10.0")).ram.eos_offset
    assert all(eos < size < eos + 4096 for size in sizes), (eos, sizes)


def test_legacy_file_grows_with_every_pass(tmp_path: Path) -> None:
    buf = _ram(16, 4096)
    tracker = OwnerTracker(len(buf) // PAGE)
    writer = Writer(buf, tracker)
    writer.start()
    report = live_save(tmp_path / "legacy.mig", [("pc.ram", buf)], [SteppingTracker(writer)], stop=writer.stop, format="legacy", live=LiveOptions(max_passes=6, downtime_limit=0.0), options=EngineOptions(durable=False))
    assert report.planned_size is None
    sent = sum(p.pages_written for p in report.passes)
    assert report.file_size >= sent * PAGE, (report.file_size, sent)
    assert report.file_size > (4096 + sum(p.pages_written for p in report.passes[1:])) * PAGE
    assert report.growth > 1.0
    _assert_same(_file_ram(tmp_path / "legacy.mig"), writer.at_stop)  # type: ignore[arg-type]


def test_converges_when_the_writer_is_idle(tmp_path: Path) -> None:
    buf = _ram(8, 500)
    tracker = OwnerTracker(len(buf) // PAGE)
    report = live_save(tmp_path / "idle.mig", [("pc.ram", buf)], [tracker], stop=list, live=LiveOptions(max_passes=10, downtime_limit=0.3), options=EngineOptions(durable=False))
    assert report.stop_reason == "converged" and len(report.passes) == 2, report.passes
    assert report.passes[-1].pages_sent == 0
    _assert_same(_file_ram(tmp_path / "idle.mig"), bytes(buf))


def test_page_that_became_zero_clears_its_bit(tmp_path: Path) -> None:
    buf = _ram(4, 100)
    tracker = OwnerTracker(len(buf) // PAGE)
    writer = Writer(buf, tracker)

    def stop() -> list[DeviceRecord]:
        writer.zero(np.arange(10, 20))
        return []

    live_save(tmp_path / "z.mig", [("pc.ram", buf)], [tracker], stop=stop, live=LiveOptions(max_passes=1), options=EngineOptions(durable=False))
    with mappedram.open_file(tmp_path / "z.mig") as f:
        block = f.block("pc.ram")
        present = np.asarray(block.present)
        assert present[:10].all() and not present[10:20].any() and present[20:100].all() and not present[100:].any()
        assert block.layout is not None
        pages_offset = block.layout.pages_offset
    _assert_same(_file_ram(tmp_path / "z.mig"), bytes(buf))
    # the slots of the pages that became zero read as zeros (punched), not as their old bytes
    with open(tmp_path / "z.mig", "rb") as f:
        f.seek(pages_offset + 10 * PAGE)
        assert f.read(10 * PAGE) == bytes(10 * PAGE)


def test_bandwidth_limit_is_honoured(tmp_path: Path) -> None:
    buf = _ram(8, 2048)  # 8 MiB of data at 32 MiB/s: at least ~0.25 s
    tracker = OwnerTracker(len(buf) // PAGE)
    report = live_save(tmp_path / "bw.mig", [("pc.ram", buf)], [tracker], stop=list, live=LiveOptions(bandwidth_limit=32 << 20), options=EngineOptions(durable=False, channels=1))
    assert report.passes[0].seconds >= 0.2, report.passes[0]


def test_failed_stop_leaves_no_file(tmp_path: Path) -> None:
    buf = _ram(4, 100)
    tracker = OwnerTracker(len(buf) // PAGE)

    def stop() -> list[DeviceRecord]:
        raise RuntimeError("guest would not stop")

    with pytest.raises(RuntimeError, match="would not stop"):
        live_save(tmp_path / "f.mig", [("pc.ram", buf)], [tracker], stop=stop)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert not (tmp_path / "f.mig").exists()


def test_bad_requests() -> None:
    buf = _ram(1, 0)
    with pytest.raises(UsageError, match="one per block"):
        live_save("x.mig", [("pc.ram", buf)], [], stop=list)
    with pytest.raises(UsageError, match="tracker covers"):
        live_save("x.mig", [("pc.ram", buf)], [OwnerTracker(3)], stop=list)
    with pytest.raises(UsageError, match="unknown format"):
        live_save("x.mig", [("pc.ram", buf)], [OwnerTracker(256)], stop=list, format="qcow2")


# -- QEMU loads what a live save wrote -------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["mapped-ram", "legacy"])
def test_qemu_loads_live_save(tmp_path: Path, fmt: str) -> None:
    """A live save of many passes loads into QEMU (mapped-ram on or off to match); its RAM
    equals the writer's RAM at the stop point."""
    from tests.helpers.qemu_cases import (
        LEGACY,
        MULTIFD4,
        RAM_MIB,
        assert_trailer_like_qemu,
        qemu_destination,
        qemu_load,
        resolved_machine,
    )
    from tests.helpers.qemu_harness import BACKEND_ID, first_mismatch, require_qemu

    qemu_binary = require_qemu()
    buf = _ram(RAM_MIB, 8000)
    tracker = OwnerTracker(len(buf) // PAGE)
    writer = Writer(buf, tracker, hot_pages=12000)
    out = tmp_path / "live.mig"
    with qemu_destination(qemu_binary, "q35", tmp_path) as vm:
        writer.start()
        report = live_save(out, {BACKEND_ID: buf}, [SteppingTracker(writer)], stop=lambda: (writer.stop(), [])[1], format=fmt, machine_type=resolved_machine(vm), live=LiveOptions(max_passes=4, downtime_limit=0.0))
        assert len(report.passes) == 5 and all(p.pages_sent for p in report.passes), report.passes
        assert_trailer_like_qemu(out, "q35")
        qemu_load(vm, out, MULTIFD4 if fmt == "mapped-ram" else LEGACY)
    mismatch = first_mismatch((tmp_path / "dst.ram").read_bytes(), writer.at_stop)
    assert mismatch is None, f"QEMU's RAM after loading the live {fmt} save: {mismatch}"


class ScriptedTracker:
    """Marks what a script writes, one step per sync: the passes see exactly these dirty sets."""

    def __init__(self, buf: mmap.mmap, steps: list[dict[str, np.ndarray]]) -> None:
        self.words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
        self.owner = OwnerTracker(len(self.words))
        self.steps = list(steps)
        self.syncs = 0

    @property
    def npages(self) -> int:
        return self.owner.npages

    def sync(self) -> np.ndarray:
        self.syncs += 1
        if self.syncs > 1 and self.steps:  # the first sync starts tracking
            step = self.steps.pop(0)
            for page in step.get("write", []):
                self.words[page] = np.uint64(0xD1D1 << 20 | self.syncs << 32 | int(page))
            self.words[step.get("zero", [])] = 0
            for key in ("write", "zero"):
                self.owner.mark_pages(np.asarray(step.get(key, []), dtype=np.int64))
        return self.owner.sync()


def _zero_slots_hold_zeros(path: Path) -> None:
    """Every slot whose bit is 0 reads as zeros (the file's clean-zero-slots promise)."""
    with mappedram.open_file(path) as f:
        block = f.block("pc.ram")
        present = np.asarray(block.present)
        assert block.layout is not None
        at = block.layout.pages_offset
    raw = np.fromfile(path, dtype=np.uint8, count=len(present) * PAGE, offset=at).reshape(-1, PAGE)
    stale = np.flatnonzero(~present & raw.any(axis=1))
    assert stale.size == 0, f"{stale.size} slots with bit 0 hold bytes, first {stale[:8].tolist()}"


class FastDisk(PassCosts):
    """Every pass by extents measured as if at 2.4 GB/s, whatever this machine's disk did: which
    way a pass goes is then the cost model's answer alone (tested in
    test_pass_costs_choose_the_cheaper_way), and a test can be about the writing."""

    def record(self, way: str, nbytes: int, seconds: float, *, first: bool = False) -> None:
        super().record(way, nbytes, nbytes / 2.4e9 if way == EXTENTS else seconds, first=first)


def test_dense_dirty_pass_goes_by_o_direct_extents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_mod, "PassCosts", FastDisk)  # pass 1 on a loaded machine may write at < 400 MB/s
    npages = 4096
    buf = _ram(npages * PAGE >> 20, 3000)  # pages 3000.. are zero
    rng = np.random.default_rng(3)
    half = np.flatnonzero(rng.random(npages) < 0.5)  # dense: about every other page
    sparse = np.arange(0, npages, 512)  # 8 pages, far apart
    became_zero = half[half < 3000][::30][:40]  # spread out
    steps = [
        {"write": half, "zero": became_zero[:20]},  # pass 2: dense, some data pages now zero
        {"write": sparse, "zero": became_zero[20:]},  # pass 3: sparse
    ]
    tracker = ScriptedTracker(buf, steps)
    out = tmp_path / "dense.mig"
    report = live_save(out, [("pc.ram", buf)], [tracker], stop=list, live=LiveOptions(max_passes=3, downtime_limit=0.0), options=EngineOptions(direct_io="on", durable=False))  # fmt: skip
    assert [p.direct_io for p in report.passes] == [True, True, False, False], report.passes
    dense = report.passes[1]
    assert dense.pages_sent == len(np.union1d(half, became_zero[:20]))
    assert dense.bytes_written > dense.pages_written * PAGE  # the clean pages between were rewritten
    _assert_same(_file_ram(out), bytes(buf))
    _zero_slots_hold_zeros(out)
    v = ops.verify(out)
    assert v.ok, v.problems


def test_dense_pass_over_stale_slots_writes_zeros(tmp_path: Path) -> None:
    # The pages region starts as 0xAA (what a reused file held): a dense extent must write
    # every page whose bit is 0 as zeros, and every clean page as the RAM holds it.
    from mappedram.engine.pages import MemoryPages, PageWriteChannel, WriteTask

    npages = 256
    ram = np.zeros((npages, PAGE), dtype=np.uint8)
    ram[::3] = 7  # pages 0, 3, 6, ... hold data
    target = tmp_path / "slots"
    target.write_bytes(b"\xaa" * npages * PAGE)
    bits = np.zeros(npages, dtype=np.bool_)
    bits[::3] = True  # as pass 1 left them (the file's bytes do not matter to the channel)
    mask = np.zeros(npages, dtype=np.bool_)
    mask[::2] = True  # dirty: every other page
    ram[10] = 0  # a data page, dirty, now zero: its bit goes to 0
    ram[::4][ram[::4].any(axis=1) == 0] = 9  # some zero pages, dirty, now data
    ram[[1, 5, 7]] = 3  # clean zero pages (bit 0) the guest wrote since the sync: the next pass sends them
    ch = PageWriteChannel(str(target), [MemoryPages(memoryview(ram).cast("B"))], PAGE, npages, direct=True, dense=True, volatile=True)  # fmt: skip
    try:
        ch.run(WriteTask(0, 0, npages, 0, bits, mask))
    finally:
        ch.close()
    expect_bits = np.where(mask, ram.any(axis=1), np.arange(npages) % 3 == 0)
    np.testing.assert_array_equal(bits, expect_bits)
    got = np.fromfile(target, dtype=np.uint8).reshape(npages, PAGE)
    covered = np.arange(npages) <= np.flatnonzero(mask)[-1]  # one extent, from the first dirty page to the last
    np.testing.assert_array_equal(got[covered & bits], ram[covered & bits])
    assert not got[covered & ~bits].any()
    assert (got[~covered] == 0xAA).all()  # past the extent: untouched


def test_page_written_after_its_scan_is_written_as_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A live source: a page found zero, then written by the guest before the copy, must not
    # land in a slot whose bit is 0 (the next pass may find it zero again and leave the slot).
    from mappedram.engine import pages as pages_mod

    npages = 64
    ram = np.zeros((npages, PAGE), dtype=np.uint8)
    ram[:32] = 1  # page 40 is zero, inside the extent merged across pages 32..63
    ram[63] = 1
    scanned = pages_mod.nonzero_pages

    def scan_then_write(view: memoryview, n: int, ps: int) -> np.ndarray:
        found = scanned(view, n, ps)
        ram[40] = 5  # the guest writes it after the scan
        return found

    monkeypatch.setattr(pages_mod, "nonzero_pages", scan_then_write)
    target = tmp_path / "slots"
    target.write_bytes(b"\xaa" * npages * PAGE)
    bits = np.zeros(npages, dtype=np.bool_)
    ch = pages_mod.PageWriteChannel(str(target), [pages_mod.MemoryPages(memoryview(ram).cast("B"))], PAGE, npages, direct=True, volatile=True)  # fmt: skip
    try:
        ch.run(pages_mod.WriteTask(0, 0, npages, 0, bits))
    finally:
        ch.close()
    assert not bits[40] and bits[:32].all() and bits[63]
    got = np.fromfile(target, dtype=np.uint8).reshape(npages, PAGE)
    assert not got[32:63].any()  # page 40 too: as zeros
    assert (got[:32] == 1).all() and (got[63] == 1).all()


def test_pass_costs_choose_the_cheaper_way() -> None:
    from mappedram.ops.passcost import EXTENTS, RUNS, RUNS_PRIOR, PassCosts, pass_shape

    rng = np.random.default_rng(5)
    n = 262_144  # 1 GiB of pages
    half, sixth, rare = (rng.random(n) < f for f in (0.5, 0.16, 0.01))
    s_half, s_sixth, s_rare = (pass_shape([d], PAGE) for d in (half, sixth, rare))
    assert s_half.covered_bytes > 0.999 * n * PAGE and s_sixth.covered_bytes > 0.999 * n * PAGE  # no clean gap of 64
    assert s_rare.dirty_bytes < s_rare.covered_bytes < n * PAGE / 4
    assert pass_shape([np.zeros(10, np.bool_)], PAGE) == pass_shape([], PAGE)

    fast = PassCosts(direct=True)
    assert fast.expected(s_half) is None  # nothing measured yet
    fast.record(RUNS, 1 << 30, 0.5, first=True)  # pass 1 through the page cache: no measure of runs
    assert fast.rate(RUNS) is None
    fast.record(EXTENTS, 1 << 30, 0.45, first=True)  # a 2.4 GB/s disk
    assert fast.choose(s_half, final=False) == EXTENTS
    assert fast.choose(s_sixth, final=False) == EXTENTS  # runs: the writes, then their writeback
    assert fast.choose(s_rare, final=False) == RUNS
    assert fast.expected(s_sixth) == pytest.approx(0.45, rel=1e-3)  # runs unmeasured: extents only
    assert fast.choose(s_sixth, final=True) == EXTENTS  # as expected() judged it, not by the prior

    slow = PassCosts(direct=True)
    slow.record(EXTENTS, 1 << 30, 3.5, first=True)  # a 300 MB/s disk
    assert slow.choose(s_sixth, final=False) == RUNS
    slow.record(RUNS, s_sixth.dirty_bytes, 0.3)
    slow.record(RUNS, s_sixth.dirty_bytes, 0.6)
    assert slow.rate(RUNS) == pytest.approx(s_sixth.dirty_bytes / 0.6)  # the slower of the last two
    assert slow.expected(s_sixth) == pytest.approx(0.6)
    assert slow.choose(s_sixth, final=True) == RUNS

    buffered = PassCosts(direct=False)  # no O_DIRECT: runs only, QEMU's rule
    buffered.record(EXTENTS, 1 << 30, 0.1, first=True)
    assert buffered.choose(s_half, final=False) == RUNS and buffered.expected(s_half) is None
    buffered.record(RUNS, int(RUNS_PRIOR), 1.0)
    assert buffered.expected(s_half) == pytest.approx(s_half.dirty_bytes / RUNS_PRIOR)

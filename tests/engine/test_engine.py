"""The engine alone: positioned I/O that absorbs short transfers and signals, ordered lanes,
and the staging writer of streamed files, buffered and O_DIRECT."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

from mappedram import ops
from mappedram.engine.directio import probe_direct_io
from mappedram.engine.faults import inject
from mappedram.engine.fileio import open_write
from mappedram.engine.sequential import SequentialWriter
from mappedram.errors import IOEngineError
from mappedram.ops import TEMP_MARKER, EngineOptions, restore, save
from tests.helpers import ROOT
from tests.helpers.patterns import random_pages

SRC = ROOT / "src"


def _leftovers(directory: Path) -> list[str]:
    return [p for p in os.listdir(directory) if TEMP_MARKER in p and p.endswith(".tmp")]


def _direct_ok(path: Path) -> None:
    reason = probe_direct_io(str(path))
    if reason is not None:
        pytest.skip(reason)


def test_short_writes_and_reads_and_eintr_are_absorbed(tmp_path):
    data = random_pages(1024, 0.4, 7)
    state = {"calls": 0}

    def choppy(op: str, path: str, offset: int, length: int) -> int | None:
        state["calls"] += 1
        if state["calls"] % 7 == 0:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return max(1, length // 3)  # a short transfer every time

    target = tmp_path / "s.mig"
    with inject(choppy):
        # through the page cache: O_DIRECT would refuse the unaligned rest of a short transfer
        save(target, {"pc.ram": data}, options=EngineOptions(channels=3, direct_io="off"))
        dest = np.zeros_like(data)
        restore(target, {"pc.ram": dest}, options=EngineOptions(channels=3, direct_io="off"))
    assert np.array_equal(dest, data)
    assert ops.verify(target).ok


def test_zero_length_write_is_an_error(tmp_path):
    with (
        inject(lambda op, path, offset, length: 0 if op == "write" else None),
        pytest.raises(IOEngineError, match="no progress"),
    ):
        save(tmp_path / "s.mig", {"pc.ram": random_pages(4, 0.0, 9)})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "s.mig").exists()


def test_lanes_keep_each_lanes_order_and_stop_on_the_first_error():
    from mappedram.engine.executor import Lanes

    seen: dict[int, list[int]] = {}
    closed: list[int] = []

    class Recorder:
        def __init__(self, lane: int) -> None:
            self.lane = lane
            seen[lane] = []

        def run(self, task: int) -> int:
            if task == -1:
                raise OSError(errno.EIO, "injected")
            time.sleep(0.0005 * (task % 3))
            seen[self.lane].append(task)
            return 1

        def close(self) -> None:
            closed.append(self.lane)

    lanes = Lanes(Recorder, lanes=3, depth=2)
    for t in range(300):
        lanes.submit(t % 3, t)
    assert lanes.close() == 300
    assert seen == {k: list(range(k, 300, 3)) for k in range(3)}
    assert sorted(closed) == [0, 1, 2]

    closed.clear()
    with pytest.raises(OSError, match="injected"), Lanes(Recorder, lanes=2, depth=1) as failing:
        for t in [0, 1, -1, *range(2, 10_000)]:
            failing.submit(t % 2 if t >= 0 else 0, t)  # raises once the error is seen
        failing.close()
    assert sorted(closed) == [0, 1]  # every channel is closed, also after the error


@pytest.mark.parametrize("start", [0, 8192])
def test_staging_writer_direct_equals_buffered(tmp_path: Path, start: int) -> None:
    _direct_ok(tmp_path)
    rng = np.random.default_rng(start)
    pieces = [rng.bytes(int(n)) for n in rng.integers(1, 70000, 60)]
    files = {}
    for direct in (False, True):
        path = tmp_path / f"out-{direct}"
        path.write_bytes(b"\x55" * start)
        fd = open_write(str(path), create=False, direct=direct)
        w = SequentialWriter(fd, str(path), start, buffer_bytes=1 << 18, direct=direct)
        for i, p in enumerate(pieces):
            if i % 3:
                w.append(p)
            else:
                room = w.reserve(len(p) + 10)
                room[: len(p)] = p
                room.release()
                w.commit(len(p))
        w.close()
        os.close(fd)
        files[direct] = path.read_bytes()
    assert files[True] == files[False] == b"\x55" * start + b"".join(pieces)
    with pytest.raises(ValueError, match="multiple of 4096"):
        SequentialWriter(-1, "x", 100, direct=True)


def test_huge_buffer_is_aligned_and_sized_and_closes():
    from mappedram.engine.directio import HUGE_PAGE, HugeBuffer, address_of

    buf = HugeBuffer(3 * HUGE_PAGE + 4096)
    assert len(buf.view) == 3 * HUGE_PAGE + 4096 and address_of(buf.view) % HUGE_PAGE == 0
    buf.view[:] = b"\x01" * len(buf.view)
    buf.close()
    with pytest.raises(ValueError):
        buf.view[0]


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_direct_io_save_and_restore_through_huge_buffers_from_unaligned_memory(tmp_path, density):
    # a bytearray's memory is not page-aligned: both directions go through the huge bounce buffers
    data = bytearray(random_pages(3000, density, 11).tobytes())
    target = tmp_path / "d.mig"
    rep = save(target, {"pc.ram": data}, options=EngineOptions(direct_io="on"))
    assert rep.direct_io
    dest = bytearray(len(data))
    got = restore(target, {"pc.ram": dest}, options=EngineOptions(direct_io="on"))
    assert got.direct_io and dest == data


def _dirty_pages(fd: int, length: int) -> int:
    """The file's pages in the page cache still dirty (cachestat(2), Linux 6.5)."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    rng, st = Range(0, length), Stat()
    if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:  # __NR_cachestat on x86-64 and arm64
        pytest.skip(f"cachestat(2) unavailable: {os.strerror(ctypes.get_errno())}")
    return int(st.dirty)


def test_writeback_leaves_no_dirty_page_cache(tmp_path: Path) -> None:
    from mappedram.engine.fileio import Writeback

    path = tmp_path / "wb"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = random_pages(1024, 0.0, seed=4).tobytes()  # 4 MiB through the page cache
        os.pwrite(fd, data, 0)
        if _dirty_pages(fd, len(data)) == 0:
            pytest.skip("the filesystem wrote the pages at once: nothing to write back")
        wb = Writeback(fd)
        wb.submit(0, len(data) // 2)
        wb.submit(len(data) // 2, 0)  # to the end
        wb.wait()
        wb.wait()
        assert _dirty_pages(fd, len(data)) == 0  # all submitted (in flight or on the disk)
        os.fsync(fd)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)

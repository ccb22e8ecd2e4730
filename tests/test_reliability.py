"""What failures leave behind: killed saves, injected faults, full disks, concurrent saves."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.engine.faults import inject
from mappedram.errors import IncompleteRestoreError, IOEngineError
from mappedram.snapshot import TEMP_MARKER, restore, save
from patterns import random_pages

SRC = Path(__file__).resolve().parents[1] / "src"


def _leftovers(directory: Path) -> list[str]:
    return [p for p in os.listdir(directory) if TEMP_MARKER in p and p.endswith(".tmp")]


KILL_SCRIPT = """
import mmap, sys
from mappedram.snapshot import save
with open(sys.argv[1], "rb") as f:
    ram = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("go", flush=True)
save(sys.argv[2], {"pc.ram": ram}, channels=2)
"""


def test_save_killed_at_random_moments_never_leaves_a_bad_file(tmp_path):
    """50 saves, each SIGKILLed after a random delay: the target is the old snapshot or the new
    one, complete, never anything else; the next save cleans what the killed ones left."""
    old = random_pages(256, 0.5, 1)
    new = random_pages(8192, 0.5, 2)  # 32 MiB
    (tmp_path / "new.raw").write_bytes(new.tobytes())
    target = tmp_path / "snap.mig"
    save(target, {"pc.ram": old})
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "new.raw"), str(target)]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        return proc

    t0 = time.perf_counter()
    proc = start()
    proc.wait(timeout=60)
    span = time.perf_counter() - t0  # start-up + a whole save
    save(target, {"pc.ram": old})  # back to the old snapshot
    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    for _ in range(50):
        proc = start()
        time.sleep(rng.uniform(0, span))
        proc.kill()
        proc.wait()
        report = ops.verify(target)
        assert report.ok, report.error_text
        with mappedram.open_file(target) as f:
            data = f.read_pages("pc.ram", 0, f.block("pc.ram").num_pages)
        outcome = "old" if data == old.tobytes() else "new"
        assert outcome == "old" or data == new.tobytes()
        outcomes[outcome] += 1
        if outcome == "new":
            save(target, {"pc.ram": old})
    assert outcomes["old"] > 0
    left = _leftovers(tmp_path)
    report = save(target, {"pc.ram": old})
    assert _leftovers(tmp_path) == []
    assert any(f"removed {len(left)} temporary" in n for n in report.notes) == bool(left)


def test_second_save_to_same_target_fails_at_once(tmp_path):
    target = tmp_path / "snap.mig"
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow(_: int) -> None:
        started.set()
        release.wait(10)

    def first() -> None:
        try:
            save(target, {"pc.ram": random_pages(4096, 0.5, 3)}, channels=1, progress=slow)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    t1 = time.perf_counter()
    with pytest.raises(IOEngineError, match="in use by another save"):
        save(target, {"pc.ram": random_pages(4, 0.5, 4)})
    assert time.perf_counter() - t1 < 1.0
    assert not target.exists()  # the first save is not complete: nothing at the target yet
    release.set()
    t.join()
    assert not errors and ops.verify(target).ok
    save(tmp_path / "other.mig", {"pc.ram": random_pages(4, 0.5, 4)})  # other targets are not locked


def _fail_nth(op: str, n: int, err: int):
    count = {"n": 0}

    def injector(o: str, path: str, offset: int, length: int) -> int | None:
        if o == op and path.endswith(".tmp") | path.endswith(".mig"):
            count["n"] += 1
            if count["n"] == n:
                raise OSError(err, os.strerror(err))
        return None

    return injector


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("nth", [1, 5, 40])
def test_write_fault_leaves_no_file_and_old_snapshot(tmp_path, err, nth):
    target = tmp_path / "snap.mig"
    save(target, {"pc.ram": random_pages(16, 0.5, 5)})
    before = target.read_bytes()
    data = random_pages(2048, 0.3, 6)
    copy = data.copy()
    with inject(_fail_nth("write", nth, err)), pytest.raises(IOEngineError) as info:
        save(target, {"pc.ram": data}, channels=2)
    exc = info.value
    assert exc.errno == err and exc.offset is not None and TEMP_MARKER in exc.path
    assert "offset 0x" in str(exc) and os.strerror(err) in str(exc)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert np.array_equal(data, copy)  # the source memory is untouched


@pytest.mark.parametrize("nth", [1, 3, 12])
def test_write_fault_in_a_streamed_rewrite_stops_the_scan(tmp_path, nth):
    # legacy -> mapped-ram writes from lanes while the scan reads on: a lane's write error
    # reaches the caller, and neither the target nor a temporary file is left
    from mappedram.snapshot import rewrite
    from streams import legacy_stream

    src = tmp_path / "lg.mig"
    src.write_bytes(legacy_stream([("pc.ram", random_pages(8192, 0.2, 7).tobytes())]))
    target = tmp_path / "mr.mig"
    with inject(_fail_nth("write", nth, errno.EIO)), pytest.raises(IOEngineError) as info:
        rewrite(src, target, channels=3)
    assert info.value.errno == errno.EIO and TEMP_MARKER in info.value.path
    assert not target.exists()
    assert _leftovers(tmp_path) == []
    rewrite(src, target, channels=3)  # and the next one runs clean
    assert ops.verify(target).ok


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
        save(target, {"pc.ram": data}, channels=3)
        dest = np.zeros_like(data)
        restore(target, {"pc.ram": dest}, channels=3)
    assert np.array_equal(dest, data)
    assert ops.verify(target).ok


def test_real_signals_during_save_and_restore(tmp_path):
    """EINTR from real signals: a 1 ms interval timer fires throughout."""
    data = random_pages(8192, 0.5, 8)
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        save(tmp_path / "s.mig", {"pc.ram": data}, channels=2)
        dest = np.zeros_like(data)
        restore(tmp_path / "s.mig", {"pc.ram": dest}, channels=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert np.array_equal(dest, data)


def test_zero_length_write_is_an_error(tmp_path):
    with (
        inject(lambda op, path, offset, length: 0 if op == "write" else None),
        pytest.raises(IOEngineError, match="no progress"),
    ):
        save(tmp_path / "s.mig", {"pc.ram": random_pages(4, 0.0, 9)})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "s.mig").exists()


def test_restore_read_fault_names_incomplete_ranges(tmp_path):
    data = random_pages(6 * 2048, 0.3, 10)  # six tasks of 2048 pages
    target = tmp_path / "s.mig"
    save(target, {"pc.ram": data})
    dest = np.full_like(data, 0x77)
    bad_at = 0x100000 + 2 * 2048 * 4096  # inside the third task's extent

    def eio(op: str, path: str, offset: int, length: int) -> int | None:
        if op == "read" and offset <= bad_at < offset + length:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return None

    with inject(eio), pytest.raises(IncompleteRestoreError) as info:
        restore(target, {"pc.ram": dest}, channels=1)
    exc = info.value
    assert exc.errno == errno.EIO and exc.incomplete
    assert "may be incomplete in: pc.ram pages" in str(exc)
    bad = np.zeros(len(data) // 4096, dtype=bool)
    for r in exc.incomplete:
        assert r["block"] == "pc.ram"
        bad[r["first_page"] : r["first_page"] + r["pages"]] = True
    pages, src = dest.reshape(-1, 4096), data.reshape(-1, 4096)
    nz = src.any(axis=1)
    assert np.array_equal(pages[~bad & nz], src[~bad & nz])  # everything outside the ranges is restored
    assert bad.sum() < len(bad)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_on_a_full_filesystem(small_fs):
    target = small_fs / "snap.mig"
    save(target, {"pc.ram": random_pages(64, 0.5, 11)})
    before = target.read_bytes()
    data = random_pages(1024, 0.0, 12)  # 4 MiB of non-zero pages: cannot fit
    with pytest.raises(IOEngineError) as info:
        save(target, {"pc.ram": data}, channels=2)
    exc = info.value
    assert exc.errno == errno.ENOSPC and exc.path and exc.offset is not None
    assert "No space left on device" in str(exc)
    assert target.read_bytes() == before
    assert _leftovers(small_fs) == []
    assert ops.verify(target).ok


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

"""What failures leave behind: killed saves, injected faults, full disks, concurrent saves."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.engine.faults import inject
from mappedram.errors import IncompleteRestoreError, IOEngineError
from mappedram.ops import TEMP_MARKER, EngineOptions, restore, save
from tests.helpers import ROOT
from tests.helpers.patterns import random_pages

SRC = ROOT / "src"


def _leftovers(directory: Path) -> list[str]:
    return [p for p in os.listdir(directory) if TEMP_MARKER in p and p.endswith(".tmp")]


KILL_SCRIPT = """
import mmap, sys
from mappedram.ops import EngineOptions, save

def step(_):  # after each chunk of pages: say so, and go on only when told
    print("chunk", flush=True)
    if sys.stdin.readline() != "go on\\n":
        raise SystemExit(3)

with open(sys.argv[1], "rb") as f:
    ram = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("go", flush=True)
save(sys.argv[2], {"pc.ram": ram}, options=EngineOptions(channels=1, progress=step if sys.argv[3] == "step" else None))
print("saved", flush=True)
"""


def _outcome(target: Path, old: np.ndarray, new: np.ndarray) -> str:
    report = ops.verify(target)
    assert report.ok, report.error_text
    with mappedram.open_file(target) as f:
        data = f.read_pages("pc.ram", 0, f.block("pc.ram").num_pages)
    assert data in (old.tobytes(), new.tobytes()), "the target is neither the old snapshot nor the new one"
    return "old" if data == old.tobytes() else "new"


def test_save_killed_at_every_step_never_leaves_a_bad_file(tmp_path):
    """A save SIGKILLed before its first chunk, after each chunk, or let finish: the target is
    the old snapshot until the save completes, then the new one, never anything else; the
    next save cleans what the killed ones left. Then 20 kills at random moments (the rename
    and fsync windows too): old or new, complete, every time."""
    old = random_pages(256, 0.5, 1)
    new = random_pages(8192, 0.5, 2)  # 32 MiB: 4 chunks of 8 MiB
    (tmp_path / "new.raw").write_bytes(new.tobytes())
    target = tmp_path / "snap.mig"
    save(target, {"pc.ram": old})
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    def start(mode: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "new.raw"), str(target), mode]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        return proc

    chunks = 4
    for kill_after in range(chunks + 1):  # kill after 0 .. 4 chunks; 4: the save finishes
        proc = start("step")
        assert proc.stdin is not None and proc.stdout is not None
        for k in range(chunks):
            assert proc.stdout.readline() == "chunk\n"
            if k == kill_after:
                proc.kill()
                break
            proc.stdin.write("go on\n")
            proc.stdin.flush()
        else:
            assert proc.stdout.readline() == "saved\n"
        proc.wait()
        outcome = _outcome(target, old, new)
        assert outcome == ("new" if kill_after == chunks else "old"), kill_after
        assert (_leftovers(tmp_path) != []) == (kill_after < chunks), kill_after  # a killed save leaves its temporary file
        save(target, {"pc.ram": old})
        assert _leftovers(tmp_path) == []

    t0 = time.perf_counter()
    proc = start("free")
    proc.wait(timeout=60)
    span = time.perf_counter() - t0  # start-up + a whole save
    save(target, {"pc.ram": old})
    rng = random.Random(1234)
    for _ in range(20):
        proc = start("free")
        time.sleep(rng.uniform(0, span))
        proc.kill()
        proc.wait()
        if _outcome(target, old, new) == "new":
            save(target, {"pc.ram": old})
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
            save(target, {"pc.ram": random_pages(4096, 0.5, 3)}, options=EngineOptions(channels=1, progress=slow))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(60)
    # The first save is held inside its page writes until ``release``: a second save that
    # waited for the lock instead of failing would never return while it is held.
    second: list[BaseException | None] = []

    def again() -> None:
        try:
            save(target, {"pc.ram": random_pages(4, 0.5, 4)})
            second.append(None)
        except BaseException as exc:
            second.append(exc)

    t2 = threading.Thread(target=again, daemon=True)
    t2.start()
    t2.join(120)  # a guard against a hang, not a speed limit
    assert second, "the second save waited for the first instead of failing"
    assert isinstance(second[0], IOEngineError) and "in use by another save" in str(second[0])
    assert not target.exists()  # the first save is not complete: nothing at the target yet
    release.set()
    t.join()
    assert not errors and ops.verify(target).ok
    assert _lock_files(tmp_path) == []
    save(target, {"pc.ram": random_pages(4, 0.5, 5)})  # the lock was let go
    save(tmp_path / "other.mig", {"pc.ram": random_pages(4, 0.5, 4)})  # other targets are not locked


def _lock_files(directory: Path) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".mappedram-lock")]


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_no_lock_file_after_a_save_completes_or_fails(tmp_path, where):
    directory = tmp_path
    if where == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        directory = Path(tempfile.mkdtemp(prefix="mappedram-lock-", dir="/dev/shm"))
    try:
        target = directory / "snap.mig"
        save(target, {"pc.ram": random_pages(64, 0.5, 1)})
        assert _lock_files(directory) == [] and ops.verify(target).ok
        with inject(_fail_nth("write", 1, errno.EIO)), pytest.raises(IOEngineError):
            save(target, {"pc.ram": random_pages(64, 0.5, 2)}, options=EngineOptions(channels=1))
        assert _lock_files(directory) == [] and _leftovers(directory) == []
        assert sorted(os.listdir(directory)) == ["snap.mig"]
    finally:
        if where == "shm":
            shutil.rmtree(directory)


def test_lock_left_by_a_killed_save_is_removed_by_the_next(tmp_path):
    target = tmp_path / "snap.mig"
    stale = tmp_path / ".snap.mig.mappedram-lock"
    stale.touch()  # what a save killed while holding the lock leaves
    save(target, {"pc.ram": random_pages(8, 0.5, 1)})
    assert _lock_files(tmp_path) == []


def test_lock_on_a_file_its_owner_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """Between our open and our flock, the owner finished and unlinked the lock file: that
    lock excludes nobody, so it is dropped and the lock taken on the file the path names."""
    from mappedram.engine import fileio

    path = os.fspath(tmp_path / ".t.mappedram-lock")
    real_flock = fileio.fcntl.flock
    calls = []

    def flock(fd, op):
        if not calls:  # the first attempt: the owner lets go after our open
            os.unlink(path)
        calls.append(op)
        return real_flock(fd, op)

    monkeypatch.setattr(fileio.fcntl, "flock", flock)
    fd = fileio.lock_exclusive(path, "t")
    monkeypatch.setattr(fileio.fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2, calls
        assert os.path.samestat(os.fstat(fd), os.lstat(path))  # we hold the file the path names
        with pytest.raises(IOEngineError, match="in use by another save"):
            fileio.lock_exclusive(path, "t")
    finally:
        fileio.unlock_remove(fd, path)
    assert not os.path.exists(path)


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
        save(target, {"pc.ram": data}, options=EngineOptions(channels=2, direct_io="off"))  # a write per run
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
    from mappedram.ops import rewrite
    from tests.helpers.streams import legacy_stream

    src = tmp_path / "lg.mig"
    src.write_bytes(legacy_stream([("pc.ram", random_pages(8192, 0.2, 7).tobytes())]))
    target = tmp_path / "mr.mig"
    with inject(_fail_nth("write", nth, errno.EIO)), pytest.raises(IOEngineError) as info:
        rewrite(src, target, options=EngineOptions(channels=3, direct_io="off"))
    assert info.value.errno == errno.EIO and TEMP_MARKER in info.value.path
    assert not target.exists()
    assert _leftovers(tmp_path) == []
    rewrite(src, target, options=EngineOptions(channels=3))  # and the next one runs clean
    assert ops.verify(target).ok




def test_real_signals_during_save_and_restore(tmp_path):
    """EINTR from real signals: a 1 ms interval timer fires throughout."""
    data = random_pages(8192, 0.5, 8)
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        save(tmp_path / "s.mig", {"pc.ram": data}, options=EngineOptions(channels=2))
        dest = np.zeros_like(data)
        restore(tmp_path / "s.mig", {"pc.ram": dest}, options=EngineOptions(channels=2))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert np.array_equal(dest, data)




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
        restore(target, {"pc.ram": dest}, options=EngineOptions(channels=1))
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
        save(target, {"pc.ram": data}, options=EngineOptions(channels=2))
    exc = info.value
    assert exc.errno == errno.ENOSPC and exc.path and exc.offset is not None
    assert "No space left on device" in str(exc)
    assert target.read_bytes() == before
    assert _leftovers(small_fs) == []
    assert ops.verify(target).ok



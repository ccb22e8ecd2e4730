"""``--direct-io auto``: O_DIRECT where the filesystem takes it, unless it is far slower there.

The choice is measured, not guessed: a device's ``rotational`` flag says little on a
virtual disk (a virtio disk reports 1 here whatever backs it), and on a rotating disk
direct I/O can be far slower than the page cache. So, once per filesystem, a probe in the
target's directory writes :data:`PROBE_BYTES` on :data:`PROBE_THREADS` threads (a save's
and a restore's channels: the device's queue is as deep as theirs) in requests of
:data:`PROBE_REQUEST` (the size of a save's extents), through the page cache and with
O_DIRECT, each made durable (``fdatasync``, as a save is), and reads them back cold both
ways (the page cache dropped for the probe file with ``POSIX_FADV_DONTNEED``). Each way
runs :data:`PROBE_RUNS` times, alternating, and the fastest run counts. Direct I/O is
chosen for writes (saves) and for reads (restores) separately, unless the page cache was
more than :data:`PAGE_CACHE_MARGIN` times as fast.

The margin is wide because a probe flatters the page cache: its few MiB land in pages the
kernel has at hand (and, in a VM, in the host's cache), where a save or restore of GiB
allocates one page-cache page per 4 KiB, clears those of holes, and evicts others to make
room. On a VM whose host backs guest memory on first touch, this probe had the page cache
1.9 times as fast for writes and 1.7 times for reads, while with O_DIRECT a 1 GiB save
took 2.6 to 3.4 s instead of 5.7 to 6.0 s, and a restore 2.6 to 3.1 s instead of 4.1 to
4.3 s. Where O_DIRECT is really slow (synchronous small requests, as on some network and
FUSE filesystems and rotating disks) it is slower by larger multiples, which the margin
still catches.

Results are kept per filesystem (its device, type and source in /proc/self/mountinfo) in
memory and in ``direct-io.json`` under the cache directory (``$MAPPEDRAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/mappedram``, else ``~/.cache/mappedram``) for :data:`CACHE_SECONDS`; a
cache that cannot be read or written is ignored. The probe moves 768 MiB in all: about
0.4 s on an SSD, 3 s on a disk of 300 MB/s, once a week; its figures go into the reason
every report shows.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .directio import aligned_buffer, probe_direct_io
from .fileio import mount_of

__all__ = [
    "DirectChoice",
    "Purpose",
    "choose_direct_io",
    "filesystem_key",
    "cache_path",
    "forget",
    "PROBE_BYTES",
    "PROBE_REQUEST",
    "PROBE_RUNS",
    "PROBE_THREADS",
    "PAGE_CACHE_MARGIN",
]

Purpose = Literal["write", "read"]

#: Bytes the probe writes and reads each way, per run (PROBE_THREADS shares).
PROBE_BYTES = 64 << 20
#: Threads of the probe, each on its own share: the default number of channels.
PROBE_THREADS = 4
#: The probe's request size: a save's extent (CHUNK_PAGES pages of 4 KiB).
PROBE_REQUEST = 8 << 20
#: Runs of each way; the fastest counts.
PROBE_RUNS = 3
#: O_DIRECT is kept unless the page cache was more than this many times as fast (see above).
PAGE_CACHE_MARGIN = 3.0
#: Kept with each measurement; a measurement by another probe is made again.
PROBE_VERSION = 2
#: How long a measurement is kept.
CACHE_SECONDS = 7 * 24 * 3600
_CACHE_FILE = "direct-io.json"

_lock = threading.Lock()
_memo: dict[str, dict[str, object]] = {}


@dataclass(frozen=True, slots=True)
class DirectChoice:
    """Whether page I/O uses O_DIRECT, and why."""

    direct: bool
    reason: str
    direct_bps: float | None = None  # what the probe measured, bytes per second
    buffered_bps: float | None = None
    cached: bool = False  # the figures come from an earlier probe of this filesystem


def cache_path() -> str:
    base = os.environ.get("MAPPEDRAM_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "mappedram")
    return os.path.join(base, _CACHE_FILE)


def filesystem_key(directory: str) -> str:
    """The filesystem that holds ``directory``: device, type and source (from mountinfo)."""
    device, fstype, source = mount_of(directory)
    return f"{device} {fstype} {source}" if fstype else device


def forget() -> None:
    """Drop the in-memory results (the next choice reads the cache file or probes)."""
    with _lock:
        _memo.clear()


def choose_direct_io(directory: str, purpose: Purpose) -> DirectChoice:
    """Whether page I/O in ``directory`` (``purpose``: a save's writes, a restore's reads)
    is faster with O_DIRECT; see the module docstring."""
    refused = probe_direct_io(directory)
    if refused is not None:
        return DirectChoice(False, f"{refused}: the page cache")
    key = filesystem_key(directory)
    with _lock:
        entry = _memo.get(key)
        cached = entry is not None
        if entry is None:
            entry = _load(key)
            cached = entry is not None
        if entry is None:
            try:
                entry = _measure(directory)
            except OSError as exc:  # e.g. a full filesystem: not kept, the next save probes again
                return DirectChoice(False, f"auto: the probe in {directory} failed ({exc.strerror}): the page cache")
            _store(key, entry)
        _memo[key] = entry
    direct_bps = float(entry[f"{purpose}_direct_bps"])  # type: ignore[arg-type]
    buffered_bps = float(entry[f"{purpose}_buffered_bps"])  # type: ignore[arg-type]
    direct = buffered_bps <= PAGE_CACHE_MARGIN * direct_bps
    verb = "wrote" if purpose == "write" else "read"
    when = "measured earlier" if cached else "measured now"
    reason = (
        f"auto: O_DIRECT {verb} {direct_bps / 1e9:.2f} GB/s, the page cache {buffered_bps / 1e9:.2f} GB/s "
        f"on this filesystem ({key.split(' ', 1)[-1]}; {when}): {'O_DIRECT' if direct else 'the page cache'}"
    )
    return DirectChoice(direct, reason, direct_bps, buffered_bps, cached)


# -- the probe -------------------------------------------------------------------------


def _measure(directory: str) -> dict[str, object]:
    """Durable writes and cold reads of PROBE_BYTES both ways, PROBE_RUNS times, alternating."""
    bufs = [aligned_buffer(PROBE_REQUEST) for _ in range(PROBE_THREADS)]
    for b in bufs:
        memoryview(b)[:] = os.urandom(PROBE_REQUEST)  # data a device cannot compress or deduplicate
    best: dict[str, float] = {}
    try:
        for _ in range(PROBE_RUNS):
            for direct in (True, False):
                fd, path = tempfile.mkstemp(prefix=".mappedram-probe-", dir=directory)
                os.close(fd)
                try:
                    w = _timed(_write_share, path, bufs, direct)
                    _drop_cache(path)  # the read that follows is cold
                    r = _timed(_read_share, path, bufs, direct)
                finally:
                    os.unlink(path)
                way = "direct" if direct else "buffered"
                best[f"write_{way}"] = min(best.get(f"write_{way}", w), w)
                best[f"read_{way}"] = min(best.get(f"read_{way}", r), r)
    finally:
        for b in bufs:
            b.close()  # only the share functions view them, and their views are released
    out: dict[str, object] = {f"{k}_bps": PROBE_BYTES / max(v, 1e-9) for k, v in best.items()}
    out["measured"] = time.time()
    out["probe"] = PROBE_VERSION
    return out


def _timed(share: Callable[[str, memoryview, bool, int], None], path: str, bufs: list[mmap.mmap],
           direct: bool) -> float:  # fmt: skip
    """Seconds for PROBE_THREADS threads to each do ``share`` of the file; the first error is
    raised (a new OSError: the original's traceback would keep the buffers' views alive)."""
    errors: list[OSError] = []

    def run(i: int) -> None:
        view = memoryview(bufs[i])
        try:
            share(path, view, direct, i)
        except OSError as exc:
            errors.append(OSError(exc.errno, exc.strerror or str(exc)))
        finally:
            view.release()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(PROBE_THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def _share(i: int) -> range:
    per = PROBE_BYTES // PROBE_THREADS
    return range(i * per, (i + 1) * per, PROBE_REQUEST)


def _write_share(path: str, view: memoryview, direct: bool, i: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        for at in _share(i):
            done = 0
            while done < len(view):
                with view[done:] as rest:
                    done += os.pwrite(fd, rest, at + done)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_share(path: str, view: memoryview, direct: bool, i: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        for at in _share(i):
            done = 0
            while done < len(view):
                with view[done:] as rest:
                    n = os.preadv(fd, [rest], at + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"{path}: short read in the O_DIRECT probe")
                done += n
    finally:
        os.close(fd)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the cache file --------------------------------------------------------------------

_FIELDS = ("write_direct_bps", "write_buffered_bps", "read_direct_bps", "read_buffered_bps")


def _load(key: str) -> dict[str, object] | None:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        entry = data[key]
        if not all(isinstance(entry[k], (int, float)) and entry[k] > 0 for k in _FIELDS):
            return None
        if entry.get("probe") != PROBE_VERSION:
            return None
        if not 0 <= time.time() - float(entry["measured"]) < CACHE_SECONDS:
            return None
        return dict(entry)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, entry: dict[str, object]) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass

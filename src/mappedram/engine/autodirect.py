"""``--direct-io auto``: O_DIRECT where the filesystem takes it and it is faster there.

The choice is measured, not guessed: a device's ``rotational`` flag says little on a
virtual disk (a virtio disk reports 1 here whatever backs it), and on a rotating disk
direct I/O can be far slower than the page cache. So, once per filesystem, a probe in the
target's directory writes :data:`PROBE_BYTES` in requests of :data:`PROBE_REQUEST` (the
size of a save's extents) through the page cache and with O_DIRECT, each made durable
(``fdatasync``, as a save is), and reads them back cold both ways (the page cache
dropped for the probe file with ``POSIX_FADV_DONTNEED``). Each way runs
:data:`PROBE_RUNS` times, alternating, and the fastest run counts. Direct I/O is chosen
for writes (saves) and for reads (restores) separately, unless the page cache was faster
by more than :data:`TOLERANCE` (the probe's noise; and a save or restore through O_DIRECT
does not flood the page cache with the file).

Results are kept per filesystem (its device, type and source in /proc/self/mountinfo) in
memory and in ``direct-io.json`` under the cache directory (``$MAPPEDRAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/mappedram``, else ``~/.cache/mappedram``) for :data:`CACHE_SECONDS`; a
cache that cannot be read or written is ignored. The probe takes tens of milliseconds on
an SSD; its figures go into the reason every report shows.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Literal

from .directio import aligned_buffer, probe_direct_io

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
    "TOLERANCE",
]

Purpose = Literal["write", "read"]

#: Bytes the probe writes and reads each way, per run.
PROBE_BYTES = 32 << 20
#: The probe's request size: a save's extent (CHUNK_PAGES pages of 4 KiB).
PROBE_REQUEST = 8 << 20
#: Runs of each way; the fastest counts.
PROBE_RUNS = 3
#: O_DIRECT is kept unless the page cache was faster by more than this share: the probe's
#: noise, and a page cache not flooded with the file, are worth that much.
TOLERANCE = 0.10
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
    dev = os.stat(directory).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or fields[2] != f"{major}:{minor}" or "-" not in fields:
                    continue
                sep = fields.index("-")
                return f"{major}:{minor} {fields[sep + 1]} {fields[sep + 2]}"
    except OSError:
        pass
    return f"{major}:{minor}"


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
    direct = direct_bps >= (1 - TOLERANCE) * buffered_bps
    verb = "wrote" if purpose == "write" else "read"
    when = "measured earlier" if cached else "measured now"
    reason = (
        f"auto: O_DIRECT {verb} {direct_bps / 1e9:.2f} GB/s, the page cache {buffered_bps / 1e9:.2f} GB/s "
        f"on this filesystem ({key.split(' ', 1)[-1]}; {when}): {'O_DIRECT' if direct else 'the page cache'}"
    )
    return DirectChoice(direct, reason, direct_bps, buffered_bps, cached)


# -- the probe -------------------------------------------------------------------------


def _measure(directory: str) -> dict[str, object]:
    """Durable writes and cold reads of PROBE_BYTES both ways, twice, alternating."""
    buf = aligned_buffer(PROBE_REQUEST)
    view = memoryview(buf)
    view[:] = os.urandom(len(view))  # data a device cannot compress or deduplicate
    best: dict[str, float] = {}
    failed: OSError | None = None
    try:
        for _ in range(PROBE_RUNS):
            for direct in (True, False):
                fd, path = tempfile.mkstemp(prefix=".mappedram-probe-", dir=directory)
                os.close(fd)
                try:
                    w = _timed_write(path, view, direct)
                    r = _timed_read(path, view, direct)
                finally:
                    os.unlink(path)
                way = "direct" if direct else "buffered"
                best[f"write_{way}"] = min(best.get(f"write_{way}", w), w)
                best[f"read_{way}"] = min(best.get(f"read_{way}", r), r)
    except OSError as exc:
        # the traceback's frames hold views of the buffer, which could then not be closed
        failed = OSError(exc.errno, exc.strerror)
        traceback.clear_frames(exc.__traceback__)
    finally:
        del view
        buf.close()
    if failed is not None:
        raise failed
    out: dict[str, object] = {f"{k}_bps": PROBE_BYTES / max(v, 1e-9) for k, v in best.items()}
    out["measured"] = time.time()
    return out


def _timed_write(path: str, view: memoryview, direct: bool) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        t0 = time.perf_counter()
        for at in range(0, PROBE_BYTES, PROBE_REQUEST):
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], at + done)
        os.fdatasync(fd)
        seconds = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the read that follows is cold
        return seconds
    finally:
        os.close(fd)


def _timed_read(path: str, view: memoryview, direct: bool) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for at in range(0, PROBE_BYTES, PROBE_REQUEST):
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], at + done)
                if n <= 0:
                    raise OSError(f"{path}: short read in the O_DIRECT probe")
                done += n
        return time.perf_counter() - t0
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

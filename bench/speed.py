#!/usr/bin/env python3
"""Benchmark: save and restore at the disk's speed, every goal in one table from one run.

Everything runs in the same run on the same disk, so each of our figures has its
baselines next to it (the machines are shared and noisy: ratios and medians only):

* **save** (``--sizes``, default 1 and 4 GiB, at ``--densities`` 0.5 and 0.9: the share of
  non-zero pages, random per page, random data): ``mappedram save`` run as a user runs it
  (a new process; its start-up counted; default options: 4 channels, ``--direct-io auto``)
  from a RAM image in /dev/shm, against QEMU 10 saving the same RAM (a paused guest whose
  ``memory-backend-file`` is that image) in each of ``--qemu-variants``, its best median
  counting, and against ``fio`` (O_DIRECT, 1 MiB requests, iodepth 16, then an fsync)
  writing the bytes our file stores (its allocated bytes) and the page data alone. Each
  save, ours and QEMU's, starts from the image as written: its zero pages are punched back
  into holes first (a read through a mapping fills a tmpfs hole; ours reads no hole);
* **restore**, cold (page cache dropped, the interpreter's own files read back first so
  only the data is cold): ``mappedram restore`` into a fresh /dev/shm file, against QEMU
  restoring its own file of the same variant into a fresh destination, and ``fio`` reading
  the stored bytes and the page data; plus, in-process, what the destination's page faults
  cost: the same restore into memory already faulted in (``MADV_POPULATE_WRITE``, not
  timed), into anonymous memory, and into anonymous memory with ``MADV_HUGEPAGE``;
* **scale** (``--scale-sizes``, default 1, 4, 16 GiB, half-zero RAM, the source a sparse
  file on the disk read into the page cache, the destination in /dev/shm): save and
  restore by the CLI, with each process's CPU time (user + system, from ``wait4``) and its
  peak ``RssAnon`` (its own anonymous memory, not the guest's pages: sampled every 10 ms
  from /proc/PID/status); time should grow linearly (each size within 15 % of the
  least-squares line). Next to our CPU, the kernel's own cost of moving the same bytes on
  this machine (``cpu_floors``: dd with O_DIRECT, and faulting in the destination's pages);
* **live** (``--live-mem``, default 1024 MiB): live saves of the built-in guest (KVM, or
  the software guest), each of a fresh guest and each against a static save of the same RAM
  right after (the guest paused by the live save; both durable, timed in the same minute):
  with auto-converge (``vm save``'s defaults), and what its first pass cost with the guest
  running on the same cores; with dirty-limit instead (``vm save --dirty-limit``: 1 MB/s
  once the same trigger fires); at 99 % from the end of pass 1 on (:class:`EarliestThrottle`:
  the floor of any rule that waits for pass 1's rate); and with dirty-limit held from the
  start (``vm save --dirty-limit-from-start``: QEMU's ``set-vcpu-dirty-limit`` before
  ``migrate``, the rate sampled first).

Each point also has its **floor**, the least a save or restore of that RAM by our command
could take on this disk in this run: fio writing (reading) the page data alone, plus what the same
command costs on 2 MiB of RAM (start-up, set-up, fsync), plus, for a restore into fresh
memory, what faulting it in cost (the restore into /dev/shm against the same restore into
memory faulted in first). A goal not met whose time is below its floor says so (``NOT MET:
floor X s > Y s needed``); so does a CPU goal below the kernel's own cost (dd).

QEMU's saves are timed from ``migrate`` to ``completed`` plus an fsync of the file (our
save fsyncs; QEMU does not); QEMU's start-up is never timed. Every restore (ours and
QEMU's) is checked against the source RAM in the first run. Prints one table with the
goals, writes every raw figure to ``--json`` (default ``bench-results/speed.json``).
Needs root (page cache dropping), ~2x the largest size free in /dev/shm, QEMU and fio.

usage: python bench/speed.py [--runs 3] [--sizes 1,4] [--densities 0.5,0.9]
                             [--scale-sizes 1,4,16] [--live-mem 1024] [--dir bench-work]
                             [--skip save,restore,scale,live] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers
sys.path.insert(0, str(ROOT / "bench"))

from common import PAGE, drop_caches, fio  # noqa: E402
from tests.helpers.qemu_harness import BACKEND_ID, QemuVM, file_uri, find_qemu, first_mismatch, qemu_version  # noqa: E402

import mappedram  # noqa: E402
from mappedram import ops  # noqa: E402

SHM = Path("/dev/shm")
GiB = 1 << 30
TINY = 2 << 20  # the RAM of the fixed-cost runs
MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14)
#: QEMU variants: name -> (capabilities, parameters).
QEMU_VARIANTS: dict[str, tuple[dict[str, bool], dict[str, Any]]] = {
    "mapped-ram": ({"mapped-ram": True}, {}),
    "multifd4": ({"mapped-ram": True, "multifd": True}, {"multifd-channels": 4}),
    "multifd4+dio": ({"mapped-ram": True, "multifd": True}, {"multifd-channels": 4, "direct-io": True}),
}
GOALS = {
    "save_vs_qemu": 2.0,  # QEMU's best save seconds / ours, at every size
    "save_vs_fio_stored": 0.9,  # fio writing our file's stored bytes / ours, at the largest size
    "restore_vs_fio_stored": 0.8,  # fio reading the stored bytes / our cold restore
    "restore_vs_qemu": 2.0,  # QEMU's best restore / ours
    "rss_anon_mib": 64.0,  # at most, at every size
    "cpu_per_gib": 0.15,  # CPU seconds per GiB of RAM at most, save and restore
    "linear_deviation": 0.15,  # each size's time within this share of the fitted line
    "live_vs_static": 1.5,  # live save seconds / static save seconds at most
}


# -- processes, files, RAM ---------------------------------------------------------------


def mappedram_cli() -> str:
    exe = Path(sys.executable).parent / "mappedram"
    return str(exe) if exe.exists() else shutil.which("mappedram") or "mappedram"


def run_measured(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``argv``; its wall time, CPU seconds (wait4) and peak RssAnon (sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while True:
        pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(code)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_anon_peak": peak,
            "stdout": out.decode(errors="replace")}  # fmt: skip


def cold() -> None:
    """Drop the page cache, then read the interpreter and mappedram back in: only data is cold."""
    drop_caches()
    subprocess.run([mappedram_cli(), "--version"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", "import numpy, mappedram.ops.writer, mappedram.ops.loader"],
                   check=True, capture_output=True)  # fmt: skip


def write_ram(path: Path, size: int, density: float, seed: int) -> int:
    """A sparse guest RAM image: page i holds random bytes with probability ``density``,
    else it is a hole (reads as zeros, takes no memory). Returns the non-zero pages."""
    rng = np.random.default_rng(seed)
    chunk = 16384
    nonzero = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for first in range(0, size // PAGE, chunk):
            n = min(chunk, size // PAGE - first)
            keep = rng.random(n) < density
            k = int(keep.sum())
            pages = np.zeros((n, PAGE), dtype=np.uint8)
            data = np.frombuffer(rng.bytes(k * PAGE), dtype=np.uint8).reshape(k, PAGE).copy()
            data[:, 0] |= 1  # never an all-zero page by chance
            pages[keep] = data
            nonzero += k
            edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
            flat = pages.reshape(-1)
            for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):
                os.pwrite(fd, flat[s * PAGE : e * PAGE], (first + s) * PAGE)
    finally:
        os.close(fd)
    return nonzero


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def map_shm(path: Path, size: int, *, fresh: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o600)
    try:
        if fresh:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)


def same_ram(a: Path, b: Path, size: int) -> str | None:
    step = 64 << 20
    with map_shm(a, size, fresh=False) as x, map_shm(b, size, fresh=False) as y:
        for at in range(0, size, step):
            if x[at : at + step] != y[at : at + step]:
                return f"chunk at {at:#x}: {first_mismatch(x[at : at + step], y[at : at + step])}"
    return None


def dig_holes(path: Path) -> None:
    """Punch the zero pages of a RAM image back into holes (``fallocate --dig-holes``): a read
    through a mapping fills a hole of a tmpfs file (QEMU's save does, and the restore checks),
    so every save starts from the image as written."""
    subprocess.run(["fallocate", "--dig-holes", str(path)], check=True)


def unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def fsync_path(path: Path) -> None:
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- ours --------------------------------------------------------------------------------


def warm(path: Path) -> None:
    """Read ``path`` into the page cache (a RAM image kept on disk, read at memory speed)."""
    with path.open("rb") as f:
        while f.readinto(bytearray(64 << 20)):
            pass


def cli_save(src: Path, out: Path, *, source_on_disk: bool = False) -> dict[str, Any]:
    unlink(out)
    if not source_on_disk:
        dig_holes(src)
    cold()
    if source_on_disk:
        warm(src)
    r = run_measured([mappedram_cli(), "save", "--block", f"{BACKEND_ID}={src}", "-o", str(out), "--output", "json"])
    rep = json.loads(r.pop("stdout"))
    r.update(direct_io=rep["direct_io"], direct_io_reason=rep.get("direct_io_reason", ""),
             pages_written=rep["pages_written"], phases=rep["seconds"], stored_bytes=allocated(out))  # fmt: skip
    return r


def cli_restore(mig: Path, dst: Path) -> dict[str, Any]:
    unlink(dst)
    cold()
    r = run_measured([mappedram_cli(), "restore", str(mig), "--block", f"{BACKEND_ID}={dst}", "--output", "json"])
    rep = json.loads(r.pop("stdout"))
    r.update(direct_io=rep["direct_io"], direct_io_reason=rep.get("direct_io_reason", ""),
             pages_read=rep["pages_read"], phases=rep["seconds"])  # fmt: skip
    return r


@contextlib.contextmanager
def destination(kind: str, size: int, dst: Path) -> Iterator[mmap.mmap]:
    """Fresh destination memory: a /dev/shm file ("shm"), that file faulted in first
    ("shm-prefaulted"), anonymous memory ("anon"), or anonymous with MADV_HUGEPAGE ("anon-thp")."""
    if kind.startswith("shm"):
        m = map_shm(dst, size, fresh=True)
        if kind == "shm-prefaulted":
            m.madvise(MADV_POPULATE_WRITE)
    else:
        m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if kind == "anon-thp":
            m.madvise(mmap.MADV_HUGEPAGE)
    try:
        yield m
    finally:
        m.close()
        unlink(dst)


def inproc_restore(mig: Path, dst: Path, size: int, kind: str) -> dict[str, Any]:
    with destination(kind, size, dst) as m:
        cold()
        t0 = time.perf_counter()
        rep = ops.restore(str(mig), {BACKEND_ID: m})
        return {"seconds": time.perf_counter() - t0, "direct_io": rep.direct_io}


# -- QEMU --------------------------------------------------------------------------------


def qemu_save(src: Path, size: int, out: Path, variant: str, work: Path) -> dict[str, Any]:
    caps, params = QEMU_VARIANTS[variant]
    unlink(out)
    dig_holes(src)
    with QemuVM(src, machine="q35", ram_mib=size >> 20, workdir=work, name="speed-src", timeout=120) as vm:
        vm.cmd("stop")
        vm.configure_migration(caps, params)
        cold()
        t0 = time.perf_counter()
        vm.cmd("migrate", {"uri": file_uri(out)})
        vm.wait_migration(1800)
        fsync_path(out)
        return {"seconds": time.perf_counter() - t0, "stored_bytes": allocated(out)}


def qemu_restore(mig: Path, dst: Path, size: int, variant: str, work: Path) -> dict[str, Any]:
    caps, params = QEMU_VARIANTS[variant]
    unlink(dst)
    with QemuVM(dst, machine="q35", ram_mib=size >> 20, incoming=True, workdir=work, name="speed-dst",
                timeout=120) as vm:  # fmt: skip
        vm.configure_migration(caps, params)
        cold()
        t0 = time.perf_counter()
        vm.cmd("migrate-incoming", {"uri": file_uri(mig), "exit-on-error": False})
        vm.wait_migration(1800)
        return {"seconds": time.perf_counter() - t0}


# -- the parts ---------------------------------------------------------------------------


class Runs:
    """Raw figures by name; medians on demand."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.raw: dict[str, list[dict[str, Any]]] = {}
        self.log = log

    def add(self, name: str, r: dict[str, Any]) -> dict[str, Any]:
        self.raw.setdefault(name, []).append(r)
        self.log(f"  {name:<44}{r['seconds']:8.3f} s")
        return r

    def med(self, name: str, key: str = "seconds") -> float:
        return float(statistics.median(r[key] for r in self.raw[name]))

    def has(self, name: str) -> bool:
        return name in self.raw


def bench_save_restore(size: int, density: float, args: argparse.Namespace, work: Path,
                       log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    tag = f"{size >> 30}g-{density:g}"
    src, dst = SHM / f"speed-{tag}-src.ram", SHM / f"speed-{tag}-dst.ram"
    ours, theirs, fio_file = work / f"{tag}-ours.mig", work / f"{tag}-qemu.mig", work / f"{tag}-fio.dat"
    tiny, tiny_dst, tiny_out = SHM / f"speed-{tag}-tiny.ram", SHM / f"speed-{tag}-tiny-dst.ram", work / "tiny.mig"
    runs = Runs(log)
    checked: dict[str, str] = {}

    def check(name: str) -> None:
        bad = same_ram(dst, src, size)
        checked[name] = bad or "ok"
        if bad:
            raise SystemExit(f"{name}: restored RAM differs from the source: {bad}")

    try:
        log(f"{size / GiB:g} GiB at density {density:g}: writing the RAM image ...")
        nonzero = write_ram(src, size, density, seed=0x5EED + int(density * 1000) + size // GiB)
        write_ram(tiny, TINY, density, seed=1)  # the same commands on 2 MiB: what a save or restore costs at least
        variants = [v for v in args.qemu_variants.split(",") if v]
        for run in range(args.runs):
            first = run == 0
            log(f"{size / GiB:g} GiB, density {density:g}, run {run + 1}/{args.runs}")
            r = runs.add("ours save", cli_save(src, ours))
            if r["pages_written"] != nonzero:
                raise SystemExit(f"our save wrote {r['pages_written']} pages; the RAM has {nonzero} non-zero")
            stored = r["stored_bytes"]
            r = runs.add("ours restore", cli_restore(ours, dst))
            if first:
                check("ours restore")
            unlink(dst)
            runs.add("ours save, fixed cost", cli_save(tiny, tiny_out))
            runs.add("ours restore, fixed cost", cli_restore(tiny_out, tiny_dst))
            unlink(tiny_out, tiny_dst)
            if not args.skip_faults:
                for kind in ("shm", "shm-prefaulted", "anon", "anon-thp"):
                    runs.add(f"in-process restore into {kind}", inproc_restore(ours, dst, size, kind))
            for way in ("write", "read"):
                for what, n in (("stored", stored), ("data", nonzero * PAGE)):
                    unlink(fio_file)
                    drop_caches()
                    if way == "read":
                        fio("write", fio_file, n)
                        drop_caches()
                    runs.add(f"fio {way} {what}", fio(way, fio_file, n))
            unlink(fio_file)
            for v in variants:
                runs.add(f"qemu save {v}", qemu_save(src, size, theirs, v, work))
                runs.add(f"qemu restore {v}", qemu_restore(theirs, dst, size, v, work))
                if first:
                    check(f"qemu restore {v}")
                unlink(dst, theirs)
    finally:
        unlink(src, dst, ours, theirs, fio_file, tiny, tiny_dst, tiny_out)
    med = {k: runs.med(k) for k in runs.raw}
    q_save = min((k for k in med if k.startswith("qemu save")), key=med.__getitem__)
    q_rest = min((k for k in med if k.startswith("qemu restore")), key=med.__getitem__)
    faults = {}
    if runs.has("in-process restore into shm"):
        faults = {k.removeprefix("in-process restore into "): med[k] for k in med if k.startswith("in-process")}
    return {
        "size": size, "density": density, "nonzero_pages": nonzero, "data_bytes": nonzero * PAGE,
        "stored_bytes": statistics.median(r["stored_bytes"] for r in runs.raw["ours save"]),
        "median_seconds": med, "raw": runs.raw, "checked": checked,
        "direct_io": {k: runs.raw[k][0]["direct_io_reason"] for k in ("ours save", "ours restore")},
        "qemu_best_save": q_save.removeprefix("qemu save "), "qemu_best_restore": q_rest.removeprefix("qemu restore "),
        "ratios": {
            "save_vs_qemu": med[q_save] / med["ours save"],
            "save_vs_fio_stored": med["fio write stored"] / med["ours save"],
            "save_vs_fio_data": med["fio write data"] / med["ours save"],
            "restore_vs_qemu": med[q_rest] / med["ours restore"],
            "restore_vs_fio_stored": med["fio read stored"] / med["ours restore"],
            "restore_vs_fio_data": med["fio read data"] / med["ours restore"],
        },
        "restore_into": faults,
        "needs": {
            "save_vs_qemu": med[q_save] / GOALS["save_vs_qemu"],
            "save_vs_fio_stored": med["fio write stored"] / GOALS["save_vs_fio_stored"],
            "restore_vs_qemu": med[q_rest] / GOALS["restore_vs_qemu"],
            "restore_vs_fio_stored": med["fio read stored"] / GOALS["restore_vs_fio_stored"],
        },
        "floors": floors(med, faults),
    }  # fmt: skip


def floors(med: dict[str, float], faults: dict[str, float]) -> dict[str, dict[str, float]]:
    """The least a save or restore of this RAM by our command could take on this disk in this
    run: fio moving the page data alone (the bytes no file can leave out), plus what the
    command costs on 2 MiB (start-up, set-up, fsync), plus for a restore into fresh memory
    what faulting it in cost (into /dev/shm, against the same restore into memory faulted in
    first). A goal that needs less time than this is out of the command's reach here."""
    fault = max(0.0, faults["shm"] - faults["shm-prefaulted"]) if "shm-prefaulted" in faults else 0.0
    save = {"fio write data": med["fio write data"], "fixed cost": med["ours save, fixed cost"]}
    restore = {"fio read data": med["fio read data"], "fixed cost": med["ours restore, fixed cost"],
               "page faults": fault}  # fmt: skip
    return {"save": {**save, "seconds": sum(save.values())}, "restore": {**restore, "seconds": sum(restore.values())}}


def bench_scale(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    rows = []
    for gib in [float(s) for s in args.scale_sizes.split(",")]:
        size = int(gib * GiB)
        # The source image is a sparse file on the disk, read into the page cache before each
        # save: tmpfs fills a hole when a mapping reads it, so a 16 GiB source in /dev/shm
        # would take 16 GiB however sparse it was written, and the destination would not fit.
        src, dst, mig = work / "scale-src.ram", SHM / "speed-scale-dst.ram", work / "scale.mig"
        runs = Runs(log)
        try:
            log(f"scale: {gib:g} GiB, density 0.5: writing the RAM image ...")
            write_ram(src, size, 0.5, seed=0x5CA1E + int(gib))
            for _ in range(args.scale_runs):
                runs.add(f"save {gib:g} GiB", cli_save(src, mig, source_on_disk=True))
                runs.add(f"restore {gib:g} GiB", cli_restore(mig, dst))
                unlink(dst)
            floors = cpu_floors(src, mig, dst, runs.raw[f"save {gib:g} GiB"][-1]["stored_bytes"],
                                runs.raw[f"restore {gib:g} GiB"][-1]["pages_read"] * PAGE)  # fmt: skip
            log(f"  CPU floors: save {floors['save']:.2f} s, restore {floors['restore']:.2f} s")
        finally:
            unlink(src, dst, mig, work / "floor.out")
        row: dict[str, Any] = {"gib": gib, "cpu_floor_seconds": floors}
        for op in ("save", "restore"):
            name = f"{op} {gib:g} GiB"
            row[op] = {"seconds": runs.med(name), "cpu_seconds": runs.med(name, "cpu_seconds"),
                       "cpu_per_gib": runs.med(name, "cpu_seconds") / gib,
                       "rss_anon_peak": max(r["rss_anon_peak"] for r in runs.raw[name]),
                       "raw": runs.raw[name]}  # fmt: skip
        rows.append(row)
    for op in ("save", "restore"):
        x = np.array([r["gib"] for r in rows])
        y = np.array([r[op]["seconds"] for r in rows])
        if len(rows) >= 2:
            slope, icpt = np.polyfit(x, y, 1)
            for r, fit in zip(rows, slope * x + icpt):
                r[op]["deviation_from_line"] = float(abs(r[op]["seconds"] - fit) / fit)
            for r in rows:
                r[op]["line"] = {"seconds_per_gib": float(slope), "start_seconds": float(icpt)}
    return {"rows": rows}


def cpu_floors(src: Path, mig: Path, dst: Path, stored: int, present: int) -> dict[str, float]:
    """The kernel's own CPU cost of the bytes a save and a restore move, on this machine: for
    a save, dd copying ``stored`` bytes of the (cached) source to a file with O_DIRECT; for a
    restore, dd reading ``stored`` bytes of the file with O_DIRECT, plus faulting in
    ``present`` bytes of a fresh /dev/shm file (MADV_POPULATE_WRITE)."""
    out = src.parent / "floor.out"
    blocks = f"count={-(-stored // (8 << 20))}"
    unlink(out)
    cold()
    warm(src)
    save = run_measured(["dd", f"if={src}", f"of={out}", "bs=8M", "oflag=direct", "conv=fsync", blocks])
    unlink(out)
    cold()
    read = run_measured(["dd", f"if={mig}", "of=/dev/null", "bs=8M", "iflag=direct", blocks])
    unlink(dst)
    fault = run_measured([sys.executable, "-c", (
        "import mmap, os, resource, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600); os.ftruncate(fd, int(sys.argv[2]))\n"
        "m = mmap.mmap(fd, int(sys.argv[2])); r0 = resource.getrusage(resource.RUSAGE_SELF)\n"
        f"m.madvise({MADV_POPULATE_WRITE}); r1 = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)"), str(dst), str(present)])  # fmt: skip
    unlink(dst)
    return {"save": save["cpu_seconds"], "restore": read["cpu_seconds"] + float(fault["stdout"]),
            "restore_read": read["cpu_seconds"], "restore_fault": float(fault["stdout"])}  # fmt: skip


class EarliestThrottle:
    """A throttle policy of no rule's but the earliest a migration's own rule could be: 99 %
    (the most QEMU's throttles sleep) from the end of pass 1 on, the first moment pass 1 has
    measured a dirty rate. What a live save then costs is the floor of every rule that waits
    for pass 1 (auto-converge, dirty-limit's trigger)."""

    pct = 0

    def after_pass(self, bytes_dirty_period: int, bytes_xfer_period: int, dirty_rate: float = 0.0) -> int:
        self.pct = 99
        return self.pct


def passes_of(report: Any) -> list[dict[str, Any]]:
    return [{"pages_sent": p.pages_sent, "seconds": p.seconds, "throttle": p.throttle, "dirty_rate": p.dirty_rate,
             "bytes_written": p.bytes_written, "direct_io": p.direct_io} for p in report.passes]  # fmt: skip


def live_pair(vmops: Any, kind: str, args: argparse.Namespace, work: Path, opts: Any) -> dict[str, Any]:
    """A fresh guest, filled, saved live with ``opts`` (cold cache), then the same RAM saved
    static right after (the guest paused by the live save, the cache dropped): both durable,
    both timed in the same minute, so the host's flushing of earlier runs weighs on both."""
    with vmops.make_guest(kind, vmops.GuestConfig(mem_mib=args.live_mem)) as vm:
        vm.start()
        vm.wait_filled(600)
        time.sleep(1.0)
        cold()
        t0 = time.perf_counter()
        live = vmops.live_save_guest(vm, work / "live.mig", "mapped-ram", [], live=opts)
        live_s = time.perf_counter() - t0
        drop_caches()
        t0 = time.perf_counter()
        static = ops.save(work / "static.mig", {vm.ram_idstr: vm.memory})
        static_s = time.perf_counter() - t0
    unlink(work / "live.mig", work / "static.mig")
    return {"seconds": live_s, "ok": live.ok, "passes": len(live.passes), "downtime": live.downtime,
            "stop_reason": live.stop_reason, "sync_seconds": live.seconds.get("sync", 0.0),
            "writeback_seconds": live.seconds.get("writeback", 0.0),
            "first_pass_seconds": live.passes[0].seconds, "throttle_max": max(p.throttle for p in live.passes),
            "bytes_written": sum(p.bytes_written for p in live.passes), "expected_final": live.expected_final,
            "sample": None if live.sample is None else dataclasses.asdict(live.sample),
            "pass_table": passes_of(live), "direct_io_reason": live.direct_io_reason,
            "static_seconds": static_s, "static_pages_seconds": static.seconds["pages"],
            "static_sync_seconds": static.seconds.get("sync", 0.0),
            "static_direct_io_reason": static.direct_io_reason}  # fmt: skip


LIVE_VARIANTS = ("auto_converge", "dirty_limit", "earliest", "from_start")


def bench_live(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from mappedram.vm import ops as vmops

    limit = ops.DirtyLimit()
    held = ops.DirtyLimit(from_start=True)
    variants = {
        # vm save's defaults
        "auto_converge": vmops.VM_LIVE_DEFAULTS,
        # QEMU's dirty-limit instead: 1 MB/s once the same trigger fires
        "dirty_limit": vmops.VM_LIVE_DEFAULTS.replace(auto_converge=None, dirty_limit=limit),
        # the floor of every rule that waits for pass 1: 99 % from the end of pass 1 on
        "earliest": vmops.VM_LIVE_DEFAULTS.replace(auto_converge=None, throttle_policy=EarliestThrottle),
        # dirty-limit from the start (set-vcpu-dirty-limit before migrate): the rate sampled first
        "from_start": vmops.VM_LIVE_DEFAULTS.replace(auto_converge=None, dirty_limit=held),
    }
    choice = vmops.choose_guest("auto")
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in LIVE_VARIANTS}
    for run in range(args.runs):
        for name in LIVE_VARIANTS:
            r = live_pair(vmops, choice.kind, args, work, variants[name])
            raw[name].append(r)
            log(f"  live run {run + 1}, {name}: {r['seconds']:.2f} s ({r['passes']} passes, first "
                f"{r['first_pass_seconds']:.2f} s, downtime {r['downtime']:.3f} s, {r['stop_reason']}, then "
                f"waits: writeback {r['writeback_seconds']:.2f} s, closing fsync {r['sync_seconds']:.2f} s); "
                f"static right after {r['static_seconds']:.2f} s (fsync {r['static_sync_seconds']:.2f} s)")  # fmt: skip

    def med(name: str, k: str) -> float:
        return float(statistics.median(r[k] for r in raw[name]))

    def summary(name: str) -> dict[str, Any]:
        return {"seconds": med(name, "seconds"), "static_seconds": med(name, "static_seconds"),
                "live_vs_static": med(name, "seconds") / med(name, "static_seconds"),
                "downtime": med(name, "downtime"), "passes": med(name, "passes"),
                "sync_seconds": med(name, "sync_seconds"), "writeback_seconds": med(name, "writeback_seconds"),
                "static_sync_seconds": med(name, "static_sync_seconds"),
                "all_ok": all(r["ok"] for r in raw[name])}  # fmt: skip

    ac = "auto_converge"
    return {"guest": choice.kind, "mem_mib": args.live_mem, **summary(ac),
            "first_pass_seconds": med(ac, "first_pass_seconds"),
            "static_pages_seconds": med(ac, "static_pages_seconds"),
            # both without the closing fsync: a pass's writes against the static save's writes
            "first_pass_vs_static": med(ac, "first_pass_seconds") / med(ac, "static_pages_seconds"),
            "dirty_limit": {"vcpu_dirty_limit": limit.vcpu_dirty_limit, **summary("dirty_limit")},
            "from_start": {"vcpu_dirty_limit": held.vcpu_dirty_limit, "sample_seconds": held.sample_seconds,
                           **summary("from_start")},
            "earliest": summary("earliest"),
            "raw": raw}  # fmt: skip


# -- the table -------------------------------------------------------------------------


def verdict(ok: bool | None, need: float | None = None, floor: float | None = None) -> str:
    """met, NOT MET, or (``need``: the seconds the goal allows, ``floor``: the least any
    command could take, both from this run) out of reach where the floor is above the need."""
    if ok is None:
        return "-"
    if ok:
        return "met"
    if need is not None and floor is not None and floor > need:
        return f"NOT MET: floor {floor:.2f} s > {need:.2f} s needed"
    return "NOT MET"


def judged(point: dict[str, Any], key: str, floor: float | None, applies: bool = True) -> str:
    """The verdict on the ratio goal ``key`` of one save/restore point."""
    ok = point["ratios"][key] >= GOALS[key] if applies else None
    return verdict(ok, point.get("needs", {}).get(key), floor)


def ratio(value: float, goal: float) -> str:
    """``value`` as a ratio, with a third digit where two would round it onto the goal."""
    text = f"{value:.2f}x"
    return f"{value:.3f}x" if text == f"{goal:.2f}x" else text


def table(result: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = [["what", "ours", "baseline", "ratio", "goal", ""]]
    sr = result.get("save_restore", [])
    largest = max((d["size"] for d in sr), default=0)
    for d in sr:
        at = f"{d['size'] / GiB:g} GiB @{d['density']:g}"
        m, r = d["median_seconds"], d["ratios"]
        q, qr = d["qemu_best_save"], d["qemu_best_restore"]
        fl = d.get("floors", {})
        save_floor, restore_floor = fl.get("save", {}).get("seconds"), fl.get("restore", {}).get("seconds")
        rows.append([f"save {at} vs QEMU ({q})", f"{m['ours save']:.2f} s", f"{m['qemu save ' + q]:.2f} s",
                     ratio(r["save_vs_qemu"], GOALS["save_vs_qemu"]), ">= 2x", judged(d, "save_vs_qemu", save_floor)])
        big = d["size"] == largest
        rows.append([f"save {at} vs fio write, stored {d['stored_bytes'] / 1e9:.2f} GB", f"{m['ours save']:.2f} s",
                     f"{m['fio write stored']:.2f} s", ratio(r["save_vs_fio_stored"], GOALS["save_vs_fio_stored"]),
                     ">= 0.9x" if big else "(report)", judged(d, "save_vs_fio_stored", save_floor, big)])
        rows.append([f"save {at} vs fio write, page data {d['data_bytes'] / 1e9:.2f} GB", f"{m['ours save']:.2f} s",
                     f"{m['fio write data']:.2f} s", f"{r['save_vs_fio_data']:.2f}x", "(report)", "-"])
        if save_floor is not None:
            f = fl["save"]
            rows.append([f"save {at}: floor (fio write page data + our save of 2 MiB)", f"{m['ours save']:.2f} s",
                         f"{save_floor:.2f} s ({f['fio write data']:.2f} + {f['fixed cost']:.2f})",
                         f"{save_floor / m['ours save']:.2f}x", "(report)", "-"])
        rows.append([f"restore {at} vs QEMU ({qr})", f"{m['ours restore']:.2f} s",
                     f"{m['qemu restore ' + qr]:.2f} s", ratio(r["restore_vs_qemu"], GOALS["restore_vs_qemu"]), ">= 2x",
                     judged(d, "restore_vs_qemu", restore_floor)])
        rows.append([f"restore {at} vs fio read, stored", f"{m['ours restore']:.2f} s",
                     f"{m['fio read stored']:.2f} s", ratio(r["restore_vs_fio_stored"], GOALS["restore_vs_fio_stored"]),
                     ">= 0.8x", judged(d, "restore_vs_fio_stored", restore_floor)])
        rows.append([f"restore {at} vs fio read, page data", f"{m['ours restore']:.2f} s",
                     f"{m['fio read data']:.2f} s", f"{r['restore_vs_fio_data']:.2f}x", "(report)", "-"])
        if restore_floor is not None:
            f = fl["restore"]
            rows.append([f"restore {at}: floor (fio read page data + our restore of 2 MiB + page faults)",
                         f"{m['ours restore']:.2f} s",
                         f"{restore_floor:.2f} s ({f['fio read data']:.2f} + {f['fixed cost']:.2f}"
                         f" + {f['page faults']:.2f})", f"{restore_floor / m['ours restore']:.2f}x", "(report)", "-"])
        if d["restore_into"]:
            base = d["restore_into"]["shm"]
            for kind, s in d["restore_into"].items():
                if kind != "shm":
                    rows.append([f"restore {at} in-process into {kind}", f"{s:.2f} s", f"{base:.2f} s (shm)",
                                 f"{base / s:.2f}x", "(report)", "-"])  # fmt: skip
    for row in result.get("scale", {}).get("rows", []):
        for op in ("save", "restore"):
            o = row[op]
            rows.append([f"scale {op} {row['gib']:g} GiB @0.5: time", f"{o['seconds']:.2f} s",
                         f"line {o['line']['seconds_per_gib']:.3f} s/GiB" if "line" in o else "-",
                         f"{o.get('deviation_from_line', 0) * 100:.0f}% off", "<= 15%",
                         verdict(o.get("deviation_from_line", 0) <= GOALS["linear_deviation"])])
            floor = row.get("cpu_floor_seconds", {}).get(op)
            rows.append([f"scale {op} {row['gib']:g} GiB: CPU, {o['cpu_per_gib']:.3f} s/GiB",
                         f"{o['cpu_seconds']:.2f} s",
                         "-" if floor is None else f"{floor:.2f} s (kernel floor, dd)",
                         "-" if floor is None else f"{o['cpu_seconds'] / floor:.2f}x", "<= 0.15 s/GiB",
                         verdict(o["cpu_per_gib"] <= GOALS["cpu_per_gib"], GOALS["cpu_per_gib"] * row["gib"], floor)])
            rows.append([f"scale {op} {row['gib']:g} GiB: RssAnon peak", f"{o['rss_anon_peak'] / 2**20:.1f} MiB",
                         "", "", "<= 64 MiB", verdict(o["rss_anon_peak"] / 2**20 <= GOALS["rss_anon_mib"])])
    lv = result.get("live")
    if lv:
        rows.append([f"live save {lv['mem_mib']} MiB {lv['guest']} guest vs static", f"{lv['seconds']:.2f} s",
                     f"{lv['static_seconds']:.2f} s", ratio(lv["live_vs_static"], GOALS["live_vs_static"]), "<= 1.5x",
                     verdict(lv["live_vs_static"] <= GOALS["live_vs_static"] and lv["all_ok"])])
        dl = lv["dirty_limit"]
        rows.append([f"live save, dirty-limit {dl['vcpu_dirty_limit']} MB/s instead, vs static",
                     f"{dl['seconds']:.2f} s", f"{dl['static_seconds']:.2f} s",
                     ratio(dl["live_vs_static"], GOALS["live_vs_static"]),
                     "<= 1.5x", verdict(dl["live_vs_static"] <= GOALS["live_vs_static"] and dl["all_ok"])])
        ea = lv["earliest"]
        rows.append(["live save, 99 % from pass 2 on (the floor of a rule that waits for pass 1), vs static",
                     f"{ea['seconds']:.2f} s", f"{ea['static_seconds']:.2f} s", f"{ea['live_vs_static']:.2f}x",
                     "(report)", "-"])
        fs = lv.get("from_start")
        if fs:
            rows.append([f"live save, dirty-limit {fs['vcpu_dirty_limit']} MB/s from the start"
                         " (set-vcpu-dirty-limit), vs static",
                         f"{fs['seconds']:.2f} s", f"{fs['static_seconds']:.2f} s",
                         ratio(fs["live_vs_static"], GOALS["live_vs_static"]),
                         "<= 1.5x", verdict(fs["live_vs_static"] <= GOALS["live_vs_static"] and fs["all_ok"])])
        rows.append(["live save: first pass, guest running, vs static's writes (no fsync in either)",
                     f"{lv['first_pass_seconds']:.2f} s", f"{lv['static_pages_seconds']:.2f} s",
                     f"{lv['first_pass_vs_static']:.2f}x", "(report)", "-"])
    return rows  # fmt: skip


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " for _ in rows[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(text) + "\n\nmarkdown:\n" + "\n".join(md)


# -- main ------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="1,4", help="GiB, for save and restore against QEMU and fio")
    ap.add_argument("--densities", default="0.5,0.9")
    ap.add_argument("--scale-sizes", default="1,4,16", help="GiB")
    ap.add_argument("--scale-runs", type=int, default=1, help="runs of each scale size")
    ap.add_argument("--live-mem", type=int, default=1024, help="MiB")
    ap.add_argument("--qemu-variants", default=",".join(QEMU_VARIANTS))
    ap.add_argument("--skip", default="", help="parts to skip: save (save and restore), scale, live")
    ap.add_argument("--skip-faults", action="store_true", help="no in-process restores into other memory")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "speed.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if not drop_caches():
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)
    work = args.dir / "speed"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)  # as pip installs it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.strftime("%Y-%m-%d %H:%M")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    binary = find_qemu()
    if binary is None:
        raise SystemExit("QEMU not found: run tools/install-qemu.sh")
    result: dict[str, Any] = {"date": started, "machine": machine(), "qemu": ".".join(map(str, qemu_version(binary))),
                              "disk": str(work), "runs": args.runs, "mappedram": mappedram.__version__}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def keep() -> None:  # after each part: a later part's failure loses nothing
        args.json.write_text(json.dumps(result, indent=2, default=str))

    try:
        if "save" not in skip:
            result["save_restore"] = []
            for s in args.sizes.split(","):
                for d in args.densities.split(","):
                    result["save_restore"].append(bench_save_restore(int(float(s) * GiB), float(d), args, work, log))
                    keep()
        if "scale" not in skip:
            result["scale"] = bench_scale(args, work, log)
            keep()
        if "live" not in skip:
            result["live"] = bench_live(args, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for p in SHM.glob("speed-*"):
            unlink(p)
    rows = table(result)
    result["table"] = rows
    print(f"{started}, {result['machine']}, {result['qemu']}, disk {work} (medians of {args.runs})")
    print(render(rows))
    keep()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: which way of writing a half-zero RAM's pages is fastest on this disk.

A RAM image of ``--size-gib`` (default 4) GiB whose pages are non-zero with probability
``--density`` (default 0.5: random per page, so its runs are about 2 pages long) is in
/dev/shm; its pages are written to a file in ``--dir`` by the engine's page channels
(4 threads, extents of up to 2048 pages, fsync at the end), page cache dropped first,
in each of these ways:

* ``buffered holes``: the page cache; every zero page a hole (``--direct-io off``);
* ``direct holes``: O_DIRECT, one write per run of non-zero pages;
* ``direct holes, preallocated``: the same into a file ``fallocate``-d first (unwritten
  extents: the writes allocate nothing);
* ``direct merged gap N``: O_DIRECT, runs closer than N pages merged, the zero pages
  between them written (the save's default is 64);
* ``direct whole extents``: every extent written whole, zero pages and all.

and ``fio`` (O_DIRECT, 1 MiB, iodepth 16, then an fsync) writing the page data's bytes and the RAM's
bytes. Medians of ``--runs`` (default 3). Results go to ``bench-results/halfdensity.json``.

usage: python bench/halfdensity.py [--size-gib 4] [--density 0.5] [--runs 3] [--dir bench-work]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import PAGE, drop_caches, fio  # noqa: E402
from speed import write_ram  # noqa: E402

from mappedram.engine.executor import run_tasks  # noqa: E402
from mappedram.engine.pages import MemoryPages, PageWriteChannel, WriteTask  # noqa: E402

CHUNK = 2048
WAYS: dict[str, tuple[bool, int, bool]] = {  # name -> (direct, merge gap, preallocate)
    "buffered holes": (False, 0, False),
    "direct holes": (True, 0, False),
    "direct holes, preallocated": (True, 0, True),
    "direct merged gap 16": (True, 16, False),
    "direct merged gap 64 (default)": (True, 64, False),
    "direct merged gap 256": (True, 256, False),
    "direct whole extents": (True, CHUNK, False),
}


def write_once(ram: memoryview, out: Path, direct: bool, gap: int, prealloc: bool) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    npages = len(ram) // PAGE
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if prealloc:
            os.posix_fallocate(fd, 0, len(ram))
        drop_caches()
        bits = np.zeros(npages, dtype=np.bool_)
        tasks = [WriteTask(0, f, min(CHUNK, npages - f), f * PAGE, bits[f : f + CHUNK])
                 for f in range(0, npages, CHUNK)]  # fmt: skip
        made: list[PageWriteChannel] = []

        def channel(_: int) -> PageWriteChannel:
            ch = PageWriteChannel(str(out), [MemoryPages(ram)], PAGE, CHUNK, direct=direct, merge_gap=gap)
            made.append(ch)
            return ch

        t0 = time.perf_counter()
        run_tasks(tasks, channel, channels=4)  # closes the channels
        os.fsync(fd)
        seconds = time.perf_counter() - t0
        written = sum(ch.bytes_written for ch in made)
    finally:
        os.close(fd)
    stored = out.stat().st_blocks * 512
    out.unlink()
    return {"seconds": seconds, "bytes_written": written, "stored_bytes": stored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "halfdensity.json")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    args.dir.mkdir(parents=True, exist_ok=True)
    src, out, fio_file = Path("/dev/shm/halfdensity.ram"), args.dir / "halfdensity.out", args.dir / "halfdensity.fio"
    raw: dict[str, list[dict[str, Any]]] = {}
    try:
        nonzero = write_ram(src, size, args.density, seed=7)
        fd = os.open(src, os.O_RDONLY)
        ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        view = memoryview(ram)
        for run in range(args.runs):
            for name, (direct, gap, prealloc) in WAYS.items():
                r = write_once(view, out, direct, gap, prealloc)
                raw.setdefault(name, []).append(r)
                print(f"run {run + 1} {name:<32}{r['seconds']:7.2f} s", file=sys.stderr, flush=True)
            for what, n in (("page data", nonzero * PAGE), ("all RAM", size)):
                fio_file.unlink(missing_ok=True)
                drop_caches()
                raw.setdefault(f"fio write {what}", []).append(fio("write", fio_file, n))
            fio_file.unlink(missing_ok=True)
        del view
        ram.close()
    finally:
        for p in (src, out, fio_file):
            p.unlink(missing_ok=True)
    fio_data = statistics.median(r["seconds"] for r in raw["fio write page data"])
    print(f"{args.size_gib:g} GiB, density {args.density:g}: {nonzero * PAGE / 1e9:.2f} GB of page data "
          f"(medians of {args.runs})")  # fmt: skip
    print(f"{'way':<34}{'seconds':>8}{'written GB':>12}{'stored GB':>11}{'fio(data)/way':>15}")
    summary = {}
    for name, rs in raw.items():
        s = statistics.median(r["seconds"] for r in rs)
        wr = statistics.median(r.get("bytes_written", 0) for r in rs) / 1e9
        st = statistics.median(r.get("stored_bytes", 0) for r in rs) / 1e9
        summary[name] = {"seconds": s, "written_gb": wr, "stored_gb": st, "vs_fio_data": fio_data / s}
        print(f"{name:<34}{s:8.2f}{wr:12.2f}{st:11.2f}{fio_data / s:14.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "raw": raw, "nonzero_pages": nonzero}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

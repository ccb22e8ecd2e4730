#!/usr/bin/env python3
"""Benchmark: restoring the built-in KVM guest eagerly, by mapping its file, and lazily.

For each of ``--sizes-mib`` (default 1024,4096) a guest is saved once (``vm save``, its
fill half the data region, converged with a generous downtime limit); then ``--runs``
times (medians), with the page cache dropped before each:

* eager / map / lazy: time from the call to the guest's first instruction; for eager
  and lazy the time to full residency (eager: the same moment; lazy: the fill's end,
  reported by the loader), with the fill's GB/s; map has no fill (pages come from the
  page cache on first touch);
* ``fio`` reading, O_DIRECT, as many bytes as the file's page region holds (the disk's floor);
* repeat restores (``RestoreLoop``, map and eager): the guest runs until about 1 % and
  10 % of its pages are written, then ``reset()`` puts them back; against a full eager
  restore of the same file in the same run.

Goals: first instruction <= 10 ms with map and <= 50 ms with lazy at 4 GiB; lazy full
residency >= 0.8x fio read; a repeat restore at 1 % written >= 20x faster than a full one.

usage: python bench/restore_modes.py [--sizes-mib 1024,4096] [--runs 3] [--dir bench-work]
Results go to bench-results/restore_modes.json. Needs /dev/kvm and userfaultfd; run it
as root, or the caches cannot be dropped (it warns and runs warm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches, fio  # noqa: E402

import mappedram  # noqa: E402
from mappedram.vm.restore import RestoreLoop, restore_guest  # noqa: E402

BATCH = 4096


def _save(path: Path, mem_mib: int) -> None:
    if path.exists():
        return
    args = ["vm", "save", os.fspath(path), "--mem", str(mem_mib), "--batch", str(BATCH), "--warmup-iterations",
            str(4 * BATCH), "--step-batches", "4", "--downtime-limit", "1000", "-q"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "mappedram", *args], check=True)


def _restore(path: Path, mode: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with mappedram.open_file(path) as mf:
        vm, _, report = restore_guest(mf, mode=mode)
    with vm:
        vm.resume()
        while vm.first_entry is None:
            time.sleep(0.0005)
        first = vm.first_entry - t0
        resident = None
        gbps = None
        if mode == "lazy":
            vm.lazy.wait_resident(600)
            stats = vm.lazy.stats()
            gbps = stats.fill_gbps  # the fill starts when the restore is ready
            if stats.seconds_to_resident is not None:
                resident = report.seconds_to_ready + stats.seconds_to_resident
        elif mode == "eager":
            resident = report.seconds_to_ready
            gbps = report.ram_bytes / resident / 1e9
        later = vm.pause()
        ok = vm.check(later).ok
    return {"first_instruction_s": first, "resident_s": resident, "fill_gbps": gbps, "ok": ok}


def _repeat(path: Path, mode: str, fraction: float, pages: int) -> dict[str, Any]:
    with RestoreLoop(path, mode=mode) as loop:
        loop.reset()
        iterations = int(pages * fraction)
        counter = loop.cpu.counter + max(BATCH, iterations // BATCH * BATCH)
        loop.vm.run_until(counter, 600)
        r = loop.reset()
        ok = loop.vm.check(loop.cpu).ok
    return {"pages_rewritten": r.pages_rewritten, "fraction": r.pages_rewritten / r.pages, "seconds": r.seconds,
            "ok": ok}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", default="1024,4096")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="bench-work")
    ap.add_argument("--json", default="bench-results/restore_modes.json")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    if not drop_caches():
        print("warning: cannot drop the page cache (not root): restores run warm", file=sys.stderr)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "sizes": {}}
    for mem in [int(s) for s in args.sizes_mib.split(",")]:
        path = work / f"guest-{mem}.mig"
        _save(path, mem)
        with mappedram.open_file(path) as mf:
            b = mf.block("pc.ram")
            pages, data_bytes = b.num_pages, int(b.pages_present) * b.page_size
        runs: dict[str, list[dict[str, Any]]] = {"eager": [], "map": [], "lazy": [], "fio": []}
        for _ in range(args.runs):
            for mode in ("eager", "map", "lazy"):
                drop_caches()
                runs[mode].append(_restore(path, mode))
            drop_caches()
            runs["fio"].append(fio("read", work / "fio-read.dat", data_bytes))
        repeat = {}
        for mode in ("map", "eager"):
            for frac in (0.01, 0.10):
                repeat[f"{mode}-{frac:.0%}"] = [_repeat(path, mode, frac, pages) for _ in range(args.runs)]
        med = {m: {k: statistics.median([r[k] for r in v if r.get(k) is not None] or [float("nan")])
                   for k in v[0] if k != "ok"} for m, v in runs.items()}  # fmt: skip
        full = med["eager"]["resident_s"]
        rep = {k: statistics.median(r["seconds"] for r in v) for k, v in repeat.items()}
        results["sizes"][mem] = {"runs": runs, "repeat": repeat, "medians": med, "repeat_medians": rep,
                                 "data_bytes": data_bytes}  # fmt: skip
        fio_s = med["fio"]["seconds"]
        print(f"\n{mem} MiB guest, {data_bytes / 1e9:.2f} GB of page data; medians of {args.runs}")
        print("| mode | first instruction | resident | fill GB/s | vs fio read |")
        print("| --- | --- | --- | --- | --- |")
        for mode in ("eager", "map", "lazy"):
            m = med[mode]
            res = m["resident_s"]
            ratio = "-" if res != res or mode == "map" else f"{fio_s / res:.2f}x"
            res_text = "on touch" if mode == "map" else f"{res:.3f} s"
            gb = "-" if mode == "map" else f"{m['fill_gbps']:.2f}"
            print(f"| {mode} | {m['first_instruction_s'] * 1e3:.1f} ms | {res_text} | {gb} | {ratio} |")
        print(f"| fio O_DIRECT read | - | {fio_s:.3f} s | {data_bytes / fio_s / 1e9:.2f} | 1.00x |")
        print("| repeat restore | seconds | pages rewritten | vs full eager |")
        print("| --- | --- | --- | --- |")
        for k, v in rep.items():
            pr = statistics.median(r["pages_rewritten"] for r in repeat[k])
            print(f"| {k} | {v:.4f} | {pr:,.0f} | {full / v:.1f}x faster |")
        if not all(r["ok"] for v in runs.values() for r in v if "ok" in r):
            print("some restored guest did not verify", file=sys.stderr)
            return 1
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

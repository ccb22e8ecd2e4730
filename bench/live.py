#!/usr/bin/env python3
"""Benchmark: live saves of the built-in guest (the micro-VM on /dev/kvm, or the software guest).

Two parts, on a guest of ``--mem`` MiB (default 1024) that keeps rewriting its RAM:

* speed (``--runs`` times, medians): a live mapped-ram save (4 channels, direct-io,
  unlimited bandwidth, downtime limit 0.3 s) after ``--warmup`` seconds; then, the guest
  still paused, a plain ``ops.save`` of the same RAM (the same engine on RAM that does
  not change: the live save's floor) and ``fio`` writing as many bytes (the disk's floor),
  in the same run on the same disk. Reported: passes, downtime, seconds, GB/s of RAM, and
  the ratios live / static and live / fio.
* growth (once per format): the guest saved live at QEMU's default max-bandwidth
  (128 MiB/s) for ``--growth-passes`` passes, as mapped-ram and as legacy, each format on a
  fresh guest: the file size and the bytes on disk against the RAM (QEMU 10 measured on a
  1 GiB guest, heavy redirtying, 30 s live: legacy 4.34x, mapped-ram 1.01x).

usage: python bench/live.py [--mem 1024] [--runs 3] [--growth-passes 5] [--guest auto] [--dir bench-work]
Results go to bench-results/live.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mappedram import ops
from mappedram.ops import EngineOptions, LiveOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches, fio  # noqa: E402

from mappedram.vm import ops as vmops  # noqa: E402

QEMU_MAX_BANDWIDTH = 128 << 20  # QEMU's default max-bandwidth (MAX_THROTTLE, migration/options.c)


def speed_run(work: Path, kind: str, mem: int, warmup: float) -> dict[str, Any]:
    with vmops.make_guest(kind, vmops.GuestConfig(mem_mib=mem)) as vm:
        vm.start()
        vm.wait_filled(600)
        time.sleep(warmup)
        stopped: list[Any] = []
        drop_caches()
        t0 = time.perf_counter()
        live = vmops.live_save_guest(
            vm,
            work / "live.mig",
            "mapped-ram",
            stopped,
            live=LiveOptions(downtime_limit=0.3, max_passes=10),
            options=EngineOptions(channels=4, direct_io=True, direct_io_fallback=True),
        )
        live_seconds = time.perf_counter() - t0
        drop_caches()
        t0 = time.perf_counter()
        static = ops.save(
            work / "static.mig",
            {vm.ram_idstr: vm.memory},
            options=EngineOptions(channels=4, direct_io=True, direct_io_fallback=True),
        )
        static_seconds = time.perf_counter() - t0
    data = static.pages_written * 4096
    disk = fio("write", work / "fio.bin", data)["seconds"]
    for name in ("live.mig", "static.mig", "fio.bin"):
        (work / name).unlink(missing_ok=True)
    return {
        "passes": len(live.passes),
        "pages_per_pass": [p.pages_sent for p in live.passes],
        "downtime": live.downtime,
        "live_seconds": live_seconds,
        "static_seconds": static_seconds,
        "fio_seconds": disk,
        "ram_bytes": live.ram_bytes,
        "data_bytes": data,
        "file_size": live.file_size,
        "planned_size": live.planned_size,
    }


def growth_run(work: Path, kind: str, mem: int, warmup: float, fmt: str, passes: int) -> dict[str, Any]:
    with vmops.make_guest(kind, vmops.GuestConfig(mem_mib=mem)) as vm:
        vm.start()
        vm.wait_filled(600)
        time.sleep(warmup)
        t0 = time.perf_counter()
        r = vmops.live_save_guest(
            vm,
            work / f"growth-{fmt}.mig",
            fmt,
            [],
            live=LiveOptions(downtime_limit=0.3, max_passes=passes, bandwidth_limit=QEMU_MAX_BANDWIDTH),
            options=EngineOptions(channels=4, direct_io=fmt == "mapped-ram", direct_io_fallback=True),
        )
        seconds = time.perf_counter() - t0
    (work / f"growth-{fmt}.mig").unlink(missing_ok=True)
    return {
        "format": fmt,
        "passes": len(r.passes),
        "stop_reason": r.stop_reason,
        "seconds_live": seconds,
        "pages_per_pass": [p.pages_sent for p in r.passes],
        "file_size": r.file_size,
        "allocated_bytes": r.allocated_bytes,
        "ram_bytes": r.ram_bytes,
        "growth": r.growth,
        "on_disk": r.allocated_bytes / r.ram_bytes,
        "downtime": r.downtime,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--growth-passes", type=int, default=5)
    ap.add_argument("--guest", choices=vmops.GUEST_KINDS, default="auto")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results" / "live.json")
    args = ap.parse_args()
    choice = vmops.choose_guest(args.guest)
    if choice.reason:
        print(f"note: {choice.reason}; the software guest runs", file=sys.stderr)
    if not drop_caches():
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)
    work = args.dir / "live"
    work.mkdir(parents=True, exist_ok=True)
    try:
        speed = [speed_run(work, choice.kind, args.mem, args.warmup) for _ in range(args.runs)]
        growth = [growth_run(work, choice.kind, args.mem, args.warmup, fmt, args.growth_passes)
                  for fmt in ("mapped-ram", "legacy")]  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in speed)

    ram = speed[0]["ram_bytes"]
    summary = {
        "guest": choice.kind,
        "mem_mib": args.mem,
        "live_seconds": med("live_seconds"),
        "live_gbps": ram / med("live_seconds") / 1e9,
        "static_seconds": med("static_seconds"),
        "fio_seconds": med("fio_seconds"),
        "downtime": med("downtime"),
        "passes": [r["passes"] for r in speed],
        "live_vs_static": med("static_seconds") / med("live_seconds"),
        "live_vs_fio": med("fio_seconds") / med("live_seconds"),
        "growth": {
            g["format"]: {
                "file": g["growth"],
                "on_disk": g["on_disk"],
                "passes": g["passes"],
                "seconds": g["seconds_live"],
            }
            for g in growth
        },
    }
    print(f"{choice.kind} guest, {args.mem} MiB, {args.runs} runs (medians)")
    print(f"  live mapped-ram save (4 ch, direct-io): {summary['live_seconds']:.2f} s = {summary['live_gbps']:.2f} GB/s"
          f" of RAM, passes {summary['passes']}, downtime {summary['downtime']:.3f} s")  # fmt: skip
    print(f"  static save of the same RAM: {summary['static_seconds']:.2f} s (live/static speed"
          f" {summary['live_vs_static']:.2f}x); fio write of its data: {summary['fio_seconds']:.2f} s"
          f" (live/fio {summary['live_vs_fio']:.2f}x)")  # fmt: skip
    for fmt, g in summary["growth"].items():
        print(f"  at 128 MiB/s, {g['passes']} passes ({g['seconds']:.1f} s): {fmt} file {g['file']:.2f}x RAM,"
              f" {g['on_disk']:.2f}x on disk")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "speed": speed, "growth": growth}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

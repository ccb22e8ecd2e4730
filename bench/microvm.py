#!/usr/bin/env python3
"""Benchmark: the micro-VM on /dev/kvm: fill speed, loop speed, pause latency, verifier speed.

For each guest size (default 1024 and 64 MiB), `--runs` times:
  * fill: ``start()`` to ``wait_filled()``, with the dirty log on (the default) and off,
    of half the data region (``fill_fraction`` 0.5, the default) and of all of it (1.0);
  * loop: iterations per second of the unthrottled redirty loop over `--seconds`, measured
    between two exact pauses, in a VM made with the dirty log off; then again after
    ``set_dirty_log(True)``, with the log read (and so cleared and write-protected again)
    every 100 ms, as a live save's tracker does;
  * pause: the latency of ``pause()`` (request to exact state) and of ``resume()``;
  * verify: ``check_guest`` (registers, checksum recomputation and every data page).
Prints medians and writes JSON (bench-results/microvm.json).

usage: python bench/microvm.py [--sizes-mib 1024,64] [--runs 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mappedram.vm.guest import PAGE_SIZE  # noqa: E402
from mappedram.vm.kvm import kvm_available  # noqa: E402
from mappedram.vm.microvm import MicroVM, check_guest  # noqa: E402


def fill(size_mib: int, dirty_log: bool, fill_fraction: float) -> dict[str, float]:
    with MicroVM(size_mib, dirty_log=dirty_log, fill_fraction=fill_fraction) as vm:
        started = time.perf_counter()
        vm.start()
        vm.wait_filled(600)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "gbps": vm.fill_pages * PAGE_SIZE / seconds / 1e9}


def loop(size_mib: int, seconds: float) -> dict[str, Any]:
    with MicroVM(size_mib, dirty_log=False) as vm:
        vm.start()
        vm.wait_filled(600)
        time.sleep(0.5)  # the loop's first touches of the zero half
        out: dict[str, Any] = {}
        for mode in ("plain", "dirty-log every 100 ms"):
            first = vm.pause()
            if mode != "plain":
                vm.set_dirty_log(True)
            vm.resume()
            started = time.perf_counter()
            dirty_pages = 0
            while (elapsed := time.perf_counter() - started) < seconds:
                time.sleep(min(0.1, seconds - elapsed))
                if mode != "plain":
                    dirty_pages += int(vm.dirty_pages().sum())
            last = vm.pause()
            elapsed = time.perf_counter() - started
            out[mode] = {"iterations_per_second": (last.r8 - first.r8) / elapsed}
            if mode != "plain":
                out[mode]["dirty_pages_per_second"] = dirty_pages / elapsed
            vm.resume()
        pauses, resumes = [], []
        for _ in range(20):
            time.sleep(0.01)
            t = time.perf_counter()
            vm.pause()
            pauses.append(time.perf_counter() - t)
            t = time.perf_counter()
            vm.resume()
            resumes.append(time.perf_counter() - t)
        cpu = vm.pause()
        t = time.perf_counter()
        report = check_guest(vm.memory, cpu)
        out["verify"] = {"seconds": time.perf_counter() - t, "counter": cpu.r8, "ok": report.ok}
        out["pause_ms"] = statistics.median(pauses) * 1e3
        out["resume_ms"] = statistics.median(resumes) * 1e3
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1024,64")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "microvm.json")
    args = parser.parse_args()
    reason = kvm_available()
    if reason is not None:
        print(f"KVM is not usable here: {reason}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for size in [int(s) for s in args.sizes_mib.split(",")]:
        runs = [
            {
                "fill": fill(size, True, 0.5),
                "fill_no_dirty_log": fill(size, False, 0.5),
                "fill_all": fill(size, True, 1.0),
                "fill_all_no_dirty_log": fill(size, False, 1.0),
                **loop(size, args.seconds),
            }
            for _ in range(args.runs)
        ]

        def median(*path: str, runs: list[dict[str, Any]] = runs) -> float:
            values = []
            for run in runs:
                value: Any = run
                for key in path:
                    value = value[key]
                values.append(value)
            return float(statistics.median(values))

        summary = {
            "fill_seconds": median("fill", "seconds"),
            "fill_gbps": median("fill", "gbps"),
            "fill_seconds_no_dirty_log": median("fill_no_dirty_log", "seconds"),
            "fill_all_seconds": median("fill_all", "seconds"),
            "fill_all_seconds_no_dirty_log": median("fill_all_no_dirty_log", "seconds"),
            "iterations_per_second": median("plain", "iterations_per_second"),
            "iterations_per_second_dirty_log_100ms": median("dirty-log every 100 ms", "iterations_per_second"),
            "dirty_pages_per_second": median("dirty-log every 100 ms", "dirty_pages_per_second"),
            "pause_ms": median("pause_ms"),
            "resume_ms": median("resume_ms"),
            "verify_seconds": median("verify", "seconds"),
            "verify_counter": median("verify", "counter"),
            "verify_ok": all(run["verify"]["ok"] for run in runs),
        }
        results[f"{size} MiB"] = {"summary": summary, "runs": runs}
        print(f"{size} MiB guest (medians of {args.runs}):")
        print(f"  fill of half the RAM: {summary['fill_seconds']:.3f} s with the dirty log "
              f"({summary['fill_gbps']:.2f} GB/s), {summary['fill_seconds_no_dirty_log']:.3f} s without; "
              f"of all of it: {summary['fill_all_seconds']:.3f} s with, "
              f"{summary['fill_all_seconds_no_dirty_log']:.3f} s without")  # fmt: skip
        tracked = summary["iterations_per_second_dirty_log_100ms"] / 1e6
        print(f"  loop: {summary['iterations_per_second'] / 1e6:.1f} M iterations/s unthrottled, "
              f"{tracked:.3f} M/s with the dirty log read every 100 ms "
              f"({summary['dirty_pages_per_second']:.0f} dirty pages/s)")  # fmt: skip
        print(f"  pause {summary['pause_ms']:.2f} ms, resume {summary['resume_ms']:.2f} ms; "
              f"verify {summary['verify_seconds']:.2f} s at counter {summary['verify_counter']:.3g} "
              f"({'ok' if summary['verify_ok'] else 'MISMATCH'})")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

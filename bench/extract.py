#!/usr/bin/env python3
"""Benchmark: `mappedram extract` of a half-zero mapped-ram guest against reading the same file.

In one run, on the same disk, with the page cache dropped before every cold run:
  * QEMU saves a guest whose RAM (default 4 GiB, half the pages zero) is a known file
    (mapped-ram, multifd 4), once; the file is kept for later runs;
  * `cat FILE > /dev/null` reads the whole file (the disk's speed on these bytes);
  * `fio` reads the same number of data bytes with O_DIRECT, sequentially (the raw disk);
  * `mappedram extract FILE --block m0` writes the sparse raw image.
Prints medians and ratios, and writes JSON (bench-results/extract.json).
Needs root to drop the page cache (it says so and runs warm otherwise).

usage: python bench/extract.py [--size-gib 4] [--runs 3] [--dir bench-work] [--channels 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches, fio, write_ram  # noqa: E402
from tests.helpers.qemu_harness import QemuVM, file_uri, require_qemu  # noqa: E402

import mappedram  # noqa: E402


def timed(cmd: list[str] | str, *, shell: bool = False) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench-work"))
    ap.add_argument("--channels", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "extract.json"))
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) << 20
    mig = work / f"guest-{size >> 20}M.mig"
    ram = work / f"guest-{size >> 20}M.ram"
    if not mig.exists():
        require_qemu()
        print(f"making a {size >> 20} MiB half-zero guest and saving it with QEMU ...", flush=True)
        write_ram(ram, size, density=0.5, seed=0x5EED)
        with QemuVM(ram, machine="q35", ram_mib=size >> 20, workdir=work, timeout=120) as vm:
            vm.save(file_uri(mig), {"mapped-ram": True, "multifd": True}, {"multifd-channels": 4}, timeout=1800)
        ram.unlink()
    with mappedram.open_file(mig) as f:
        block = f.main_block
        data_bytes = block.pages_present * block.page_size
        name, logical = block.idstr, block.used_length

    cold = drop_caches()
    if not cold:
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)
    out = work / "extract.raw"
    fio_file = work / "fio.dat"
    if not fio_file.exists() or fio_file.stat().st_size < data_bytes:
        subprocess.run(
            [
                "fio",
                "--name=prep",
                f"--filename={fio_file}",
                "--rw=write",
                "--bs=1M",
                "--direct=1",
                f"--size={data_bytes}",
            ],
            check=True,
            capture_output=True,
        )

    results: dict[str, list[float]] = {"cat": [], "fio_read": [], "extract": []}
    for _ in range(args.runs):
        drop_caches()
        results["cat"].append(timed(f"cat {mig} > /dev/null", shell=True))
        drop_caches()
        results["fio_read"].append(fio("read", fio_file, data_bytes)["seconds"])
        out.unlink(missing_ok=True)
        drop_caches()
        results["extract"].append(
            timed(
                [
                    sys.executable,
                    "-m",
                    "mappedram",
                    "extract",
                    str(mig),
                    "--block",
                    name,
                    "-o",
                    str(out),
                    "--channels",
                    str(args.channels),
                    "--quiet",
                ]
            )
        )
    out.unlink(missing_ok=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "file": str(mig),
        "file_size": mig.stat().st_size,
        "block": name,
        "block_bytes": logical,
        "data_bytes": data_bytes,
        "cold_cache": cold,
        "channels": args.channels,
        "runs": results,
        "median_seconds": med,
        "data_gbps": {k: data_bytes / v / 1e9 for k, v in med.items()},
        "extract_vs_cat": med["cat"] / med["extract"],
        "extract_vs_fio_read": med["fio_read"] / med["extract"],
    }
    print(
        f"\n{name}: {logical / 2**30:.1f} GiB block, {data_bytes / 2**30:.2f} GiB of page data "
        f"({'cold' if cold else 'warm'} cache, {args.runs} runs, medians)"
    )
    print(f"{'what':<22}{'seconds':>10}{'data GB/s':>12}{'extract speed vs':>20}")
    for k in ("cat", "fio_read", "extract"):
        ratio = "" if k == "extract" else f"{med[k] / med['extract']:.2f}x"
        print(f"{k:<22}{med[k]:>10.2f}{data_bytes / med[k] / 1e9:>12.2f}{ratio:>20}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    shutil.disk_usage(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

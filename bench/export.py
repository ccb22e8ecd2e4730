#!/usr/bin/env python3
"""Benchmark: `mappedram export` (ELF core and raw image) of a 4 GiB guest against reading the file.

In one run, on the same disk, with the page cache dropped before every run:
  * a guest RAM image (default 4 GiB, half the pages zero, random data) is generated in
    /dev/shm and saved once with `mappedram.ops.writer` (machine pc-i440fx-10.0, so
    the guest-physical map splits it at 3 GiB); the file is kept for later runs;
  * `cat FILE > /dev/null` reads the whole file (the disk's speed on these bytes);
  * `fio` reads the same number of data bytes with O_DIRECT, sequentially (the raw disk);
  * `mappedram export FILE --format elf` (page-aligned data), `--format elf --qemu-layout`
    (data right after the notes, as QEMU) and `--format raw` write the sparse outputs
    (not fsynced, as `cat` does not either; each output is removed before the next run).
Prints medians and ratios, and writes JSON (bench-results/export.json).
Needs root to drop the page cache (it says so and runs warm otherwise).

usage: python bench/export.py [--size-gib 4] [--density 0.5] [--runs 3] [--dir bench-work] [--channels 2]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mappedram import ops
from mappedram.ops import EngineOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches, fio, write_ram  # noqa: E402

import mappedram  # noqa: E402

MACHINE = "pc-i440fx-10.0"


def timed(cmd: list[str] | str, *, shell: bool = False) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def make_file(mig: Path, size: int, density: float) -> None:
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else mig.parent
    ram = shm / f"mappedram-bench-export-{os.getpid()}.ram"
    try:
        print(f"generating {size >> 20} MiB of guest RAM (density {density}) and saving it ...", flush=True)
        write_ram(ram, size, density=density, seed=0x5EED)
        with ram.open("rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as buf:
            ops.save(mig, {"pc.ram": buf}, machine_type=MACHINE, options=EngineOptions(channels=2))
    finally:
        ram.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--density", type=float, default=0.5, help="fraction of non-zero pages")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench-work"))
    ap.add_argument("--channels", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "export.json"))
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) << 20
    mig = work / f"export-{size >> 20}M-d{args.density}.mig"
    if not mig.exists():
        make_file(mig, size, args.density)
    with mappedram.open_file(mig) as f:
        block = f.main_block
        data_bytes = block.pages_present * block.page_size

    cold = drop_caches()
    if not cold:
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)
    fio_file = work / "fio.dat"
    if not fio_file.exists() or fio_file.stat().st_size < data_bytes:
        subprocess.run(["fio", "--name=prep", f"--filename={fio_file}", "--rw=write", "--bs=1M", "--direct=1",
                        f"--size={data_bytes}"], check=True, capture_output=True)  # fmt: skip

    variants = {
        "export_elf": (work / "export.elf", ["--format", "elf"]),
        "export_elf_qemu_layout": (work / "export-q.elf", ["--format", "elf", "--qemu-layout"]),
        "export_raw": (work / "export.raw", ["--format", "raw"]),
    }
    results: dict[str, list[float]] = {"cat": [], "fio_read": [], **{k: [] for k in variants}}
    for _ in range(args.runs):
        drop_caches()
        results["cat"].append(timed(f"cat {mig} > /dev/null", shell=True))
        drop_caches()
        results["fio_read"].append(fio("read", fio_file, data_bytes)["seconds"])
        for name, (out, opts) in variants.items():
            out.unlink(missing_ok=True)
            drop_caches()
            cmd = [sys.executable, "-m", "mappedram", "export", str(mig), *opts, "-o", str(out),
                   "--channels", str(args.channels), "--quiet"]  # fmt: skip
            results[name].append(timed(cmd))
            out.unlink(missing_ok=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "file": str(mig),
        "file_size": mig.stat().st_size,
        "ram_bytes": size,
        "data_bytes": data_bytes,
        "density": args.density,
        "cold_cache": cold,
        "channels": args.channels,
        "runs": results,
        "median_seconds": med,
        "file_gbps": {k: mig.stat().st_size / v / 1e9 for k, v in med.items() if k != "fio_read"},
        "data_gbps": {k: data_bytes / v / 1e9 for k, v in med.items()},
        "elf_vs_cat": med["cat"] / med["export_elf"],
        "raw_vs_cat": med["cat"] / med["export_raw"],
        "elf_qemu_layout_vs_cat": med["cat"] / med["export_elf_qemu_layout"],
        "elf_vs_fio_read": med["fio_read"] / med["export_elf"],
        "raw_vs_fio_read": med["fio_read"] / med["export_raw"],
    }
    print(
        f"\n{size / 2**30:.1f} GiB guest ({MACHINE}), {data_bytes / 2**30:.2f} GiB of page data, file "
        f"{mig.stat().st_size / 2**30:.2f} GiB ({'cold' if cold else 'warm'} cache, {args.runs} runs, medians)"
    )
    print(f"{'what':<24}{'seconds':>10}{'data GB/s':>12}{'vs cat':>10}")
    for k in results:
        print(f"{k:<24}{med[k]:>10.2f}{data_bytes / med[k] / 1e9:>12.2f}{med['cat'] / med[k]:>9.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

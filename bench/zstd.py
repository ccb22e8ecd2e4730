#!/usr/bin/env python3
"""Benchmark: `mappedram compress` / `decompress` against `zstd -T0` of the same file.

In one run, on the same disk, the page cache dropped before every timed command:
  * the test vectors (QEMU 10's own files, tests/data/qemu) and a guest RAM image of
    --size-gib (default 4) GiB saved as mapped-ram by `mappedram save`: half its pages
    zero, the others a mix of text-like, half-zero and random pages (synthetic, named so:
    real guests compress differently);
  * `zstd -T0 -3 FILE -o OUT`: the whole file as one stream (no random access), and
    `zstd -d -T0`, each followed by `sync` (mappedram fsyncs what it writes);
  * `mappedram compress FILE OUT` (level 3, one thread per CPU, 2 MiB frames) and
    `mappedram decompress OUT FILE2` (a mapped-ram file QEMU loads);
  * a random page read from the compressed file (open, one frame decompressed), cold.
Ratios are the source file's size (its apparent size: holes count, as zstd reads them)
over the output's. Prints medians and writes JSON (bench-results/zstd.json).

usage: python bench/zstd.py [--size-gib 4] [--runs 3] [--dir bench-work] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import PAGE, drop_caches  # noqa: E402

from mappedram import ops  # noqa: E402
from mappedram.image import open_file  # noqa: E402

MAPPEDRAM = [sys.executable, "-m", "mappedram"]


def timed(cmd: list[str]) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def mixed_ram(path: Path, size: int, seed: int) -> None:
    """Half the pages zero; of the rest a third text-like (a small alphabet), a third half
    zero and half random, a third random."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"the quick brown fox jumps over a lazy dog 0123456789 ", dtype=np.uint8)
    chunk = 16384
    with path.open("wb") as f:
        for first in range(0, size // PAGE, chunk):
            n = min(chunk, size // PAGE - first)
            pages = np.zeros((n, PAGE), dtype=np.uint8)
            kind = rng.integers(0, 6, n)
            text = kind == 0
            pages[text] = words[rng.integers(0, len(words), (int(text.sum()), PAGE))]
            half = kind == 1
            pages[half, : PAGE // 2] = rng.integers(0, 256, (int(half.sum()), PAGE // 2), dtype=np.uint8)
            rand = kind == 2
            pages[rand] = rng.integers(0, 256, (int(rand.sum()), PAGE), dtype=np.uint8)
            pages[kind < 3, 0] |= 1
            f.write(pages.tobytes())


def vectors(work: Path) -> list[Path]:
    out = []
    for src in sorted((ROOT / "tests" / "data" / "qemu").glob("*.mig.zst")):
        dst = work / src.name[: -len(".zst")]
        if not dst.exists():
            subprocess.run(["zstd", "-qdf", str(src), "-o", str(dst)], check=True)
        out.append(dst)
    return out


def random_read(path: Path, runs: int = 20) -> float:
    """Median seconds to open the compressed file and read one random page, cold."""
    times = []
    with open_file(path) as mf:
        b = mf.main_block
        present = np.flatnonzero(b.present)
    rnd = random.Random(1)
    for _ in range(runs):
        page = int(present[rnd.randrange(len(present))])
        drop_caches()
        t0 = time.perf_counter()
        with open_file(path) as mf:
            mf.read_pages(mf.main_block, page, 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(src: Path, work: Path, runs: int) -> dict[str, object]:
    out_z, out_m, back = work / (src.name + ".zst"), work / (src.name + ".mrz"), work / (src.name + ".back")
    size = src.stat().st_size
    at = re.search(r"offset(\d+)", src.name)
    offset = int(at.group(1)) if at else 0  # QEMU's file:PATH,offset=N
    target = f"file:{src},offset={offset}" if offset else str(src)
    res: dict[str, list[float]] = {k: [] for k in ("zstd", "zstd_d", "compress", "decompress")}
    for _ in range(runs):
        for p in (out_z, out_m, back):
            p.unlink(missing_ok=True)
        # zstd does not fsync its output and mappedram does (its save protocol): zstd's times
        # include a sync, so both have their output on disk when the clock stops
        res["zstd"].append(timed(["sh", "-c", f"zstd -q -T0 -3 '{src}' -o '{out_z}' && sync"]))
        res["zstd_d"].append(timed(["sh", "-c", f"zstd -q -d -T0 -f '{out_z}' -o '{back}' && sync"]))
        back.unlink()
        res["compress"].append(timed([*MAPPEDRAM, "compress", target, str(out_m), "-q"]))
        res["decompress"].append(timed([*MAPPEDRAM, "decompress", str(out_m), str(back), "-q"]))
    assert ops.diff(src, back, offset_a=offset).identical, f"{back} differs from {src}"
    with open_file(src, offset) as mf:
        ram = sum(b.used_length for b in mf.blocks)
        data = sum(b.pages_present for b in mf.blocks) * mf.page_size
    med = {k: statistics.median(v) for k, v in res.items()}
    row: dict[str, object] = {
        "file": src.name, "file_bytes": size, "ram_bytes": ram, "data_bytes": data,
        "zstd_bytes": out_z.stat().st_size, "mappedram_bytes": out_m.stat().st_size,
        "zstd_ratio": size / out_z.stat().st_size, "mappedram_ratio": size / out_m.stat().st_size,
        **{f"{k}_seconds": v for k, v in med.items()},
        "compress_vs_zstd": med["compress"] / med["zstd"], "decompress_vs_zstd_d": med["decompress"] / med["zstd_d"],
        "random_page_seconds": random_read(out_m),
        "runs": res,
    }  # fmt: skip
    for p in (out_z, back):
        p.unlink(missing_ok=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--skip-big", action="store_true", help="the test vectors only")
    args = ap.parse_args()
    if not drop_caches():
        print("note: not root: the page cache is not dropped (warm numbers)")
    args.dir.mkdir(parents=True, exist_ok=True)
    work = args.dir / "zstd"
    work.mkdir(exist_ok=True)
    files = vectors(work)
    if not args.skip_big:
        big = work / f"mixed-{args.size_gib:g}g.mig"
        if not big.exists():
            raw = work / "mixed.raw"
            mixed_ram(raw, int(args.size_gib * (1 << 30)), 7)
            ops.save(big, {"pc.ram": np.memmap(raw, dtype=np.uint8, mode="r")})
            raw.unlink()
        files.append(big)
    rows = [measure(f, work, args.runs) for f in files]
    print(f"{'file':<40} {'size':>9} {'zstd -T0':>18} {'mappedram':>18} {'comp x':>7} {'dec x':>6} {'page ms':>8}")
    for r in rows:
        print(f"{r['file']:<40} {r['file_bytes'] / 1e6:>7.1f}MB "
              f"{r['zstd_ratio']:>7.1f}x {r['zstd_seconds']:>7.2f}s   "
              f"{r['mappedram_ratio']:>7.1f}x {r['compress_seconds']:>7.2f}s "
              f"{r['compress_vs_zstd']:>7.2f} {r['decompress_vs_zstd_d']:>6.2f} "
              f"{float(str(r['random_page_seconds'])) * 1e3:>8.2f}")  # fmt: skip
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "zstd.json").write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"JSON: {out / 'zstd.json'}")
    shutil.rmtree(work / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()

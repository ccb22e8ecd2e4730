#!/usr/bin/env python3
"""Benchmark: `mappedram seal` and `mappedram verify --data` against `sha256sum` (and `b3sum`).

In one run, on the same disk, with the page cache dropped before every timed command:
  * a guest RAM image of --size-gib (default 4) GiB, half its pages zero (random data in
    the others), saved once as mapped-ram by `mappedram save` (kept for later runs);
  * `cat FILE > /dev/null`: the disk's speed on these bytes (holes cost nothing);
  * `sha256sum FILE` and, if installed, `b3sum FILE`: every byte of the file hashed once;
  * `mappedram seal FILE` (blake3, and --algorithm sha256) and `mappedram verify FILE --data`:
    the chunks holding stored pages read and digested by --channels channels, the zero
    chunks never read;
  * the digests alone, in memory: BLAKE3 and SHA-256 (keyed: BLAKE3's keyed hash and
    HMAC-SHA256) of 1 MiB chunks on 1 and 4 threads, the numbers the algorithm was chosen by.
Prints medians and writes JSON (bench-results/seal.json). Needs root to drop the page
cache (it says so and runs warm otherwise).

usage: python bench/seal.py [--size-gib 4] [--runs 3] [--dir bench-work] [--channels 4]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches, write_ram  # noqa: E402

import mappedram  # noqa: E402
from mappedram import ops  # noqa: E402

MIB = 1 << 20


def timed(cmd: list[str]) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def hash_rate(fn: Callable[[bytes], bytes], threads: int, chunks: int = 512) -> float:
    """GiB/s of ``fn`` over 1 MiB chunks, ``threads`` threads each hashing ``chunks / threads``."""
    data = os.urandom(MIB)
    per = max(1, chunks // threads)

    def work() -> None:
        for _ in range(per):
            fn(data)

    best = 0.0
    for _ in range(3):
        pool = [threading.Thread(target=work) for _ in range(threads)]
        start = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        best = max(best, per * threads / (time.perf_counter() - start) / 1024)
    return best


def digests() -> dict[str, dict[str, float]]:
    key = os.urandom(32)
    fns: dict[str, Callable[[bytes], bytes]] = {
        "blake3": lambda d: blake3.blake3(d).digest(),
        "blake3-keyed": lambda d: blake3.blake3(d, key=key).digest(),
        "sha256": lambda d: hashlib.sha256(d).digest(),
        "hmac-sha256": lambda d: hmac.new(key, d, hashlib.sha256).digest(),
    }
    return {name: {f"{n}-thread": hash_rate(fn, n) for n in (1, 4)} for name, fn in fns.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench-work"))
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "seal.json"))
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // MIB * MIB
    mig = work / f"seal-{size >> 20}M.mig"
    if not mig.exists():
        ram = work / f"seal-{size >> 20}M.ram"
        print(f"making a {size >> 20} MiB half-zero guest and saving it ...", flush=True)
        write_ram(ram, size, density=0.5, seed=0x5EED)
        ops.save_files(mig, [("pc.ram", os.fspath(ram))], options=ops.EngineOptions(channels=4))
        ram.unlink()
    cold = drop_caches()
    if not cold:
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)

    me = [sys.executable, "-m", "mappedram"]
    ch = ["--channels", str(args.channels), "--quiet"]
    commands: dict[str, list[str]] = {
        "cat > /dev/null": ["cat", str(mig)],
        "sha256sum": ["sha256sum", str(mig)],
        "seal (blake3)": [*me, "seal", str(mig), *ch],
        "verify --data (blake3)": [*me, "verify", str(mig), "--data", *ch],
        "seal (sha256)": [*me, "seal", str(mig), "--algorithm", "sha256", *ch],
        "verify --data (sha256)": [*me, "verify", str(mig), "--data", *ch],
    }
    if shutil.which("b3sum"):
        commands = {"b3sum": ["b3sum", str(mig)], **commands}
    runs: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():  # in order: each verify checks the seal just written
            runs[name].append(timed(cmd))
    subprocess.run([*me, "seal", str(mig), *ch], check=True)  # leave it sealed with the default

    with mappedram.open_file(mig) as f:
        ram_bytes = sum(b.used_length for b in f.blocks)
        data_bytes = sum(b.pages_present for b in f.blocks) * f.page_size
    file_bytes = mig.stat().st_size
    med = {k: statistics.median(v) for k, v in runs.items()}
    hashes = digests()
    report = {
        "file": str(mig), "file_size": file_bytes, "ram_bytes": ram_bytes, "data_bytes": data_bytes,
        "cold_cache": cold, "channels": args.channels, "cpus": os.cpu_count(), "runs": runs, "median_seconds": med,
        "ram_gbps": {k: ram_bytes / v / 1e9 for k, v in med.items()},
        "file_gbps": {k: file_bytes / v / 1e9 for k, v in med.items()},
        "vs_sha256sum": {k: med["sha256sum"] / v for k, v in med.items()},
        "digest_gib_per_s_1mib_chunks": hashes,
    }  # fmt: skip
    print(f"\n{mig.name}: {ram_bytes / 2**30:.1f} GiB of RAM, {data_bytes / 2**30:.2f} GiB of page data, file "
          f"{file_bytes / 2**30:.2f} GiB ({'cold' if cold else 'warm'} cache, {args.runs} runs, medians, "
          f"{args.channels} channels, {os.cpu_count()} CPUs)")  # fmt: skip
    print(f"{'what':<26}{'seconds':>9}{'RAM GB/s':>10}{'file GB/s':>11}{'vs sha256sum':>14}")
    for k in commands:
        print(f"{k:<26}{med[k]:>9.2f}{ram_bytes / med[k] / 1e9:>10.2f}{file_bytes / med[k] / 1e9:>11.2f}"
              f"{med['sha256sum'] / med[k]:>13.2f}x")  # fmt: skip
    print("\ndigests of 1 MiB chunks in memory (GiB/s, best of 3):")
    print(f"{'algorithm':<16}{'1 thread':>10}{'4 threads':>11}")
    for name, rates in hashes.items():
        print(f"{name:<16}{rates['1-thread']:>10.2f}{rates['4-thread']:>11.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

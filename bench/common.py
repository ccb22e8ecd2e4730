"""Helpers the benchmarks share: dropping the page cache, and fio as the disk's baseline."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["PAGE", "drop_caches", "fio", "write_ram"]

PAGE = 4096


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False if it could not be dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fio(rw: str, path: Path, size: int) -> dict[str, float]:
    """fio sequential O_DIRECT ``rw`` (write/read) of ``size`` bytes, bs=1M, iodepth 16, libaio;
    a write ends with an fsync, counted in its time (a save fsyncs: on a virtual disk whose
    host caches writes, the flush is where the bytes reach the disk)."""
    out = subprocess.run(
        ["fio", f"--name={rw}", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", f"--size={size}", "--output-format=json",
         *(["--end_fsync=1"] if rw == "write" else [])],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0][rw]
    return {"seconds": size / job["bw_bytes"], "fio_runtime_ms": job["runtime"]}


def write_ram(path: Path, size: int, density: float, seed: int) -> int:
    """A guest RAM image: page i non-zero (random bytes) with probability ``density``; returns non-zero pages."""
    rng = np.random.default_rng(seed)
    chunk_pages = 16384
    nonzero = 0
    with path.open("wb") as f:
        for first in range(0, size // PAGE, chunk_pages):
            n = min(chunk_pages, size // PAGE - first)
            keep = rng.random(n) < density
            k = int(keep.sum())
            pages = np.zeros((n, PAGE), dtype=np.uint8)
            data = np.frombuffer(rng.bytes(k * PAGE), dtype=np.uint8).reshape(k, PAGE).copy()
            data[:, 0] |= 1  # never an all-zero page by chance
            pages[keep] = data
            nonzero += k
            f.write(pages.tobytes())
    return nonzero

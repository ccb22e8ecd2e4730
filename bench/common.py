"""Helpers the benchmarks share: dropping the page cache, and fio as the disk's baseline."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

__all__ = ["drop_caches", "fio"]


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False if it could not be dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fio(rw: str, path: Path, size: int) -> dict[str, float]:
    """fio sequential O_DIRECT ``rw`` (write/read) of ``size`` bytes, bs=1M, iodepth 16, libaio."""
    out = subprocess.run(
        ["fio", f"--name={rw}", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", f"--size={size}", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0][rw]
    return {"seconds": size / job["bw_bytes"], "fio_runtime_ms": job["runtime"]}

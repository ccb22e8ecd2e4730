"""gather_pages_at: pages read from a file straight to arbitrary places in a buffer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mappedram.engine.copy import gather_pages_at
from mappedram.engine.fileio import open_read

PS = 4096


@pytest.mark.parametrize("layout", ["contiguous", "runs", "scattered"])
def test_pages_land_where_told(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(7)
    n_file = 300
    stride = PS if layout != "scattered" else PS + 8  # a legacy stream: a header before each page
    blob = rng.integers(0, 255, size=n_file * stride, dtype=np.uint8)
    path = tmp_path / "f"
    path.write_bytes(blob.tobytes())
    if layout == "contiguous":
        idx = np.arange(20, 220)
    elif layout == "runs":
        idx = np.concatenate([np.arange(0, 40), np.arange(100, 101), np.arange(150, 290)])
    else:
        idx = np.sort(rng.choice(n_file, 120, replace=False))
    src = (idx * stride).astype(np.int64)
    dst = (np.arange(len(idx)) * (PS + 13) + 5).astype(np.int64)
    out = bytearray(int(dst[-1]) + PS + 7)
    fd = open_read(os.fspath(path))
    try:
        gather_pages_at(fd, os.fspath(path), src, PS, memoryview(out), dst)
    finally:
        os.close(fd)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert out[d : d + PS] == blob[s : s + PS].tobytes()
    assert out[:5] == b"\0" * 5


def test_absent_pages_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\1" * PS)
    fd = open_read(os.fspath(path))
    try:
        with pytest.raises(ValueError):
            gather_pages_at(fd, os.fspath(path), np.array([-1], np.int64), PS, memoryview(bytearray(PS)),
                            np.array([0], np.int64))  # fmt: skip
    finally:
        os.close(fd)

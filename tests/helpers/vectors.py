"""The QEMU-made test vectors (tests/data/qemu): their index, and decompression with holes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import DATA

__all__ = ["QEMU_DATA", "INDEX", "VECTORS", "vector_meta", "unzstd_sparse"]

QEMU_DATA = DATA / "qemu"
INDEX: dict[str, Any] = json.loads((QEMU_DATA / "index.json").read_text())
VECTORS = [f["name"] for f in INDEX["files"]]


def vector_meta(name: str) -> dict[str, Any]:
    return next(f for f in INDEX["files"] if f["name"] == name)


def unzstd_sparse(src: Path, dst: Path) -> None:
    """Decompress ``src`` into ``dst``, leaving holes where whole 1 MiB chunks are zero."""
    import zstandard

    with src.open("rb") as fin, dst.open("wb") as fout:
        reader = zstandard.ZstdDecompressor().stream_reader(fin)
        while chunk := reader.read(1 << 20):
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), 1)
            else:
                fout.write(chunk)
        fout.truncate()

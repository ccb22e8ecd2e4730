"""Shared fixtures: the QEMU-made test vectors (decompressed once per session) and their pattern."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).parent / "data" / "qemu"
sys.path.insert(0, str(Path(__file__).parent))

INDEX: dict[str, Any] = json.loads((DATA / "index.json").read_text())
VECTORS = [f["name"] for f in INDEX["files"]]


def vector_meta(name: str) -> dict[str, Any]:
    return next(f for f in INDEX["files"] if f["name"] == name)


@pytest.fixture(scope="session")
def vector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eight QEMU 10.0.2 files, decompressed (holes restored where the pages are zero)."""
    out = tmp_path_factory.mktemp("vectors")
    for name in VECTORS:
        unzstd_sparse(DATA / f"{name}.zst", out / name)
    return out


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


@pytest.fixture(scope="session")
def expected_ram() -> bytes:
    """The 64 MiB ``m0`` pattern of the vectors (tests/data/qemu/expected_ram.py, vectorised)."""
    from patterns import qemu_vector_pattern

    return qemu_vector_pattern(INDEX["ram_mib"] << 20, INDEX["seed"], INDEX["zero_permille"])


@pytest.fixture
def vector(vector_dir: Path):  # type: ignore[no-untyped-def]
    def get(name: str) -> tuple[Path, int]:
        meta = vector_meta(name)
        return vector_dir / name, meta["offset"] or 0

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        if "qemu" in item.keywords and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)


_ = np  # numpy is imported by the helpers the fixtures load

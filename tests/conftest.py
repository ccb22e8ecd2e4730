"""Shared fixtures: the QEMU-made test vectors (decompressed once per session) and their pattern."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.patterns import qemu_vector_pattern
from tests.helpers.vectors import INDEX, QEMU_DATA, VECTORS, unzstd_sparse, vector_meta


@pytest.fixture(scope="session", autouse=True)
def _direct_io_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``--direct-io auto`` keeps its probe results in the session's own cache directory
    (in this process and the CLI processes tests start), never in the user's."""
    before = os.environ.get("MAPPEDRAM_CACHE_DIR")
    os.environ["MAPPEDRAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("MAPPEDRAM_CACHE_DIR", None)
    else:
        os.environ["MAPPEDRAM_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def vector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eight QEMU 10.0.2 files, decompressed (holes restored where the pages are zero)."""
    out = tmp_path_factory.mktemp("vectors")
    for name in VECTORS:
        unzstd_sparse(QEMU_DATA / f"{name}.zst", out / name)
    return out


@pytest.fixture(scope="session")
def expected_ram() -> bytes:
    """The 64 MiB ``m0`` pattern of the vectors (tests/data/qemu/expected_ram.py, vectorised)."""
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

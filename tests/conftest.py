"""Shared fixtures: the QEMU-made test vectors (decompressed once per session) and their pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.patterns import qemu_vector_pattern
from tests.helpers.vectors import INDEX, QEMU_DATA, VECTORS, unzstd_sparse, vector_meta


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

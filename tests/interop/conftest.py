"""Fixtures of the interop tests."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private directory on tmpfs for a postcopy destination's RAM: QEMU's postcopy
    registers shared memory with userfaultfd, which a file on a disk filesystem does not take."""
    base = Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm: a postcopy destination needs its RAM on tmpfs")
    path = base / f"mappedram-test-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

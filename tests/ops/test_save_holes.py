"""Saves of raw image files: the pages in a file's holes are zero pages and are never read.

On tmpfs a read through a mapping fills a hole (the kernel allocates and clears a page), so
a save that read them would make a sparse RAM image take its whole size; the file's block
count tells whether any hole was read. Elsewhere the same saves must be bit-exact.
"""

from __future__ import annotations

import mmap
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappedram import ops
from mappedram.engine.directio import probe_direct_io
from mappedram.engine.fileio import DataCursor, data_extents
from mappedram.engine.pages import MemoryPages, PageReader
from mappedram.ops import EngineOptions
from tests.helpers.patterns import PAGE

DIRECT_OK = probe_direct_io("/tmp") is None
NPAGES = 5000  # more than two save tasks (CHUNK_PAGES)


def _on_tmpfs(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "tmpfs" for line in f)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not _on_tmpfs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here: the test watches tmpfs fill a hole")
    d = Path("/dev/shm") / f"mappedram-test-{uuid.uuid4().hex}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _layout(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which pages hold data in the file (the rest are holes), and which of those are zeros."""
    if kind == "random":  # holes of about 2 pages between data of about 2: many short extents
        held = rng.random(NPAGES) < 0.5
    elif kind == "runs":  # a few long extents
        held = np.zeros(NPAGES, dtype=np.bool_)
        for s in (0, 700, 2047, 4100):
            held[s : s + 300] = True
    elif kind == "holes":
        held = np.zeros(NPAGES, dtype=np.bool_)
    else:  # "full": no hole at all
        held = np.ones(NPAGES, dtype=np.bool_)
    zero = held & (rng.random(NPAGES) < 0.2)  # stored, but all zeros: found by the scan
    return held, zero


def _write_image(path: Path, held: np.ndarray, zero: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ram = np.zeros((NPAGES, PAGE), dtype=np.uint8)
    data = held & ~zero
    ram[data] = rng.integers(0, 256, (int(data.sum()), PAGE), dtype=np.uint8)
    ram[data, 0] |= 1
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, NPAGES * PAGE)
        for i in np.flatnonzero(held).tolist():
            os.pwrite(fd, ram[i].tobytes(), i * PAGE)
    finally:
        os.close(fd)
    return ram


@pytest.mark.parametrize("direct", [False, True] if DIRECT_OK else [False])
@pytest.mark.parametrize("kind", ["random", "runs", "holes", "full"])
def test_save_files_reads_no_hole_of_a_tmpfs_image(tmp_path, shm_dir, direct, kind):
    rng = np.random.default_rng(len(kind))
    held, zero = _layout(kind, rng)
    image = shm_dir / "ram.img"
    ram = _write_image(image, held, zero, rng)
    blocks_before = image.stat().st_blocks
    assert blocks_before * 512 == int(held.sum()) * PAGE

    out = tmp_path / "s.mig"
    rep = ops.save_files(out, [("pc.ram", str(image))], options=EngineOptions(channels=3, direct_io=direct))

    assert image.stat().st_blocks == blocks_before, "the save filled holes of its source"
    assert rep.pages_written == int((held & ~zero).sum())
    assert ops.verify(out).ok
    dest = np.full((NPAGES, PAGE), 0xA5, dtype=np.uint8)  # absent pages must come out as zeros
    got = ops.restore(out, {"pc.ram": dest}, zero_absent=True, options=EngineOptions(direct_io=direct))
    assert got.pages_read == rep.pages_written
    assert np.array_equal(dest, ram)


@pytest.mark.parametrize("kind", ["random", "runs", "holes", "full"])
def test_reader_finds_the_data_pages_of_a_sparse_file(tmp_path, kind):
    """SEEK_DATA/SEEK_HOLE per task range, on whatever filesystem tmp_path is (a page partly
    in an extent counts as data; where the filesystem cannot tell, every page may hold data)."""
    rng = np.random.default_rng(7)
    held, zero = _layout(kind, rng)
    image = tmp_path / "ram.img"
    _write_image(image, held, zero, rng)
    fd = os.open(image, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, NPAGES * PAGE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(m)
    try:
        with PageReader([MemoryPages(view, str(image))], PAGE, 2048) as reader:
            for first, count in ((0, NPAGES), (1, 2047), (2047, 2), (4999, 1)):
                got = reader.data(0, first, count)
                want = held[first : first + count]
                if got is None:
                    assert want.all() or not _reports_holes(image)
                else:
                    assert got.dtype == np.bool_ and len(got) == count
                    assert np.array_equal(got, want), (first, count)
        with PageReader([MemoryPages(view)], PAGE, 2048) as reader:
            assert reader.data(0, 0, NPAGES) is None  # not a file: no hole known
    finally:
        view.release()
        m.close()


def _reports_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    except OSError:
        return False
    finally:
        os.close(fd)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_data_cursor_gives_each_range_what_seeking_afresh_gives(shm_dir, data):
    """A cursor reused across ranges in any order answers as SEEK_DATA/SEEK_HOLE asked afresh
    for each range does, and as the file was written (tmpfs keeps every hole it was given)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    held, zero = _layout(data.draw(st.sampled_from(["random", "runs", "holes", "full"])), rng)
    image = shm_dir / "ram.img"
    _write_image(image, held, zero, rng)
    fd = os.open(image, os.O_RDONLY)
    try:
        cursor = DataCursor(fd, str(image))
        for _ in range(data.draw(st.integers(1, 12))):
            first = data.draw(st.integers(0, NPAGES - 1))
            count = data.draw(st.integers(1, NPAGES - first))
            got = cursor.extents(first * PAGE, (first + count) * PAGE)
            assert got == data_extents(fd, first * PAGE, (first + count) * PAGE, str(image))
            pages = np.zeros(count, dtype=np.bool_)
            for s, e in got:
                pages[s // PAGE - first : e // PAGE - first] = True
            assert np.array_equal(pages, held[first : first + count]), (first, count)
    finally:
        os.close(fd)


def test_reader_seeks_a_long_extent_once_for_all_its_tasks(shm_dir, monkeypatch):
    """Tasks in order over a file written in full: one SEEK_DATA/SEEK_HOLE pair in all, not
    one per task (SEEK_HOLE walks tmpfs's page cache to the extent's end: per task, a save
    of a fully written RAM image spent a second of CPU per GiB seeking)."""
    image = shm_dir / "ram.img"
    image.write_bytes(os.urandom(NPAGES * PAGE))
    seeks: list[int] = []
    real_lseek = os.lseek

    def counting_lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            seeks.append(how)
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting_lseek)
    fd = os.open(image, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, NPAGES * PAGE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(m)
    try:
        with PageReader([MemoryPages(view, str(image))], PAGE, 512) as reader:
            for first in range(0, NPAGES, 512):
                assert reader.data(0, first, min(512, NPAGES - first)) is None
    finally:
        view.release()
        m.close()
    assert seeks == [os.SEEK_DATA, os.SEEK_HOLE]

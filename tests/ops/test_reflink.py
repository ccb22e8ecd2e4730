"""Children written as reflink clones of their parent (ops/chain.write_child, engine/fileio.reflink).

On XFS with reflink (a loop-mounted image: the module's fixture needs root and mkfs.xfs,
and skips, saying which, without them) a child starts as a FICLONE clone of its parent:
FIEMAP shows the slots of the unchanged pages shared with the parent, the changed pages
written in blocks of the child's own, the pages that became zero punched out; the parent
is never modified, and the child reads right. Where the filesystem cannot clone (ext4,
tmpfs: tmp_path here) the child is a sparse file of the changed pages, and says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import mappedram
from mappedram import ops
from mappedram.engine.fileio import open_write, reflink
from mappedram.errors import IntegrityError
from mappedram.ops import SealOptions
from tests.helpers.patterns import random_pages
from tests.helpers.streams import device_state, mapped_ram_stream

PAGE = 4096
PAGES = 4096  # pc.ram: 16 MiB
BIOS = random_pages(16, 0.0, 9)
IMAGE_BYTES = 512 << 20

# linux/fiemap.h
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, fm_reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # fe_logical, fe_physical, fe_length, 2 reserved, fe_flags, 3 reserved
_BATCH = 256


@dataclass(frozen=True)
class Extent:
    logical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)


def fiemap(path: Path) -> list[Extent]:
    """The file's extents (FS_IOC_FIEMAP, synced first)."""
    out: list[Extent] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_FIEMAP.size + _BATCH * _EXTENT.size)
            _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP.unpack_from(buf, 0)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                logical, _, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size)
                out.append(Extent(logical, length, flags))
            if out[-1].flags & FIEMAP_EXTENT_LAST:
                return out
            start = out[-1].end


def slot_states(extents: list[Extent], pages_offset: int, pages: int) -> npt.NDArray[np.int8]:
    """Per page slot: 0 a hole, 1 blocks of the file's own, 2 blocks shared with another file
    (-1: a slot partly in an extent, which a 4 KiB-block filesystem never gives)."""
    state = np.zeros(pages, dtype=np.int8)
    end = pages_offset + pages * PAGE
    for e in extents:
        lo, hi = max(e.logical, pages_offset), min(e.end, end)
        if lo >= hi:
            continue
        first, last = (lo - pages_offset) // PAGE, (hi - pages_offset + PAGE - 1) // PAGE
        if (lo - pages_offset) % PAGE or (hi - pages_offset) % PAGE:
            state[first:last] = -1
        else:
            state[first:last] = 2 if e.shared else 1
    return state


def own_bytes(extents: list[Extent]) -> int:
    """Bytes in blocks the file does not share."""
    return sum(e.length for e in extents if not e.shared)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _find(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a fresh XFS filesystem with reflink (a 512 MiB loop-mounted image),
    unmounted and deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS loop image needs root")
    mkfs = _find("mkfs.xfs")
    if mkfs is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs): no filesystem with reflink to clone on")
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    try:
        made = subprocess.run([mkfs, "-q", "-m", "reflink=1", os.fspath(image)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert made.returncode == 0, f"mkfs.xfs -m reflink=1 failed: {made.stderr}"
        mounted = subprocess.run(["mount", "-o", "loop", os.fspath(image), os.fspath(mnt)], capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        assert mounted.returncode == 0, f"mount -o loop of the XFS image failed: {mounted.stderr}"
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", os.fspath(mnt)], capture_output=True, timeout=120).returncode != 0:
                subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, timeout=120)
    finally:
        image.unlink(missing_ok=True)


@pytest.fixture
def xfs_dir(xfs: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of this test's own on the XFS filesystem (removed afterwards: it is small)."""
    path = xfs / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    ram_a: npt.NDArray[np.uint8]  # (PAGES, PAGE)
    ram_b: npt.NDArray[np.uint8]
    rewritten: npt.NDArray[np.int64]
    became_zero: npt.NDArray[np.int64]
    became_nonzero: npt.NDArray[np.int64]


def _save(path: Path, ram: npt.NDArray[np.uint8]) -> Path:
    state, trailer = device_state()
    # through the page cache, every zero page a hole (O_DIRECT writes merged extents, zeros included)
    ops.save(path, [("pc.ram", ram.reshape(-1)), ("pc.bios", BIOS)], device_state=state, vmdesc=trailer[5:],
             ram_section_id=1, options=ops.EngineOptions(direct_io="off"))  # fmt: skip
    return path


def _pair(directory: Path) -> Pair:
    ram_a = random_pages(PAGES, 0.2, 4).reshape(PAGES, PAGE).copy()
    nonzero = np.flatnonzero(ram_a.any(axis=1))
    zero = np.flatnonzero(~ram_a.any(axis=1))
    rewritten = np.unique(np.concatenate([nonzero[:1], nonzero[100:140], nonzero[-1:]]))
    became_zero = nonzero[200:210]
    became_nonzero = zero[:6]
    ram_b = ram_a.copy()
    ram_b[rewritten, 33] ^= 0x3C
    ram_b[became_zero] = 0
    ram_b[became_nonzero, 0] = 1
    return Pair(_save(directory / "a.mig", ram_a), _save(directory / "b.mig", ram_b), ram_a, ram_b, rewritten,
                became_zero, became_nonzero)  # fmt: skip


def _ram(path: Path) -> bytes:
    with mappedram.open_file(path) as mf:
        return mf.read_pages("pc.ram", 0, PAGES) + mf.read_pages("pc.bios", 0, len(BIOS) // PAGE)


def _pages_offset(path: Path, block: str = "pc.ram") -> int:
    with mappedram.open_file(path) as mf:
        lay = mf.block(block).layout
        assert lay is not None
        return lay.pages_offset


def test_on_xfs_a_child_is_a_clone_sharing_the_unchanged_pages(xfs_dir: Path) -> None:
    pair = _pair(xfs_dir)
    before = _digest(pair.a)
    child = xfs_dir / "c.mig"
    report = ops.diff(pair.a, pair.b, write_child=child)
    c = report.child
    assert c is not None and c.mode == "reflink", c
    assert not any("FICLONE" in n for n in c.notes), c.notes
    changed = len(pair.rewritten) + len(pair.became_zero) + len(pair.became_nonzero)
    assert c.pages_changed == changed and c.pages_changed_zero == len(pair.became_zero)
    assert _digest(pair.a) == before, "writing the clone changed the parent"
    assert _ram(child) == pair.ram_b.tobytes() + BIOS.tobytes()
    dest = bytearray(PAGES * PAGE)
    assert ops.restore(child, {"pc.ram": dest}).seal is not None and bytes(dest) == pair.ram_b.tobytes()

    extents = fiemap(child)
    assert any(e.shared for e in extents), "no extent of the clone is shared with its parent"
    state = slot_states(extents, _pages_offset(child), PAGES)
    present_a = pair.ram_a.any(axis=1)
    unchanged = np.ones(PAGES, dtype=np.bool_)
    unchanged[np.concatenate([pair.rewritten, pair.became_zero, pair.became_nonzero])] = False
    assert (state[unchanged & present_a] == 2).all(), "an unchanged page's slot is not shared with the parent"
    assert (state[unchanged & ~present_a] == 0).all(), "a page zero in both is stored"
    written = np.concatenate([pair.rewritten, pair.became_nonzero])
    assert (state[written] == 1).all(), "a changed page's slot is not the child's own"
    assert (state[pair.became_zero] == 0).all(), "the slot of a page that became zero is not punched"
    # the clone stores, of its own, about the changed pages: far below its size
    own = own_bytes(extents)
    assert own <= (changed + 32) * PAGE, (own, changed)
    assert own < c.file_size // 20
    filefrag = _find("filefrag")
    if filefrag is not None:
        out = subprocess.run([filefrag, "-v", os.fspath(child)], capture_output=True, text=True, timeout=60).stdout
        assert "shared" in out, out


def test_a_reflinked_child_keeps_its_bytes_when_the_parent_is_written(xfs_dir: Path) -> None:
    """Copy on write: the parent written in place after the clone changes the parent alone;
    the chain check then refuses the child (its parent's digest changed)."""
    pair = _pair(xfs_dir)
    child = xfs_dir / "c.mig"
    assert ops.diff(pair.a, pair.b, write_child=child).child.mode == "reflink"  # type: ignore[union-attr]
    page = int(np.flatnonzero(pair.ram_a.any(axis=1))[1000])
    slot = _pages_offset(pair.a) + page * PAGE
    fd = open_write(os.fspath(pair.a), create=False)
    try:
        os.pwrite(fd, b"\x99" * PAGE, slot)
    finally:
        os.close(fd)
    with open(child, "rb") as f:
        f.seek(_pages_offset(child) + page * PAGE)
        assert f.read(PAGE) == pair.ram_a[page].tobytes(), "a write to the parent reached the clone's blocks"
    with pytest.raises(IntegrityError):
        ops.restore(child, {"pc.ram": bytearray(PAGES * PAGE)})


def test_a_sealed_reflinked_child_verifies(xfs_dir: Path) -> None:
    pair = _pair(xfs_dir)
    child = xfs_dir / "c.mig"
    report = ops.diff(pair.a, pair.b, write_child=child, seal=SealOptions())
    assert report.child is not None and report.child.mode == "reflink" and report.child.seal is not None
    assert ops.verify(child, data=True).ok
    flat = xfs_dir / "flat.mig"
    ops.flatten(child, flat)
    assert flat.read_bytes() == pair.b.read_bytes()


def test_a_parent_with_stale_slots_is_cloned_and_reads_as_zeros_there(xfs_dir: Path) -> None:
    """A QEMU-like parent (0xEE in the slots of its zero pages, the layout of ours): the clone
    shares the stale slots, and their bit-0 pages still read as zeros."""
    ram_a = random_pages(256, 0.5, 6).reshape(256, PAGE).copy()
    ram_b = ram_a.copy()
    nonzero, zero = np.flatnonzero(ram_a.any(axis=1)), np.flatnonzero(~ram_a.any(axis=1))
    ram_b[nonzero[:5], 1] ^= 1
    ram_b[zero[:3], 2] = 2
    a, b = xfs_dir / "qa.mig", xfs_dir / "qb.mig"
    a.write_bytes(mapped_ram_stream([("pc.ram", ram_a.tobytes())], alignment=1 << 20))
    b.write_bytes(mapped_ram_stream([("pc.ram", ram_b.tobytes())], alignment=1 << 20))
    child = xfs_dir / "qc.mig"
    report = ops.diff(a, b, write_child=child)
    assert report.child is not None and report.child.mode == "reflink" and report.child.pages_changed == 8
    with mappedram.open_file(child) as mf:
        assert mf.read_pages("pc.ram", 0, 256) == ram_b.tobytes()
        assert not mf.clean_zero_slots  # the clone holds the parent's stale bytes in 0-bit slots
        slot = _pages_offset(child) + int(zero[10]) * PAGE
        assert mf.read_at(slot, 4) == b"\xee" * 4


def test_a_parent_laid_out_otherwise_gives_a_sparse_child(xfs_dir: Path) -> None:
    """Page slots at other offsets than the child's plan: nothing to share, even where the
    filesystem clones (and no note blames the filesystem)."""
    ram_a = random_pages(256, 0.5, 7).reshape(256, PAGE).copy()
    ram_b = ram_a.copy()
    ram_b[np.flatnonzero(ram_a.any(axis=1))[:4], 0] ^= 1
    a, b = xfs_dir / "pa.mig", xfs_dir / "pb.mig"
    a.write_bytes(mapped_ram_stream([("pc.ram", ram_a.tobytes())]))  # pages at 4 KiB
    b.write_bytes(mapped_ram_stream([("pc.ram", ram_b.tobytes())]))
    assert _pages_offset(a) == PAGE
    child = xfs_dir / "pc.mig"
    report = ops.diff(a, b, write_child=child)
    assert report.child is not None and report.child.mode == "sparse"
    assert not any("FICLONE" in n for n in report.child.notes), report.child.notes
    with mappedram.open_file(child) as mf:
        assert mf.read_pages("pc.ram", 0, 256) == ram_b.tobytes()


def test_where_the_filesystem_cannot_clone_the_child_is_sparse(tmp_path: Path) -> None:
    probe_src, probe = tmp_path / "probe-src", tmp_path / "probe"
    probe_src.write_bytes(b"x" * PAGE)
    fd = open_write(os.fspath(probe))
    try:
        clones = reflink(os.fspath(probe_src), fd, os.fspath(probe))
    finally:
        os.close(fd)
    if clones:
        pytest.skip(f"{tmp_path} is on a filesystem that clones: the sparse case is not reached there")
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    report = ops.diff(pair.a, pair.b, write_child=child)
    c = report.child
    assert c is not None and c.mode == "sparse"
    assert any("cannot clone (FICLONE)" in n and "sparse" in n for n in c.notes), c.notes
    changed = len(pair.rewritten) + len(pair.became_zero) + len(pair.became_nonzero)
    assert c.allocated_bytes <= (changed + 32) * PAGE and c.allocated_bytes < c.file_size // 20, c
    assert c.allocated_bytes == os.stat(child).st_blocks * 512
    assert _ram(child) == pair.ram_b.tobytes() + BIOS.tobytes()

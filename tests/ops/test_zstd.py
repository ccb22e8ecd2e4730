"""Seekable compression (ops/zstd.py, engine/store.py), on real files: every page of a
compressed file reads as the source's, ``decompress`` gives the source back, every reader
(info, verify, extract, export, diff, restore, seal, the built-in guest's restores) gives
the same results from the compressed file as from its source, each region is a zstd
seekable stream that ``zstd -d`` and pyzstd read, and hostile frames (flipped bytes,
lying headers, bombs) are refused with FormatError, never a zstd error or a blow-up."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard

import mappedram
from mappedram import ops
from mappedram.cli import main
from mappedram.errors import FormatError, UsageError
from mappedram.format.structs import MappedRamHeader, ZstdRegionHeader
from mappedram.format.zstdseek import MIN_FRAME_SIZE, compress_bound, encode_seek_table, seek_table_size
from mappedram.ops import CompressOptions, EngineOptions, SealOptions
from mappedram.vm.kvm import kvm_available
from mappedram.vm.restore import restore_guest
from mappedram.vm.uffd import userfaultfd_problem
from tests.helpers.patterns import random_pages
from tests.helpers.streams import PAGE, legacy_stream, mapped_ram_stream
from tests.helpers.vectors import vector_meta

OPTS = EngineOptions(channels=2, durable=False)
K4, K64, M2 = 4 << 10, 64 << 10, 2 << 20


def _pages(n: int, zeros: float, seed: int) -> bytes:
    return random_pages(n, zeros, seed).tobytes()


RAM = _pages(300, 0.3, 1)
BIOS = _pages(3, 0.0, 2)
ACPI = bytes(17 * PAGE)  # a block of zero pages only: its frames are never read
SHORT = _pages(37, 0.5, 3)  # 37 pages: the last frame of 16 pages is 5 pages

SOURCES: dict[str, Callable[[], tuple[bytes, int]]] = {
    "mapped-one-block": lambda: (mapped_ram_stream([("pc.ram", SHORT)]), 0),
    "mapped-blocks": lambda: (mapped_ram_stream([("pc.ram", RAM), ("pc.bios", BIOS), ("/rom@etc/acpi/tables", ACPI)],
                                                parts=2), 0),
    "mapped-offset": lambda: (mapped_ram_stream([("pc.ram", RAM), ("pc.bios", BIOS)], start=8192), 8192),
    "mapped-all-zero": lambda: (mapped_ram_stream([("pc.ram", bytes(64 * PAGE))]), 0),
    "legacy": lambda: (legacy_stream([("pc.ram", SHORT), ("pc.bios", BIOS)],
                                     [[("pc.ram", 1, None), ("pc.ram", 2, b"\x01" * PAGE), ("pc.bios", 0, None)]]), 0),
}  # fmt: skip


def _write(tmp_path: Path, name: str) -> tuple[Path, int]:
    data, offset = SOURCES[name]()
    path = tmp_path / f"{name}.mig"
    path.write_bytes(data)
    return path, offset


def _compress(src: Path, out: Path, frame_bytes: int = K64, offset: int = 0, **kw: object) -> ops.CompressReport:
    return ops.compress(src, out, source_offset=offset, compression=CompressOptions(frame_bytes=frame_bytes),
                        options=OPTS, **kw)  # type: ignore[arg-type]  # fmt: skip


def _ram(path: Path, offset: int = 0) -> dict[str, bytes]:
    with mappedram.open_file(path, offset) as mf:
        return {b.idstr: mf.read_pages(b, 0, b.num_pages) for b in mf.blocks}


def _present(path: Path, offset: int = 0) -> dict[str, list[bool]]:
    with mappedram.open_file(path, offset) as mf:
        return {b.idstr: np.asarray(b.present, dtype=bool).tolist() for b in mf.blocks}


# -- every page, every source, every frame size ------------------------------------------------


@pytest.mark.parametrize("frame_bytes", [K4, K64, M2], ids=["4K", "64K", "2M"])
@pytest.mark.parametrize("name", SOURCES)
def test_every_page_reads_back(tmp_path: Path, name: str, frame_bytes: int) -> None:
    src, offset = _write(tmp_path, name)
    out = tmp_path / "z.mig"
    report = _compress(src, out, frame_bytes, offset)
    want = _ram(src, offset)
    fp = frame_bytes // PAGE
    with mappedram.open_file(src, offset) as a, mappedram.open_file(out) as z:
        assert z.compressed and z.format_name == "mapped-ram+zstd" and z.mapped_ram
        assert [b.idstr for b in z.blocks] == list(want)
        assert report.frames == sum(-(-b.num_pages // fp) for b in z.blocks)
        assert report.source_format == a.format_name and report.frame_bytes == frame_bytes
        assert report.stored_bytes == sum(b.pages_present for b in a.blocks) * PAGE
        assert report.ram_bytes == sum(b.used_length for b in a.blocks) and report.file_size == out.stat().st_size
        rng = np.random.default_rng(len(name) + frame_bytes)
        for b in z.blocks:
            assert b.compressed and b.zstd is not None and b.zstd.frame_pages == fp
            assert z.read_pages(b, 0, b.num_pages) == want[b.idstr]
            assert np.asarray(b.present).tolist() == np.asarray(a.block(b.idstr).present).tolist()
            pages = rng.integers(0, b.num_pages, size=50)
            buf = bytearray(len(pages) * PAGE)
            z.read_page_list(b, pages, buf)
            ref = np.frombuffer(want[b.idstr], dtype=np.uint8).reshape(-1, PAGE)
            assert bytes(buf) == ref[pages].tobytes()
            for first in {0, b.num_pages - 1, b.num_pages // 2, max(fp - 1, 0)}:
                if first < b.num_pages:
                    count = min(fp + 1, b.num_pages - first)
                    one = bytearray(count * PAGE)
                    z.readinto(b, first, one)  # a run across a frame boundary
                    assert bytes(one) == ref[first : first + count].tobytes()
        assert z.device_state() == a.device_state()
        assert z.vmdesc is not None and a.vmdesc is not None
        assert z.vmdesc.data["devices"] == a.vmdesc.data["devices"]


def test_zero_frames_are_counted_and_tiny(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    out = tmp_path / "z.mig"
    report = _compress(src, out, K4)
    with mappedram.open_file(src) as mf:
        assert report.zero_frames == sum(b.num_pages - b.pages_present for b in mf.blocks)
    with mappedram.open_file(out) as z:
        acpi = z.block("/rom@etc/acpi/tables")
        assert acpi.zstd is not None and acpi.zstd.sizes.max() < 64  # a frame of zeros, a few bytes
        assert acpi.layout is not None and acpi.layout.zstd is not None
        assert acpi.layout.zstd.region_length == int(acpi.zstd.sizes.sum()) + seek_table_size(17)


@pytest.mark.parametrize("name", SOURCES)
def test_decompress_gives_the_source_back(tmp_path: Path, name: str) -> None:
    src, offset = _write(tmp_path, name)
    z, back = tmp_path / "z.mig", tmp_path / "back.mig"
    _compress(src, z, K64, offset)
    report = ops.decompress(z, back, options=OPTS)
    assert report.format == "mapped-ram" and report.path == str(back)
    assert _ram(back) == _ram(src, offset)
    with mappedram.open_file(back) as b, mappedram.open_file(src, offset) as a:
        assert not b.compressed and b.format_name == "mapped-ram"
        assert b.device_state() == a.device_state() and b.machine_type == a.machine_type
        assert [x.idstr for x in b.blocks] == [x.idstr for x in a.blocks]
        assert ops.info(back).capabilities == ["mapped-ram"]
    assert ops.diff(src, back, offset_a=offset).identical
    assert ops.verify(back).ok


def test_decompress_refuses_a_file_that_is_not_compressed(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    with pytest.raises(UsageError, match="not a compressed file"):
        ops.decompress(src, tmp_path / "out.mig", options=OPTS)
    assert not (tmp_path / "out.mig").exists()


def test_compress_of_a_compressed_file(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z1, z2 = tmp_path / "z1.mig", tmp_path / "z2.mig"
    _compress(src, z1, K4)
    report = _compress(z1, z2, M2)
    assert report.source_format == "mapped-ram+zstd"
    assert _ram(z2) == _ram(src) and _present(z2) == _present(src)
    with mappedram.open_file(z2) as mf:
        assert ops.info(z2).capabilities == ["mapped-ram", "mappedram-zstd"]  # named once
        assert all(b.zstd is not None and b.zstd.frame_pages == 512 for b in mf.blocks)
    assert ops.diff(z1, z2).identical


@pytest.mark.parametrize("frame_bytes", [0, 1, 3000, PAGE + 1, 3 * PAGE, 128 << 20, -PAGE])
def test_a_bad_frame_size_is_a_usage_error(tmp_path: Path, frame_bytes: int) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    with pytest.raises(UsageError, match="not a power of two"):
        _compress(src, tmp_path / "z.mig", frame_bytes)
    assert not (tmp_path / "z.mig").exists()


def test_compress_refuses_to_write_over_its_source(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    before = src.read_bytes()
    with pytest.raises(UsageError):
        _compress(src, src)
    assert src.read_bytes() == before


@pytest.mark.parametrize("level", [-5, 1, 19])
def test_levels(tmp_path: Path, level: int) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    out = tmp_path / "z.mig"
    report = ops.compress(src, out, compression=CompressOptions(level=level, frame_bytes=K64), options=OPTS)
    assert report.level == level and _ram(out) == _ram(src)


# -- every reader gives the same results ------------------------------------------------------


def _extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE): where a sparse image holds bytes."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            at = end
    finally:
        os.close(fd)
    return out


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` hold the same bytes (holes read as zeros), compared where either holds data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(_extents(a) + _extents(b)):
            for at in range(start, end, 8 << 20):
                n = min(8 << 20, end - at)
                if os.pread(fa.fileno(), n, at) != os.pread(fb.fileno(), n, at):
                    return False
    return True


def _same_readers(tmp_path: Path, src: Path, offset: int, z: Path) -> None:
    """info, verify, extract, export, diff and restore: the compressed file as its source."""
    a, b = ops.info(src, offset), ops.info(z)
    assert b.format == "mapped-ram+zstd" and b.capabilities == ["mapped-ram", "mappedram-zstd"]
    assert (a.machine_type, a.page_size, a.mem_size, a.ram_section_id, a.part_sections > 0, a.switchover_start) == (
        b.machine_type, b.page_size, b.mem_size, b.ram_section_id, b.part_sections > 0, b.switchover_start)
    assert [(x.idstr, x.used_length, x.num_pages, x.pages_present, x.pages_zero) for x in a.blocks] == [
        (x.idstr, x.used_length, x.num_pages, x.pages_present, x.pages_zero) for x in b.blocks]
    assert [(d.idstr, d.instance_id, d.version_id, d.length) for d in a.devices or []] == [
        (d.idstr, d.instance_id, d.version_id, d.length) for d in b.devices or []] and a.devices  # fmt: skip
    assert b.file_size == z.stat().st_size
    v = ops.verify(z)
    assert v.ok and v.format == "mapped-ram+zstd", v.problems
    for side, path, off in (("a", src, offset), ("b", z, 0)):
        ops.extract(path, tmp_path / f"ex-{side}", all_blocks=True, offset=off, options=OPTS)
        for fmt in ops.EXPORT_FORMATS:
            ops.export(path, tmp_path / f"{side}.{fmt}", format=fmt, offset=off, options=OPTS)
        with mappedram.open_file(path, off) as mf:
            blocks = [(x.idstr, str(tmp_path / f"re-{side}-{ops.safe_filename(x.idstr)}")) for x in mf.blocks]
        r = ops.restore_files(path, blocks, offset=off, options=OPTS)
        assert r.blocks == [name for name, _ in blocks]
    names = sorted(os.listdir(tmp_path / "ex-a"))
    assert names == sorted(os.listdir(tmp_path / "ex-b")) and names
    for n in names:
        assert _same_file(tmp_path / "ex-a" / n, tmp_path / "ex-b" / n), n
        assert _same_file(tmp_path / f"re-a-{n}", tmp_path / f"re-b-{n}"), n
    for fmt in ops.EXPORT_FORMATS:
        assert _same_file(tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"), fmt
    d = ops.diff(src, z, offset_a=offset, options=OPTS)
    assert d.identical and not d.only_in_a and not d.only_in_b


@pytest.mark.parametrize("name", ["mapped-blocks", "mapped-offset", "legacy"])
def test_readers_agree_on_small_files(tmp_path: Path, name: str) -> None:
    src, offset = _write(tmp_path, name)
    z = tmp_path / "z.mig"
    _compress(src, z, K4, offset)
    _same_readers(tmp_path, src, offset, z)


def test_diff_of_a_compressed_file_against_another_finds_the_same_pages(tmp_path: Path) -> None:
    a, _ = _write(tmp_path, "mapped-blocks")
    ram = bytearray(RAM)
    for page in (0, 17, 299):
        ram[page * PAGE + 5] ^= 0xFF
    b = tmp_path / "b.mig"
    b.write_bytes(mapped_ram_stream([("pc.ram", bytes(ram)), ("pc.bios", BIOS), ("/rom@etc/acpi/tables", ACPI)]))
    za, zb = tmp_path / "za.mig", tmp_path / "zb.mig"
    _compress(a, za, K4)
    _compress(b, zb, K64)
    plain = ops.diff(a, b, options=OPTS)
    assert not plain.identical
    for x, y in ((za, b), (a, zb), (za, zb)):
        got = ops.diff(x, y, options=OPTS)
        assert [(d.idstr, d.pages_differ) for d in got.blocks] == [(d.idstr, d.pages_differ) for d in plain.blocks]
        assert got.to_dict()["blocks"] == plain.to_dict()["blocks"]


# -- QEMU's own files -----------------------------------------------------------------------

VECTOR_NAMES = ["pc-64M-mapped-ram.mig", "pc-64M-legacy.mig", "q35-64M-mapped-ram-offset4096.mig"]


@pytest.fixture(scope="module")
def compressed_vectors(vector_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, Path]]:
    """name: (the QEMU file, its offset, the file compressed in 1 MiB frames)."""
    out = tmp_path_factory.mktemp("zvectors")
    got = {}
    for name in VECTOR_NAMES:
        offset = vector_meta(name)["offset"] or 0
        z = out / f"{name}.z"
        _compress(vector_dir / name, z, 1 << 20, offset)
        got[name] = (vector_dir / name, offset, z)
    return got


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_qemu_vectors_read_back(compressed_vectors: dict[str, tuple[Path, int, Path]], expected_ram: bytes,
                                name: str) -> None:  # fmt: skip
    src, offset, z = compressed_vectors[name]
    assert z.stat().st_size < src.stat().st_size // 20
    want = _ram(src, offset)
    assert want["m0"] == expected_ram
    assert _ram(z) == want and _present(z) == _present(src, offset)
    with mappedram.open_file(z) as mf, mappedram.open_file(src, offset) as qemu:
        assert mf.device_state() == qemu.device_state() and mf.machine_type == qemu.machine_type
        assert mf.ram_section_id == qemu.ram_section_id


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_qemu_vectors_readers_agree(tmp_path: Path, compressed_vectors: dict[str, tuple[Path, int, Path]],
                                    name: str) -> None:  # fmt: skip
    src, offset, z = compressed_vectors[name]
    _same_readers(tmp_path, src, offset, z)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_qemu_vectors_decompress(tmp_path: Path, compressed_vectors: dict[str, tuple[Path, int, Path]],
                                 expected_ram: bytes, name: str) -> None:  # fmt: skip
    src, offset, z = compressed_vectors[name]
    back = tmp_path / "back.mig"
    ops.decompress(z, back, options=OPTS)
    assert _ram(back)["m0"] == expected_ram
    assert ops.diff(src, back, offset_a=offset).identical
    with mappedram.open_file(back) as b, mappedram.open_file(src, offset) as a:
        assert b.device_state() == a.device_state()
        assert a.vmdesc is not None and b.vmdesc is not None
        assert b.vmdesc.data["devices"] == a.vmdesc.data["devices"]


# -- the regions are zstd seekable streams -------------------------------------------------------


def _regions(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    with mappedram.open_file(path) as mf:
        out = {}
        for b in mf.blocks:
            assert b.layout is not None and b.layout.zstd is not None
            out[b.idstr] = data[b.layout.pages_offset : b.layout.pages_offset + b.layout.zstd.region_length]
        return out


@pytest.mark.parametrize("frame_bytes", [K4, K64, M2], ids=["4K", "64K", "2M"])
def test_zstd_cli_decompresses_each_region_to_the_block(tmp_path: Path, frame_bytes: int) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("no zstd command")
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    _compress(src, z, frame_bytes)
    want = _ram(src)
    for idstr, region in _regions(z).items():
        proc = subprocess.run(["zstd", "-dc", "-q"], input=region, capture_output=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want[idstr], idstr
        (tmp_path / "r.zst").write_bytes(region)
        check = subprocess.run(["zstd", "-t", "-q", str(tmp_path / "r.zst")], capture_output=True, timeout=60)
        assert check.returncode == 0, check.stderr  # every frame's checksum


def test_zstd_cli_decompresses_a_vector_s_main_block(compressed_vectors: dict[str, tuple[Path, int, Path]],
                                                     expected_ram: bytes) -> None:  # fmt: skip
    if shutil.which("zstd") is None:
        pytest.skip("no zstd command")
    _, _, z = compressed_vectors["pc-64M-mapped-ram.mig"]
    proc = subprocess.run(["zstd", "-dc", "-q"], input=_regions(z)["m0"], capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == expected_ram


@pytest.mark.parametrize("frame_bytes", [K4, K64], ids=["4K", "64K"])
def test_pyzstd_seekable_file_reads_each_region_at_random(tmp_path: Path, frame_bytes: int) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    _compress(src, z, frame_bytes)
    pyzstd = pytest.importorskip("pyzstd")
    want = _ram(src)
    rng = np.random.default_rng(frame_bytes)
    for idstr, region in _regions(z).items():
        assert pyzstd.SeekableZstdFile.is_seekable_format_file(io.BytesIO(region))
        with pyzstd.SeekableZstdFile(io.BytesIO(region), "r") as f:
            assert f.seek(0, io.SEEK_END) == len(want[idstr])
            for _ in range(40):
                at = int(rng.integers(0, len(want[idstr])))
                size = int(rng.integers(1, 3 * frame_bytes))
                f.seek(at)
                assert f.read(size) == want[idstr][at : at + size], (idstr, at, size)
            f.seek(0)
            assert f.read() == want[idstr]


def test_pyzstd_reads_a_vector_s_main_block(compressed_vectors: dict[str, tuple[Path, int, Path]],
                                            expected_ram: bytes) -> None:  # fmt: skip
    pyzstd = pytest.importorskip("pyzstd")
    _, _, z = compressed_vectors["q35-64M-mapped-ram-offset4096.mig"]
    rng = np.random.default_rng(7)
    with pyzstd.SeekableZstdFile(io.BytesIO(_regions(z)["m0"]), "r") as f:
        for _ in range(30):
            at = int(rng.integers(0, len(expected_ram)))
            f.seek(at)
            assert f.read(10000) == expected_ram[at : at + 10000]


def test_the_block_headers_say_the_file_is_compressed(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    _compress(src, z, K64)
    data = z.read_bytes()
    with mappedram.open_file(z) as mf:
        for b in mf.blocks:
            assert b.layout is not None and b.layout.zstd is not None
            at = b.layout.header_offset
            h = MappedRamHeader.unpack(data[at : at + MappedRamHeader.SIZE])
            assert h.version == 0x5A000001 and h.page_size == PAGE and h.pages_offset == b.layout.pages_offset
            zh = ZstdRegionHeader.unpack(data[at + MappedRamHeader.SIZE : at + MappedRamHeader.SIZE + 16])
            assert zh == b.layout.zstd and zh.frame_pages == 16 and zh.frames == -(-b.num_pages // 16)
            assert b.layout.pages_offset % PAGE == 0 and b.layout.bitmap_offset < b.layout.pages_offset


# -- seals ------------------------------------------------------------------------------------


def test_compress_with_seal_verifies(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    report = _compress(src, z, K4, seal=SealOptions())
    assert report.seal is not None
    with mappedram.open_file(z) as mf:
        assert mf.seal is not None and not mf.seal.keyed
        check = ops.verify_seal(mf, OPTS)
        assert check.status == "ok" and check.chunks == mf.seal.chunks, check
        assert check.chunks_read == check.chunks - 1, check  # the block of zero pages: nothing to read
    v = ops.verify(z, data=True)
    assert v.ok and v.seal is not None and v.seal.status == "ok", v.problems
    # the digests are of the pages as a restore reads them: the same as the source's, sealed
    plain = tmp_path / "plain.mig"
    shutil.copy(src, plain)
    ops.seal_file(plain, options=OPTS)
    with mappedram.open_file(z) as mf, mappedram.open_file(plain) as pf:
        assert mf.seal is not None and pf.seal is not None
        assert mf.seal.blocks == pf.seal.blocks


def test_compress_with_a_keyed_seal(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    key = tmp_path / "k.key"
    key.write_bytes(b"s" * 32)
    os.chmod(key, 0o600)
    z = tmp_path / "z.mig"
    _compress(src, z, K4, seal=SealOptions(key=ops.load_key(key)))
    assert not ops.verify(z, data=True).ok  # keyed: no key, not OK
    ok = ops.verify(z, data=True, seal=SealOptions(key=ops.load_key(key)))
    assert ok.ok and ok.seal is not None and ok.seal.status == "ok"


def test_seal_a_compressed_file_in_place(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "legacy")
    z = tmp_path / "z.mig"
    _compress(src, z, K64)
    assert not ops.verify(z, data=True).ok  # unsealed
    report = ops.seal_file(z, options=OPTS)
    assert report.chunks > 0
    v = ops.verify(z, data=True)
    assert v.ok and v.seal is not None and v.seal.status == "ok", v.problems
    assert _ram(z) == _ram(src)
    with mappedram.open_file(z) as mf:
        assert ops.verify_seal(mf, OPTS).status == "ok"


def test_a_sealed_source_compressed_without_seal_is_still_read(tmp_path: Path) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    ops.seal_file(src, options=OPTS)
    z = tmp_path / "z.mig"
    _compress(src, z, K4)
    assert _ram(z) == _ram(src)
    assert ops.verify(z).ok


def test_swapped_frames_pass_zstd_and_the_seal_finds_them(tmp_path: Path) -> None:
    """Two whole frames swapped are each a good frame: only a seal tells the pages moved."""
    src = tmp_path / "s.mig"
    src.write_bytes(mapped_ram_stream([("pc.ram", _pages(64, 0.0, 4))]))
    z = tmp_path / "z.mig"
    _compress(src, z, 8 * PAGE, seal=SealOptions())
    f = _frames(z)
    swapped = _resplice(f, [f.frames[1], f.frames[0], *f.frames[2:]])
    bad = tmp_path / "bad.mig"
    bad.write_bytes(swapped)
    ram = _ram(bad)["pc.ram"]  # reads: the frames are good
    assert ram[: 8 * PAGE] == _ram(src)["pc.ram"][8 * PAGE : 16 * PAGE]
    v = ops.verify(bad, data=True)
    assert not v.ok and v.seal is not None and v.seal.status == "mismatch"
    with pytest.raises(FormatError):  # an integrity error: readers refuse before they write
        ops.extract(bad, tmp_path / "x.raw", block="pc.ram", options=OPTS)
    assert not (tmp_path / "x.raw").exists()


# -- hostile frames at read time ---------------------------------------------------------------


@dataclass
class Frames:
    """The last block's region of a compressed file, taken apart."""

    data: bytes
    zhdr: int  # the ZstdRegionHeader's offset
    pages_offset: int
    region_length: int
    frame_pages: int
    frames: list[bytes]
    lengths: list[int]
    offsets: list[int]


def _frames(path: Path) -> Frames:
    data = path.read_bytes()
    with mappedram.open_file(path) as mf:
        b = mf.blocks[-1]
        assert b.layout is not None and b.layout.zstd is not None and b.zstd is not None
        offs, sizes = b.zstd.offsets.tolist(), b.zstd.sizes.tolist()
        return Frames(data, b.layout.header_offset + MappedRamHeader.SIZE, b.layout.pages_offset,
                      b.layout.zstd.region_length, b.zstd.frame_pages, [data[o : o + s] for o, s in zip(offs, sizes)],
                      b.zstd.lengths.tolist(), offs)  # fmt: skip


def _resplice(f: Frames, frames: list[bytes]) -> bytes:
    """The file with the last block's frames replaced (seek table and region length made to
    agree, so only the frames themselves lie: what follows the region moves with it)."""
    table = encode_seek_table(np.array([len(x) for x in frames], dtype=np.int64), np.array(f.lengths, dtype=np.int64))
    region = b"".join(frames) + table
    head = ZstdRegionHeader(len(region), f.frame_pages, len(frames)).pack()
    d = f.data
    return d[: f.zhdr] + head + d[f.zhdr + 16 : f.pages_offset] + region + d[f.pages_offset + f.region_length :]


def _fcs(frame: bytes) -> tuple[int, int, int]:
    """(offset, width, bias) of a zstd frame's Frame_Content_Size field (RFC 8878 3.1.1.1)."""
    fhd = frame[4]
    single = (fhd >> 5) & 1
    width = [single, 2, 4, 8][fhd >> 6]
    at = 5 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3]
    return at, width, 256 if width == 2 else 0


def _with_fcs(frame: bytes, value: int) -> bytes:
    at, width, bias = _fcs(frame)
    return frame[:at] + (value - bias).to_bytes(width, "little") + frame[at + width :]


def _frame(fhd: int, fcs: bytes, blocks: bytes, window: bytes = b"", checksum: bytes = b"") -> bytes:
    return struct.pack("<I", 0xFD2FB528) + bytes([fhd]) + window + fcs + blocks + checksum


def _raw_block(data: bytes, last: bool = True) -> bytes:
    return (int(last) | len(data) << 3).to_bytes(3, "little") + data


def _rle_block(byte: int, size: int, last: bool = True) -> bytes:
    return (int(last) | 1 << 1 | size << 3).to_bytes(3, "little") + bytes([byte])


FP = 8  # pages per frame of the hostile files
LEN = FP * PAGE


def _bomb_right_header() -> bytes:
    """A frame whose header claims its pages' size, holding twice as much."""
    big = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(2 * LEN))
    return _with_fcs(big, LEN)


def _bomb_rle() -> bytes:
    """One RLE block of 128 KiB after a header claiming 32 KiB: the blocks say more than the frame may hold."""
    return _frame(0x20 | 0x40, (LEN - 256).to_bytes(2, "little"), _rle_block(0x41, 128 << 10))


HOSTILE: dict[str, Callable[[bytes], bytes]] = {
    "payload byte flipped": lambda fr: fr[: len(fr) // 2] + bytes([fr[len(fr) // 2] ^ 0x10]) + fr[len(fr) // 2 + 1 :],
    "checksum flipped": lambda fr: fr[:-1] + bytes([fr[-1] ^ 1]),
    "checksum cut": lambda fr: fr[:-4],
    "last block cut": lambda fr: fr[:-40],
    "magic flipped": lambda fr: b"\x29" + fr[1:],
    "a skippable frame": lambda fr: struct.pack("<II", 0x184D2A50, len(fr) - 8) + fr[8:],
    "content size smaller": lambda fr: _with_fcs(fr, LEN - PAGE),
    "content size larger": lambda fr: _with_fcs(fr, LEN + 1),
    "content size huge": lambda fr: _frame(0xC4, struct.pack("<Q", 1 << 40), _raw_block(bytes(100)), b"\x58",
                                           b"\0\0\0\0"),
    "content size unknown": lambda fr: _frame(0x04, b"", _raw_block(bytes(100)), b"\x58", b"\0\0\0\0"),
    "content size right, data short": lambda fr: _frame(0x60, (LEN - 256).to_bytes(2, "little"), _raw_block(bytes(100))),
    "reserved bit set": lambda fr: fr[:4] + bytes([fr[4] | 0x08]) + fr[5:],
    "dictionary id": lambda fr: _frame(0x61, b"\x07" + (LEN - 256).to_bytes(2, "little"), _rle_block(0, LEN)),
    "window too large": lambda fr: _frame(0x80, struct.pack("<I", LEN), _rle_block(0, LEN), b"\xf8"),
    "bomb: right header, twice the data": lambda fr: _bomb_right_header(),
    "bomb: RLE past the content size": lambda fr: _bomb_rle(),
    "reserved block type": lambda fr: _frame(0x60, (LEN - 256).to_bytes(2, "little"),
                                             (1 | 3 << 1 | LEN << 3).to_bytes(3, "little") + bytes(16)),
    "frame header only": lambda fr: fr[:MIN_FRAME_SIZE],
}  # fmt: skip


@pytest.fixture(scope="module")
def hostile_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block compressed file: 80 random pages in 10 frames of 8 pages (32 KiB)."""
    tmp = tmp_path_factory.mktemp("hostile")
    src = tmp / "s.mig"
    src.write_bytes(mapped_ram_stream([("pc.ram", _pages(80, 0.0, 5))]))
    z = tmp / "z.mig"
    _compress(src, z, LEN)
    return z


def test_resplicing_the_frames_as_they_are_gives_the_file(hostile_base: Path) -> None:
    f = _frames(hostile_base)
    assert _resplice(f, f.frames) == f.data and len(f.frames) == 10 and f.frame_pages == FP
    assert _fcs(f.frames[0])[1] == 2 and zstandard.frame_content_size(_with_fcs(f.frames[0], LEN)) == LEN


@pytest.mark.parametrize("frame", [0, 4, 9])
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_frame_is_a_format_error(tmp_path: Path, hostile_base: Path, case: str, frame: int) -> None:
    f = _frames(hostile_base)
    evil = HOSTILE[case](f.frames[frame])
    assert MIN_FRAME_SIZE <= len(evil) <= compress_bound(f.lengths[frame]), len(evil)
    bad = tmp_path / "bad.mig"
    bad.write_bytes(_resplice(f, [*f.frames[:frame], evil, *f.frames[frame + 1 :]]))
    ref = _ram(hostile_base)["pc.ram"]
    with mappedram.open_file(bad) as mf:  # the table is right: the file opens
        b = mf.block("pc.ram")
        assert b.zstd is not None
        at = int(b.zstd.offsets[frame])
        others = [p for p in range(80) if p // FP != frame]
        buf = bytearray(len(others) * PAGE)
        mf.read_page_list(b, np.array(others), buf)  # every other frame still reads
        assert bytes(buf) == np.frombuffer(ref, np.uint8).reshape(80, PAGE)[others].tobytes()
        for first, count in ((frame * FP, FP), (frame * FP + 3, 1), (0, 80)):
            with pytest.raises(FormatError) as err:
                mf.read_pages(b, first, count)
            e = err.value
            assert type(e).__name__ != "ZstdError" and e.path == str(bad), e
            assert e.offset == at, (case, e)
            assert f"zstd frame {frame}" in e.message and "pc.ram" in e.message, e
    with pytest.raises(FormatError):  # every reader: the error, not a partial image
        ops.extract(bad, tmp_path / "x.raw", block="pc.ram", options=OPTS)
    with pytest.raises(FormatError):
        ops.decompress(bad, tmp_path / "back.mig", options=OPTS)
    with pytest.raises(FormatError):  # the compressing threads' readers
        _compress(bad, tmp_path / "again.mig", K4)
    with pytest.raises(FormatError):  # into buffers of the caller's
        ops.restore(bad, {"pc.ram": bytearray(80 * PAGE)}, options=OPTS)
    assert not (tmp_path / "back.mig").exists() and not (tmp_path / "again.mig").exists()


@pytest.mark.parametrize("channels", [1, 2])
def test_restore_files_of_a_hostile_frame_raises_the_format_error(tmp_path: Path, hostile_base: Path,
                                                                  channels: int) -> None:  # fmt: skip
    """The reader's FormatError, not a BufferError from closing the destination's mapping
    while the error's traceback still holds views of it."""
    f = _frames(hostile_base)
    bad = tmp_path / "bad.mig"
    bad.write_bytes(_resplice(f, [HOSTILE["magic flipped"](f.frames[0]), *f.frames[1:]]))
    with pytest.raises(FormatError) as err:
        ops.restore_files(bad, [("pc.ram", str(tmp_path / "r.raw"))], options=EngineOptions(channels=channels))
    assert err.value.field == "Magic_Number" and err.value.offset == f.offsets[0]
    proc = subprocess.run([sys.executable, "-m", "mappedram", "restore", str(bad), "--block",
                           f"pc.ram={tmp_path / 'r2.raw'}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"mappedram: {bad}: zstd frame 0 of block 'pc.ram'"), proc.stderr


def test_a_frame_slot_with_bytes_after_its_frame_is_refused(tmp_path: Path, hostile_base: Path) -> None:
    """The seek table says how long a frame is; a slot holding the frame and more (a second
    frame, or junk) is a lie in the table, and the extra bytes must not be passed over."""
    f = _frames(hostile_base)
    for extra in (b"\x00" * 16, f.frames[1]):
        bad = tmp_path / "bad.mig"
        bad.write_bytes(_resplice(f, [f.frames[0] + extra, *f.frames[1:]]))
        # caught when the file is opened (a slot above zstd's bound for its pages) or when
        # the frame is read (zstd refuses data after the frame)
        with pytest.raises(FormatError) as err, mappedram.open_file(bad) as mf:
            mf.read_pages("pc.ram", 0, FP)
        assert err.value.offset is not None


BOMB_SCRIPT = """
import resource, sys
import numpy as np
import mappedram
soft = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
try:
    with mappedram.open_file(sys.argv[1]) as mf:
        b = mf.blocks[0]
        for first in range(0, b.num_pages, 8):
            mf.read_pages(b, first, 8)
except mappedram.FormatError as exc:
    print("FormatError", exc.field)
else:
    print("no error")
"""


@pytest.mark.parametrize("case", ["content size huge", "bomb: right header, twice the data",
                                  "bomb: RLE past the content size"])  # fmt: skip
def test_a_bomb_is_refused_within_a_small_memory_limit(tmp_path: Path, hostile_base: Path, case: str) -> None:
    """Under an address-space limit a few hundred MiB above the interpreter's own, a frame
    that claims (or holds) far more than its pages is refused, not a MemoryError."""
    f = _frames(hostile_base)
    frames = list(f.frames)
    frames[5] = HOSTILE[case](frames[5])
    if case == "bomb: RLE past the content size":  # ~1 GiB in 128 KiB RLE blocks, its header claiming 32 KiB
        n = (compress_bound(LEN) - 16) // 4
        blocks = _rle_block(0x41, 128 << 10, last=False) * (n - 1) + _rle_block(0x41, 128 << 10)
        frames[5] = _frame(0x60, (LEN - 256).to_bytes(2, "little"), blocks)
    bad = tmp_path / "bomb.mig"
    bad.write_bytes(_resplice(f, frames))
    vm_size = _vm_size_after_imports()
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(bad), str(vm_size + (256 << 20))],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("FormatError"), (proc.stdout, proc.stderr)


def _vm_size_after_imports() -> int:
    """Bytes of address space a fresh interpreter holds once it has imported mappedram."""
    code = "import numpy, zstandard, mappedram; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    line = next(x for x in out.splitlines() if x.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@pytest.mark.parametrize("step", [997])
def test_every_truncation_of_a_compressed_file_is_refused(tmp_path: Path, step: int) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    _compress(src, z, K4)
    data = z.read_bytes()
    cuts = sorted(set(range(0, len(data), step)) | {len(data) - 1, len(data) - 100})
    for cut in cuts:
        bad = tmp_path / "cut.mig"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError) as err:
            with mappedram.open_file(bad) as mf:
                for b in mf.blocks:
                    mf.read_pages(b, 0, b.num_pages)
                mf.device_state()
        assert err.value.offset is not None and err.value.offset <= cut, (cut, err.value)
        assert not ops.verify(bad).ok


# -- the command line ---------------------------------------------------------------------------


def test_cli_compress_and_decompress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z, back = tmp_path / "z.mig", tmp_path / "back.mig"
    assert main(["compress", str(src), str(z), "--frame-size", "64K", "--level", "5", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "mapped-ram -> mapped-ram+zstd" in text and "zstd level 5" in text and "2 thread(s)" in text
    assert "QEMU does not load this file" in text and "mappedram decompress" in text
    assert main(["decompress", str(z), str(back), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert _ram(back) == _ram(src)
    with mappedram.open_file(z) as mf:
        assert all(b.zstd is not None and b.zstd.frame_pages == 16 for b in mf.blocks)


def test_cli_quiet_and_seal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    z = tmp_path / "z.mig"
    assert main(["compress", str(src), str(z), "-q", "--seal", "--frame-size", "4K"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["verify", str(z), "--data"]) == 0
    assert "mapped-ram+zstd" in capsys.readouterr().out


def test_cli_compress_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "mapped-blocks")
    z = tmp_path / "z.mig"
    assert main(["compress", str(src), str(z), "--output", "json", "--frame-size", "4K"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(z) and out["source_format"] == "mapped-ram" and out["frame_bytes"] == K4
    assert out["frames"] == 320 and out["file_size"] == z.stat().st_size and out["seal"] is None


def test_cli_decompress_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "legacy")
    z, back = tmp_path / "z.mig", tmp_path / "back.mig"
    _compress(src, z)
    assert main(["decompress", str(z), str(back), "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(back) and out["format"] == "mapped-ram" and out["file_size"] == back.stat().st_size


@pytest.mark.parametrize("argv", [["--frame-size", "3000"], ["--frame-size", "128M"], ["--frame-size", "12K"],
                                  ["--threads", "-1"]])  # fmt: skip
def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    z = tmp_path / "z.mig"
    assert main(["compress", str(src), str(z), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mappedram: ") and ("power of two" in err or "--threads" in err), err
    assert not z.exists()


def test_cli_usage_error_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    assert main(["compress", str(src), str(tmp_path / "z.mig"), "--frame-size", "3000", "--output", "json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "UsageError" and "3000" in out["message"]


def test_cli_decompress_of_a_plain_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _write(tmp_path, "mapped-one-block")
    assert main(["decompress", str(src), str(tmp_path / "out.mig")]) == 2
    assert "not a compressed file" in capsys.readouterr().err


def test_cli_a_hostile_frame_exits_1_with_the_frame_named(tmp_path: Path, hostile_base: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    f = _frames(hostile_base)
    bad = tmp_path / "bad.mig"
    bad.write_bytes(_resplice(f, [*f.frames[:3], HOSTILE["payload byte flipped"](f.frames[3]), *f.frames[4:]]))
    assert main(["extract", str(bad), "--block", "pc.ram", "-o", str(tmp_path / "x.raw")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mappedram: {bad}: zstd frame 3 of block 'pc.ram'") and f"{f.offsets[3]:#x}" in err, err


# -- the built-in guest -----------------------------------------------------------------------

KVM_REASON = kvm_available()
GUEST_BATCH = 4096


def _saved_guest(tmp_path: Path, guest: str) -> Path:
    out = tmp_path / f"{guest}.mig"
    args = ["vm", "save", os.fspath(out), "--guest", guest, "--mem", "16", "--batch", str(GUEST_BATCH),
            "--warmup-iterations", str(2 * GUEST_BATCH), "--step-batches", "2", "--downtime-limit", "1000", "-q"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _restore_modes() -> list[object]:
    lazy_reason = KVM_REASON or userfaultfd_problem()
    kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
    lazy = pytest.mark.skipif(lazy_reason is not None, reason=f"lazy restore needs KVM and userfaultfd: {lazy_reason}")
    return [pytest.param("kvm", "eager", marks=kvm), pytest.param("kvm", "lazy", marks=lazy),
            pytest.param("software", "eager")]  # fmt: skip


@pytest.mark.parametrize(("guest", "mode"), _restore_modes())
def test_the_guest_restores_from_a_compressed_file(tmp_path: Path, guest: str, mode: str) -> None:
    path = _saved_guest(tmp_path, guest)
    z = tmp_path / "z.mig"
    _compress(path, z, K64)
    want = _ram(path)
    with mappedram.open_file(z) as mf:
        vm, cpu, report = restore_guest(mf, mode=mode)
    with vm:
        if mode == "lazy":
            lazy = vm.lazy  # type: ignore[attr-defined]  # a lazily restored guest's loader
            assert lazy.wait_resident(120) and lazy.error is None
        assert report.mode == mode
        assert bytes(vm.memory) == want["pc.ram"]
        assert vm.check(cpu).ok
        later = vm.run_until(cpu.counter + 2 * GUEST_BATCH)
        assert later.counter == cpu.counter + 2 * GUEST_BATCH and vm.check(later).ok


@pytest.mark.skipif((KVM_REASON or userfaultfd_problem()) is not None, reason="lazy restore needs KVM and userfaultfd")
def test_a_lazy_restore_that_meets_a_hostile_frame_stops_with_the_error(tmp_path: Path) -> None:
    """The fill ends with the frame's error kept (the guest stopped, never left waiting on a page)."""
    z = tmp_path / "z.mig"
    _compress(_saved_guest(tmp_path, "kvm"), z, K64)
    data = bytearray(z.read_bytes())
    with mappedram.open_file(z) as mf:
        b = mf.block("pc.ram")
        assert b.zstd is not None
        live = [f for f in range(len(b.zstd.offsets)) if np.asarray(b.present)[f * 16 : (f + 1) * 16].any()]
        at = int(b.zstd.offsets[live[len(live) // 2]])
    data[at] ^= 0x01  # its magic number
    bad = tmp_path / "bad.mig"
    bad.write_bytes(bytes(data))
    with mappedram.open_file(bad) as mf:
        vm, _, _ = restore_guest(mf, mode="lazy")
    with vm:
        lazy = vm.lazy  # type: ignore[attr-defined]
        assert lazy.wait_resident(120)
        assert lazy.error is not None and "zstd frame" in str(lazy.error) and "magic" in str(lazy.error), lazy.error
        assert f"offset {at:#x}, field Magic_Number" in str(lazy.error), lazy.error


@pytest.mark.parametrize("mode", [pytest.param("lazy", marks=pytest.mark.skipif(
    (KVM_REASON or userfaultfd_problem()) is not None, reason="lazy restore needs KVM and userfaultfd")), "eager"])
def test_cli_vm_restore_of_a_compressed_file(tmp_path: Path, mode: str) -> None:  # fmt: skip
    guest = "kvm" if mode == "lazy" else "software"
    if KVM_REASON is not None and guest == "kvm":
        pytest.skip(f"KVM is not usable here: {KVM_REASON}")
    z = tmp_path / "z.mig"
    _compress(_saved_guest(tmp_path, guest), z, K64)
    proc = subprocess.run([sys.executable, "-m", "mappedram", "vm", "restore", os.fspath(z), "--mode", mode,
                           "--run-iterations", str(GUEST_BATCH), "--output", "json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["ok"] and r["restore"]["mode"] == mode and r["after"]["ok"], r
    if mode == "lazy":
        lazy = r["restore"]["lazy"]
        assert lazy["installed"] == lazy["pages"] and lazy["error"] is None, lazy


def test_map_mode_is_refused_for_a_compressed_file(tmp_path: Path) -> None:
    z = tmp_path / "z.mig"
    _compress(_saved_guest(tmp_path, "software"), z, K64)
    with mappedram.open_file(z) as mf, pytest.raises(UsageError) as err:
        restore_guest(mf, mode="map")
    assert "map mode" in str(err.value) and "compressed file" in str(err.value) and "'lazy' or 'eager'" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "mappedram", "vm", "restore", os.fspath(z), "--mode", "map"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "map mode" in proc.stderr, proc.stderr


def test_a_level_zstd_does_not_have_is_refused_up_front(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    ops.save(src, {"pc.ram": random_pages(8, 0.5, 3)})
    for level in (23, -(1 << 20)):
        with pytest.raises(UsageError, match="zstd level"):
            ops.compress(src, tmp_path / "z.mig", compression=ops.CompressOptions(level=level))
    assert not (tmp_path / "z.mig").exists()


def test_a_cut_compressed_region_says_so(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    ops.save(src, {"pc.ram": random_pages(64, 0.5, 4)})
    z = tmp_path / "z.mig"
    ops.compress(src, z, compression=ops.CompressOptions(frame_bytes=8192))
    with mappedram.open_file(z) as mf:
        lay = mf.blocks[0].layout
        assert lay is not None
        cut = lay.pages_offset + lay.region_length // 2
    data = z.read_bytes()[:cut]
    z.write_bytes(data)
    with pytest.raises(mappedram.TruncatedError) as err:
        mappedram.open_file(z)
    assert "compressed page region of block 'pc.ram'" in str(err.value) and f"{cut:,}" in str(err.value)

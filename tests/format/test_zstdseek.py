"""The seek table of a compressed block (format/zstdseek.py) and the decoder's checks of
the region header (format/decoder.py): golden bytes as the zstd seekable format spells
them, the round trip, and every lie a hostile table or region header can tell, each
refused with the project's error naming the field and the offset of the bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

import mappedram
from mappedram import ops
from mappedram.errors import FormatError, LayoutError, TruncatedError, UnsupportedError
from mappedram.format.constants import CAP_MAPPEDRAM_ZSTD, MAPPED_RAM_HDR_VERSION, MAPPEDRAM_ZSTD_HDR_VERSION
from mappedram.format.encoder import encode_configuration
from mappedram.format.structs import MappedRamHeader, ZstdRegionHeader
from mappedram.format.zstdseek import (
    MAX_FRAME_PAGES,
    MIN_FRAME_SIZE,
    SEEKABLE_MAGIC,
    SKIPPABLE_MAGIC,
    ZSTD_FRAME_MAGIC,
    compress_bound,
    decode_seek_table,
    encode_seek_table,
    frame_lengths,
    seek_table_size,
)
from tests.helpers.patterns import random_pages
from tests.helpers.streams import MACHINE, PAGE, legacy_stream, mapped_ram_stream

#: Two frames: 100 bytes holding 8 KiB, then 23 bytes holding 4 KiB.
COMP = np.array([100, 23], dtype=np.int64)
DECOMP = np.array([8192, 4096], dtype=np.int64)
#: Hand-assembled from zstd's contrib/seekable_format/zstd_seekable_compression_format.md:
#: all fields little-endian, no checksums (descriptor 0).
GOLDEN = bytes.fromhex(
    "5e2a4d18"  # Skippable_Magic_Number 0x184D2A5E
    "19000000"  # Frame_Size: 2 entries of 8 bytes + the 9-byte footer = 25
    "64000000" "00200000"  # entry 0: Compressed_Size 100, Decompressed_Size 8192
    "17000000" "00100000"  # entry 1: Compressed_Size 23, Decompressed_Size 4096
    "02000000"  # Number_Of_Frames
    "00"  # Seek_Table_Descriptor
    "b1ea928f"  # Seekable_Magic_Number 0x8F92EAB1
)  # fmt: skip
AT = 5000  # where the table starts in the (made-up) file
REGION = int(COMP.sum()) + len(GOLDEN)


def _decode(raw: bytes, *, frames: int = 2, decompressed: np.ndarray = DECOMP, region: int = REGION) -> np.ndarray:
    return decode_seek_table(raw, frames=frames, decompressed=decompressed, region_length=region, offset=AT,
                             block="pc.ram")  # fmt: skip


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


# -- the codec ------------------------------------------------------------------------------


def test_constants_are_the_spec_s() -> None:
    assert SKIPPABLE_MAGIC == 0x184D2A5E and SEEKABLE_MAGIC == 0x8F92EAB1 and ZSTD_FRAME_MAGIC == 0xFD2FB528
    assert MAX_FRAME_PAGES == 16384 and MIN_FRAME_SIZE == 9
    assert CAP_MAPPEDRAM_ZSTD == "mappedram-zstd" and MAPPEDRAM_ZSTD_HDR_VERSION == 0x5A000001
    assert zstandard.ZstdCompressor().compress(b"")[:4] == struct.pack("<I", ZSTD_FRAME_MAGIC)


def test_golden_seek_table() -> None:
    assert seek_table_size(2) == len(GOLDEN) == 33
    assert encode_seek_table(COMP, DECOMP) == GOLDEN
    assert _decode(GOLDEN).tolist() == [100, 23]


def test_empty_table_golden() -> None:
    empty = np.zeros(0, dtype=np.int64)
    raw = encode_seek_table(empty, empty)
    assert raw == bytes.fromhex("5e2a4d18" "09000000" "00000000" "00" "b1ea928f") and seek_table_size(0) == 17
    assert decode_seek_table(raw, frames=0, decompressed=empty, region_length=17, offset=0, block="x").size == 0


@pytest.mark.parametrize("frames", [1, 3, 1000])
def test_round_trip(frames: int) -> None:
    rng = np.random.default_rng(frames)
    decomp = frame_lengths(frames * 4 - 1, 4, PAGE)
    comp = np.array([rng.integers(MIN_FRAME_SIZE, compress_bound(int(d)) + 1) for d in decomp], dtype=np.int64)
    raw = encode_seek_table(comp, decomp)
    assert len(raw) == seek_table_size(frames)
    got = decode_seek_table(raw, frames=frames, decompressed=decomp, region_length=int(comp.sum()) + len(raw),
                            offset=0, block="b")  # fmt: skip
    assert got.dtype == np.int64 and got.tolist() == comp.tolist()


def test_encode_needs_one_size_of_each_per_frame() -> None:
    with pytest.raises(ValueError):
        encode_seek_table(COMP, DECOMP[:1])


def test_frame_lengths_and_compress_bound() -> None:
    assert frame_lengths(10, 4, PAGE).tolist() == [4 * PAGE, 4 * PAGE, 2 * PAGE]
    assert frame_lengths(8, 4, PAGE).tolist() == [4 * PAGE, 4 * PAGE]
    assert frame_lengths(0, 4, PAGE).tolist() == []
    assert frame_lengths(1, MAX_FRAME_PAGES, PAGE).tolist() == [PAGE]
    # ZSTD_COMPRESSBOUND(srcSize): srcSize + srcSize/256 + (srcSize < 128 KiB ? (128 KiB - srcSize) >> 11 : 0)
    assert compress_bound(0) == 64 and compress_bound(4096) == 4096 + 16 + 62
    assert compress_bound(128 << 10) == (128 << 10) + 512 and compress_bound(64 << 20) == (64 << 20) + (1 << 18)
    for size in (PAGE, 16 * PAGE, 512 * PAGE):  # what zstd writes for incompressible data fits the bound
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        assert len(zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data)) <= compress_bound(size)


# -- every rejection of decode_seek_table ----------------------------------------------------

FOOT = AT + len(GOLDEN) - 9  # Number_Of_Frames


def _entry(i: int, comp: int, decomp: int) -> bytes:
    return _patch(GOLDEN, 8 + 8 * i, struct.pack("<II", comp, decomp))


REJECTIONS = {
    "cut short": (GOLDEN[:-1], {}, LayoutError, "seek table", AT),
    "too long": (GOLDEN + b"\x00", {}, LayoutError, "seek table", AT),
    "empty": (b"", {}, LayoutError, "seek table", AT),
    "seekable magic": (_patch(GOLDEN, 29, b"\xb1\xea\x92\x8e"), {}, FormatError, "Seekable_Magic_Number", FOOT + 5),
    "seekable magic zero": (_patch(GOLDEN, 29, bytes(4)), {}, FormatError, "Seekable_Magic_Number", FOOT + 5),
    "skippable magic": (_patch(GOLDEN, 0, b"\x50\x2a\x4d\x18"), {}, FormatError, "Skippable_Magic_Number", AT),
    "zstd magic for skippable": (_patch(GOLDEN, 0, b"\x28\xb5\x2f\xfd"), {}, FormatError, "Skippable_Magic_Number",
                                 AT),
    "skippable size short": (_patch(GOLDEN, 4, struct.pack("<I", 24)), {}, FormatError, "Skippable_Magic_Number", AT),
    "skippable size long": (_patch(GOLDEN, 4, struct.pack("<I", 26)), {}, FormatError, "Skippable_Magic_Number", AT),
    "skippable size huge": (_patch(GOLDEN, 4, b"\xff\xff\xff\xff"), {}, FormatError, "Skippable_Magic_Number", AT),
    "frame count lie low": (_patch(GOLDEN, 24, struct.pack("<I", 1)), {}, LayoutError, "Number_Of_Frames", FOOT),
    "frame count lie high": (_patch(GOLDEN, 24, struct.pack("<I", 3)), {}, LayoutError, "Number_Of_Frames", FOOT),
    "frame count huge": (_patch(GOLDEN, 24, b"\xff\xff\xff\xff"), {}, LayoutError, "Number_Of_Frames", FOOT),
    "descriptor checksum flag": (_patch(GOLDEN, 28, b"\x80"), {}, FormatError, "Seek_Table_Descriptor", FOOT + 4),
    "descriptor reserved bits": (_patch(GOLDEN, 28, b"\x7c"), {}, FormatError, "Seek_Table_Descriptor", FOOT + 4),
    "descriptor unused bits": (_patch(GOLDEN, 28, b"\x03"), {}, FormatError, "Seek_Table_Descriptor", FOOT + 4),
    "decompressed size lie": (_entry(0, 100, 8193), {}, LayoutError, "Decompressed_Size", AT + 12),
    "decompressed size huge": (_entry(1, 23, 0xFFFFFFFF), {}, LayoutError, "Decompressed_Size", AT + 20),
    "decompressed size zero": (_entry(1, 23, 0), {}, LayoutError, "Decompressed_Size", AT + 20),
    "last frame claims a full frame": (_entry(1, 23, 8192), {}, LayoutError, "Decompressed_Size", AT + 20),
    "compressed size 0": (_entry(0, 0, 8192), {"region": REGION - 100}, LayoutError, "Compressed_Size", AT + 8),
    "compressed size too small": (_entry(1, MIN_FRAME_SIZE - 1, 4096), {"region": REGION - 15}, LayoutError,
                                  "Compressed_Size", AT + 16),
    "compressed size above bound": (_entry(1, compress_bound(4096) + 1, 4096), {"region": REGION - 23 + 4175},
                                    LayoutError, "Compressed_Size", AT + 16),
    "compressed size huge": (_entry(0, 0xFFFFFFFF, 8192), {}, LayoutError, "Compressed_Size", AT + 8),
    "sum short of the region": (GOLDEN, {"region": REGION + 1}, LayoutError, "region_length", AT),
    "sum past the region": (GOLDEN, {"region": REGION - 1}, LayoutError, "region_length", AT),
    "sizes shifted between frames": (_entry(0, 101, 8192), {}, LayoutError, "region_length", AT),
}  # fmt: skip


@pytest.mark.parametrize("case", REJECTIONS)
def test_every_lie_is_refused(case: str) -> None:
    raw, kwargs, kind, field, offset = REJECTIONS[case]
    with pytest.raises(FormatError) as err:
        _decode(raw, region=kwargs.get("region", REGION))
    e = err.value
    assert type(e) is kind, (case, e)
    assert e.field == field and e.offset == offset and e.block == "pc.ram", (case, e)
    assert e.expected is not None and e.actual is not None, (case, e)
    assert f"{offset:#x}" in str(e), (case, str(e))


def test_a_lie_in_the_bound_of_the_exact_limit_passes() -> None:
    """The limits themselves are sizes zstd can write: MIN_FRAME_SIZE and compress_bound."""
    raw = _entry(1, compress_bound(4096), 4096)
    assert _decode(raw, region=100 + compress_bound(4096) + len(GOLDEN)).tolist() == [100, compress_bound(4096)]
    raw = _entry(1, MIN_FRAME_SIZE, 4096)
    assert _decode(raw, region=100 + MIN_FRAME_SIZE + len(GOLDEN)).tolist() == [100, MIN_FRAME_SIZE]


def test_a_frame_count_the_caller_gets_wrong_reads_as_a_cut_table() -> None:
    """The caller sizes the table from the region header: 3 frames' worth of 2 frames' bytes is short."""
    with pytest.raises(LayoutError) as err:
        _decode(GOLDEN, frames=3, decompressed=np.array([8192, 8192, 4096]))
    assert err.value.field == "seek table" and err.value.expected == "41 bytes" and err.value.actual == "33 bytes"


# -- the region header and the decoder, on whole files ----------------------------------------

DATA = random_pages(40, 0.4, 11).tobytes()
BIOS = random_pages(3, 0.0, 12).tobytes()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A compressed file of two blocks: pc.ram in 5 frames of 8 pages, pc.bios in one short frame."""
    tmp = tmp_path_factory.mktemp("zstdseek")
    src = tmp / "src.mig"
    src.write_bytes(mapped_ram_stream([("pc.ram", DATA), ("pc.bios", BIOS)]))
    out = tmp / "z.mig"
    ops.compress(src, out, compression=ops.CompressOptions(frame_bytes=8 * PAGE),
                 options=ops.EngineOptions(channels=1, durable=False))  # fmt: skip
    return out.read_bytes()


def _layouts(path: Path) -> dict[str, tuple[int, int]]:
    """idstr: (MappedRamHeader offset, pages_offset)."""
    with mappedram.open_file(path) as mf:
        out = {}
        for b in mf.blocks:
            assert b.layout is not None
            out[b.idstr] = (b.layout.header_offset, b.layout.pages_offset)
        return out


def _read_all(path: Path) -> None:
    with mappedram.open_file(path) as mf:
        for b in mf.blocks:
            mf.read_pages(b, 0, b.num_pages)


def _expect(tmp_path: Path, data: bytes, kind: type[FormatError], field: str, offset: int | None = None) -> FormatError:
    bad = tmp_path / "bad.mig"
    bad.write_bytes(data)
    with pytest.raises(FormatError) as err:
        _read_all(bad)
    e = err.value
    assert isinstance(e, kind), e
    assert e.field == field and e.offset is not None and e.path is not None, e
    if offset is not None:
        assert e.offset == offset, e
    report = ops.verify(bad)
    assert not report.ok and report.problems[0].offset == e.offset
    return e


def test_the_fixture_reads_back(tmp_path: Path, compressed: bytes) -> None:
    path = tmp_path / "ok.mig"
    path.write_bytes(compressed)
    with mappedram.open_file(path) as mf:
        assert mf.compressed and mf.format_name == "mapped-ram+zstd"
        assert mf.read_pages("pc.ram", 0, 40) == DATA and mf.read_pages("pc.bios", 0, 3) == BIOS
        ram, bios = mf.block("pc.ram"), mf.block("pc.bios")
        assert ram.layout is not None and ram.layout.zstd is not None and bios.layout is not None
        assert ram.layout.zstd.frame_pages == 8 and ram.layout.zstd.frames == 5
        assert bios.layout.zstd is not None and bios.layout.zstd.frames == 1
        assert ram.layout.pages_offset % PAGE == 0 and bios.layout.pages_offset % PAGE == 0
        region = compressed[ram.layout.pages_offset : ram.layout.pages_offset + ram.layout.zstd.region_length]
        assert region[:4] == struct.pack("<I", ZSTD_FRAME_MAGIC) and region[-4:] == struct.pack("<I", SEEKABLE_MAGIC)
    assert ops.info(path).capabilities == ["mapped-ram", CAP_MAPPEDRAM_ZSTD]
    head = compressed[_layouts(path)["pc.ram"][0] :][: MappedRamHeader.SIZE + ZstdRegionHeader.SIZE]
    assert MappedRamHeader.unpack(head).version == MAPPEDRAM_ZSTD_HDR_VERSION
    z = ZstdRegionHeader.unpack(head[MappedRamHeader.SIZE :])
    assert (z.frame_pages, z.frames) == (8, 5)
    assert ZstdRegionHeader(z.region_length, 8, 5).pack() == head[MappedRamHeader.SIZE :]


def test_region_header_cut_short_is_a_truncation() -> None:
    with pytest.raises(TruncatedError) as err:
        ZstdRegionHeader.unpack(b"\x00" * 15, 77)
    assert err.value.offset == 77 and err.value.field == "ZstdRegionHeader"


def _zhdr(tmp_path: Path, data: bytes, block: str = "pc.ram") -> int:
    """The file offset of ``block``'s ZstdRegionHeader."""
    path = tmp_path / "probe.mig"
    path.write_bytes(data)
    return _layouts(path)[block][0] + MappedRamHeader.SIZE


@pytest.mark.parametrize("frame_pages", [0, 3, 6, 12, MAX_FRAME_PAGES * 2, 0x80000000, 0xFFFFFFFF])
def test_frame_pages_must_be_a_power_of_two_up_to_16384(tmp_path: Path, compressed: bytes, frame_pages: int) -> None:
    at = _zhdr(tmp_path, compressed)
    e = _expect(tmp_path, _patch(compressed, at + 8, struct.pack(">I", frame_pages)), LayoutError, "frame_pages",
                at + 8)  # fmt: skip
    assert e.actual == frame_pages and e.block == "pc.ram"


@pytest.mark.parametrize("frame_pages", [1, 4, 16, 64])
def test_a_frame_size_that_disagrees_with_the_seek_table(tmp_path: Path, compressed: bytes, frame_pages: int) -> None:
    """A valid power of two the frames were not made with: the frame count (or the table) says so."""
    at = _zhdr(tmp_path, compressed)
    bad = _patch(compressed, at + 8, struct.pack(">I", frame_pages))
    e = _expect(tmp_path, bad, LayoutError, "frames", at + 12)
    assert e.actual == 5


@pytest.mark.parametrize("frames", [0, 4, 6, 0xFFFFFFFF])
def test_frame_count_must_cover_the_block(tmp_path: Path, compressed: bytes, frames: int) -> None:
    at = _zhdr(tmp_path, compressed)
    e = _expect(tmp_path, _patch(compressed, at + 12, struct.pack(">I", frames)), LayoutError, "frames", at + 12)
    assert e.actual == frames and "5" in str(e.expected)


def test_frame_size_and_count_that_agree_with_each_other_but_not_the_table(tmp_path: Path, compressed: bytes) -> None:
    at = _zhdr(tmp_path, compressed)
    bad = _patch(compressed, at + 8, struct.pack(">II", 4, 10))  # 10 frames of 4 pages: the table holds 5 entries
    with pytest.raises(FormatError) as err:
        _read_all(_write(tmp_path, bad))
    assert err.value.offset is not None and err.value.field in ("Number_Of_Frames", "Seekable_Magic_Number",
                                                                "Skippable_Magic_Number", "Decompressed_Size")


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("length", [0, 1, MIN_FRAME_SIZE * 5 + seek_table_size(5) - 1])
def test_region_too_short_for_its_frames_and_table(tmp_path: Path, compressed: bytes, length: int) -> None:
    at = _zhdr(tmp_path, compressed)
    e = _expect(tmp_path, _patch(compressed, at, struct.pack(">Q", length)), LayoutError, "region_length", at)
    assert e.actual == length and str(e.expected) == f">= {MIN_FRAME_SIZE * 5 + seek_table_size(5)}"


@pytest.mark.parametrize("length", [1 << 40, (1 << 64) - 1, 10 << 20])
def test_region_past_the_end_of_the_file_is_a_truncation(tmp_path: Path, compressed: bytes, length: int) -> None:
    at = _zhdr(tmp_path, compressed)
    e = _expect(tmp_path, _patch(compressed, at, struct.pack(">Q", length)), TruncatedError, "region_length", at)
    assert "truncated" in str(e) and f"{len(compressed):,}" in str(e)


def test_a_cut_file_inside_a_region_is_a_truncation(tmp_path: Path, compressed: bytes) -> None:
    lay = _layouts(_write(tmp_path, compressed))
    cut = lay["pc.ram"][1] + 100
    with pytest.raises(TruncatedError) as err:
        _read_all(_write(tmp_path, compressed[:cut]))
    assert err.value.offset is not None and err.value.offset <= cut and f"{cut:,}" in str(err.value)


@pytest.mark.parametrize("delta", [-1, 1, -4096, 4096])
def test_region_length_that_lies_within_the_file(tmp_path: Path, compressed: bytes, delta: int) -> None:
    """The seek table is then not where the region says it ends: refused, never read as pages."""
    at = _zhdr(tmp_path, compressed)
    (length,) = struct.unpack_from(">Q", compressed, at)
    bad = _patch(compressed, at, struct.pack(">Q", length + delta))
    with pytest.raises(FormatError) as err:
        _read_all(_write(tmp_path, bad))
    assert err.value.offset is not None and err.value.field is not None


def test_seek_table_lies_in_a_file_name_the_table_offset(tmp_path: Path, compressed: bytes) -> None:
    path = _write(tmp_path, compressed)
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.layout is not None and b.layout.zstd is not None
        table = b.layout.pages_offset + b.layout.zstd.region_length - seek_table_size(5)
    cases = [
        (_patch(compressed, table + 8 + 40 + 5, b"\x00"), "Seekable_Magic_Number", table + 8 + 40 + 5),
        (_patch(compressed, table, b"\x00"), "Skippable_Magic_Number", table),
        (_patch(compressed, table + 8 + 40, struct.pack("<I", 4)), "Number_Of_Frames", table + 8 + 40),
        (_patch(compressed, table + 8 + 40 + 4, b"\x80"), "Seek_Table_Descriptor", table + 8 + 40 + 4),
        (_patch(compressed, table + 8 + 4, struct.pack("<I", 8 * PAGE + 1)), "Decompressed_Size", table + 12),
        (_patch(compressed, table + 8, struct.pack("<I", 0)), "Compressed_Size", table + 8),
    ]
    for data, field, offset in cases:
        e = _expect(tmp_path, data, FormatError, field, offset)
        assert e.block == "pc.ram", e


def test_sizes_swapped_in_the_table_are_caught_when_a_frame_is_read(tmp_path: Path, compressed: bytes) -> None:
    """Two entries swapped keep every check on the table true: reading a frame finds the lie."""
    path = _write(tmp_path, compressed)
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.layout is not None and b.layout.zstd is not None and b.zstd is not None
        sizes = b.zstd.sizes.tolist()
        table = b.layout.pages_offset + b.layout.zstd.region_length - seek_table_size(5)
    i = next(k for k in range(4) if sizes[k] != sizes[k + 1])
    entries = bytearray(compressed[table + 8 : table + 8 + 40])
    entries[8 * i : 8 * i + 4], entries[8 * i + 8 : 8 * i + 12] = entries[8 * i + 8 : 8 * i + 12], entries[8 * i : 8 * i + 4]
    bad = _write(tmp_path, _patch(compressed, table + 8, bytes(entries)))
    with mappedram.open_file(bad) as mf, pytest.raises(FormatError) as err:
        mf.read_pages("pc.ram", 0, 40)
    assert err.value.offset is not None and err.value.path == str(bad)


# -- the configuration and the header version -------------------------------------------------


def _configuration(machine: str, caps: tuple[str, ...]) -> bytes:
    """A configuration section listing ``caps`` as given (the encoder writes known ones only)."""
    name = machine.encode()
    out = b"\x07" + struct.pack(">I", len(name)) + name + b"\x05" + bytes([26]) + b"configuration/capabilities"
    out += struct.pack(">II", 1, len(caps)) + b"".join(bytes([len(c)]) + c.encode() for c in caps)
    return out


def test_our_configuration_helper_is_the_encoder_s() -> None:
    caps = ("mapped-ram", CAP_MAPPEDRAM_ZSTD)
    assert _configuration(MACHINE, caps) == encode_configuration(MACHINE, caps)


def test_mappedram_zstd_without_mapped_ram_is_refused(tmp_path: Path) -> None:
    plain = legacy_stream([("pc.ram", DATA)])
    old, new = encode_configuration(MACHINE), _configuration(MACHINE, (CAP_MAPPEDRAM_ZSTD,))
    assert plain.count(old) == 1
    data = plain.replace(old, new)
    e = _expect(tmp_path, data, FormatError, "capabilities")
    assert CAP_MAPPEDRAM_ZSTD in str(e) and "mapped-ram" in str(e.expected)


def test_an_unknown_capability_is_still_refused(tmp_path: Path) -> None:
    plain = legacy_stream([("pc.ram", DATA)])
    data = plain.replace(encode_configuration(MACHINE), _configuration(MACHINE, ("mappedram-zstf",)))
    e = _expect(tmp_path, data, UnsupportedError, "capabilities")
    assert e.actual == "mappedram-zstf"


@pytest.mark.parametrize("version", [MAPPED_RAM_HDR_VERSION, 0, 2, MAPPEDRAM_ZSTD_HDR_VERSION + 1, 0x5A000000])
def test_a_compressed_block_must_carry_the_zstd_header_version(tmp_path: Path, compressed: bytes, version: int) -> None:
    at = _zhdr(tmp_path, compressed) - MappedRamHeader.SIZE
    e = _expect(tmp_path, _patch(compressed, at, struct.pack(">I", version)), UnsupportedError,
                "MappedRamHeader.version", at)  # fmt: skip
    assert e.actual == version and e.expected == f"{MAPPEDRAM_ZSTD_HDR_VERSION:#x}"


def test_a_plain_block_with_the_zstd_header_version_is_refused(tmp_path: Path) -> None:
    plain = mapped_ram_stream([("pc.ram", DATA)])
    path = _write(tmp_path, plain)
    at = _layouts(path)["pc.ram"][0]
    e = _expect(tmp_path, _patch(plain, at, struct.pack(">I", MAPPEDRAM_ZSTD_HDR_VERSION)), UnsupportedError,
                "MappedRamHeader.version", at)  # fmt: skip
    assert e.expected == "1"


def test_a_compressed_file_whose_capability_is_dropped_is_refused(tmp_path: Path, compressed: bytes) -> None:
    """Without the capability the block headers' version is wrong: never read as plain slots."""
    old = encode_configuration(MACHINE, ("mapped-ram", CAP_MAPPEDRAM_ZSTD))
    assert compressed.count(old) == 1
    # the same length: the capability renamed to one of the same size is unknown; dropping it shifts the file
    dropped = compressed.replace(old, encode_configuration(MACHINE, ("mapped-ram",)))
    with pytest.raises(FormatError) as err:
        _read_all(_write(tmp_path, dropped))
    assert err.value.offset is not None

"""libvirt save images (virsh save): header codec, and every command reading them transparently.

The images in tests/data/libvirt were saved by libvirt 11.3 (QEMU 10.0.2) from a paused
guest whose pc.ram held the pattern of tests/data/qemu (see that directory's README).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mappedram
from mappedram import cli, ops
from mappedram.errors import BadMagicError, FormatError, LayoutError, TruncatedError, UnsupportedError
from mappedram.format.libvirt import (
    MAX_DATA_LEN,
    QEMU_SAVE_MAGIC,
    QEMU_SAVE_PARTIAL,
    QemuSaveFormat,
    VirQEMUSaveHeader,
    decode_save_data,
    memory_bytes,
    parse_domain_xml,
)
from mappedram.ops import EngineOptions
from tests.helpers import DATA as TEST_DATA
from tests.helpers.vectors import unzstd_sparse

DATA = TEST_DATA / "libvirt"
INDEX: dict[str, Any] = json.loads((DATA / "index.json").read_text())
IMAGES = {im["file"].removesuffix(".zst"): im for im in INDEX["images"]}
READABLE = ["pc-64M-raw.save", "pc-64M-sparse.save", "pc-64M-sparse-parallel2.save"]
STREAM_AT = 0x104D6  # 92 + data_len 66682, in every image

#: The first 92 bytes of pc-64M-raw.save, as libvirt 11.3 wrote them on x86_64.
GOLDEN_RAW_HEADER = bytes.fromhex(
    "4c69627669727451656d756453617665"  # "LibvirtQemudSave"
    "02000000"  # version 2
    "7a040100"  # data_len 66682
    "00000000"  # was_running 0
    "00000000"  # format 0 (raw)
    "8e030000"  # cookieOffset 910
) + bytes(56)  # unused[14]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("libvirt")
    for name in IMAGES:
        unzstd_sparse(DATA / f"{name}.zst", out / name)
    return out


@pytest.fixture(scope="module")
def raw_full(images: Path) -> bytes:
    """The whole raw image (header, XML, legacy stream)."""
    return (images / "pc-64M-raw.save").read_bytes()


@pytest.fixture(scope="module")
def raw_head(raw_full: bytes) -> bytes:
    """The raw image's first 128 KiB: header, XML, cookie, padding, and the stream's start."""
    return raw_full[: 128 << 10]


def _patched(tmp_path: Path, data: bytes, at: int, new: bytes, name: str = "bad.save") -> Path:
    out = tmp_path / name
    out.write_bytes(data[:at] + new + data[at + len(new) :])
    return out


# -- the committed images ----------------------------------------------------------------


def test_index_matches_the_images(images: Path) -> None:
    import hashlib

    for name, meta in IMAGES.items():
        assert hashlib.sha256((images / name).read_bytes()).hexdigest() == meta["sha256"], name
        assert meta["stream_offset"] == STREAM_AT


@pytest.mark.parametrize("name", READABLE)
def test_info(images: Path, name: str) -> None:
    meta = IMAGES[name]
    r = ops.info(images / name)
    lv = r.libvirt
    assert lv is not None
    h = meta["header"]
    assert (lv.magic, lv.version, lv.data_len, int(lv.was_running), lv.format_id, lv.cookie_offset) == (
        h["magic"], h["version"], h["data_len"], h["was_running"], h["format"], h["cookieOffset"],
    )  # fmt: skip
    assert lv.byteorder == "little"
    assert lv.stream_offset == r.offset == STREAM_AT
    assert lv.format == ("raw" if "raw" in name else "sparse")
    assert r.format == ("legacy" if "raw" in name else "mapped-ram")
    assert (lv.name, lv.uuid, lv.domain_type) == ("mappedram-test", "5eed0000-6d61-7070-6564-72616d000001", "qemu")
    assert (lv.memory_value, lv.memory_unit, lv.memory_bytes) == (65536, "KiB", 64 << 20)
    assert lv.machine == r.machine_type == "pc-i440fx-10.0"
    assert lv.arch == "x86_64"
    assert lv.cookie_length is not None and lv.xml_offset == 92
    assert [b.idstr for b in r.blocks] == ["pc.ram", "pc.bios", "pc.rom"]
    assert r.blocks[0].pages_present == 8187


def test_was_running_follows_virsh_running(images: Path) -> None:
    assert ops.info(images / "pc-64M-sparse.save").libvirt.was_running  # type: ignore[union-attr]
    assert not ops.info(images / "pc-64M-raw.save").libvirt.was_running  # type: ignore[union-attr]


def test_info_cli_human_and_json(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(images / "pc-64M-sparse.save")
    assert cli.main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "libvirt save image: LibvirtQemudSave version 2 (little-endian), format sparse (6), was_running yes" in out
    assert "domain: mappedram-test" in out and "memory 65536 KiB (64.0 MiB)" in out
    assert "machine pc-i440fx-10.0" in out and "QEMU stream at 0x104d6" in out
    assert cli.main(["info", path, "--output", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["libvirt"]["name"] == "mappedram-test" and d["libvirt"]["memory_bytes"] == 64 << 20
    assert d["libvirt"]["machine"] == "pc-i440fx-10.0" and d["offset"] == STREAM_AT


@pytest.mark.parametrize("name", READABLE)
def test_verify(images: Path, name: str) -> None:
    r = ops.verify(images / name)
    assert r.ok, r.error_text
    assert any(c.startswith("libvirt header") for c in r.checks)
    assert any("libvirt save image" in n for n in r.notes)


@pytest.mark.parametrize("name", READABLE)
def test_extract_is_the_pattern(images: Path, name: str, tmp_path: Path, expected_ram: bytes) -> None:
    out = tmp_path / "pc.ram"
    ops.extract(images / name, out, block="pc.ram")
    data = out.read_bytes()
    assert data == expected_ram
    # the same pages read from the bare QEMU stream at libvirt's offset
    with mappedram.open_file(images / name, offset=STREAM_AT) as mf:
        assert mf.libvirt is None
        assert mf.read_pages("pc.ram", 0, mf.block("pc.ram").num_pages) == data


def test_raw_and_sparse_images_hold_the_same_ram(images: Path) -> None:
    r = ops.diff(images / "pc-64M-raw.save", images / "pc-64M-sparse.save")
    assert r.identical and [d.idstr for d in r.blocks] == ["pc.ram", "pc.bios", "pc.rom"]


def test_convert_and_restore(images: Path, tmp_path: Path, expected_ram: bytes) -> None:
    out = tmp_path / "out.mig"
    report = ops.convert(images / "pc-64M-raw.save", out, to="mapped-ram", options=EngineOptions(durable=False))
    assert any("libvirt save image" in n for n in report.notes)
    with mappedram.open_file(out) as mf:
        assert mf.libvirt is None and mf.mapped_ram and mf.machine_type == "pc-i440fx-10.0"
    dest = bytearray(64 << 20)
    ops.restore(images / "pc-64M-sparse.save", {"pc.ram": dest})
    assert bytes(dest) == expected_ram


def test_image_at_an_offset(raw_full: bytes, tmp_path: Path, expected_ram: bytes) -> None:
    """A raw (legacy-stream) image inside a larger file: libvirt's header at --offset 4096."""
    path = tmp_path / "embedded.bin"
    path.write_bytes(bytes(4096) + raw_full)
    with mappedram.open_file(f"{path}", offset=4096) as mf:
        assert mf.libvirt is not None and mf.libvirt.header_offset == 4096
        assert mf.start_offset == 4096 + STREAM_AT
        assert mf.read_pages("pc.ram", 0, 16384) == expected_ram
    assert cli.main(["verify", f"file:{path},offset=4096"]) == 0


def test_compressed_image_is_refused(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = images / "pc-64M-zstd.save"
    with pytest.raises(UnsupportedError, match=r"zstd-compressed.*tail -c \+66775 FILE \| zstd -dc") as exc:
        mappedram.open_file(path)
    assert exc.value.offset == 28 and exc.value.field == "format" and exc.value.path == str(path)
    assert not ops.verify(path).ok
    assert cli.main(["info", str(path)]) == 1
    assert "zstd-compressed" in capsys.readouterr().err


# -- the header codec ----------------------------------------------------------------------


def test_golden_header(raw_head: bytes) -> None:
    assert raw_head[:92] == GOLDEN_RAW_HEADER
    h = VirQEMUSaveHeader.unpack(GOLDEN_RAW_HEADER)
    assert h == VirQEMUSaveHeader(QEMU_SAVE_MAGIC, 2, 66682, 0, 0, 910)
    assert h.pack() == GOLDEN_RAW_HEADER and h.SIZE == 92
    assert h.save_format is QemuSaveFormat.RAW and h.stream_offset(0) == STREAM_AT and h.xml_len == 910


def test_big_endian_header_is_swapped() -> None:
    """qemuSaveImageBswapHeader: a header from a big-endian host reads with version > 2 at first."""
    be = VirQEMUSaveHeader(QEMU_SAVE_MAGIC, 2, 66682, 1, 6, 910, byteorder="big")
    raw = be.pack()
    assert raw[16:20] == b"\x00\x00\x00\x02"
    back = VirQEMUSaveHeader.unpack(raw)
    assert back == be and back.save_format is QemuSaveFormat.SPARSE


def test_format_names() -> None:
    assert [f.label for f in QemuSaveFormat] == ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"]
    assert [f.compressed for f in QemuSaveFormat] == [False, True, True, True, True, True, False]
    # version 1 images have no format field libvirt reads: always raw
    assert VirQEMUSaveHeader(QEMU_SAVE_MAGIC, 1, 10, 0, 5, 0).save_format is QemuSaveFormat.RAW


@pytest.mark.parametrize(
    ("at", "new", "error", "offset", "match"),
    [
        (16, struct.pack("<I", 3), UnsupportedError, 16, "version is not supported"),
        (16, struct.pack("<I", 0), UnsupportedError, 16, "version is not supported"),
        (28, struct.pack("<I", 7), UnsupportedError, 28, "unsupported libvirt save image format"),
        (20, struct.pack("<I", 0), LayoutError, 20, "invalid libvirt header data length"),
        (20, struct.pack("<I", MAX_DATA_LEN + 1), UnsupportedError, 20, "too large"),
        (32, struct.pack("<I", 66683), LayoutError, 32, "cookie starts past the end"),
    ],
)
def test_bad_header_fields(
    raw_head: bytes, tmp_path: Path, at: int, new: bytes, error: type[FormatError], offset: int, match: str
) -> None:
    path = _patched(tmp_path, raw_head, at, new)
    with pytest.raises(error, match=match) as exc:
        mappedram.open_file(path)
    assert exc.value.offset == offset and exc.value.path == str(path)
    report = ops.verify(path)
    assert not report.ok and report.problems[0].offset == offset


def test_partial_magic_is_an_incomplete_save(
    raw_head: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _patched(tmp_path, raw_head, 0, QEMU_SAVE_PARTIAL)
    with pytest.raises(TruncatedError, match="incomplete: the save never finished") as exc:
        mappedram.open_file(path)
    assert exc.value.offset == 0 and exc.value.field == "magic" and exc.value.actual == "LibvirtQemudPart"
    assert cli.main(["verify", str(path)]) == 1
    assert "LibvirtQemudPart" in capsys.readouterr().err


def test_wrong_magic() -> None:
    with pytest.raises(BadMagicError, match="not a libvirt save image") as exc:
        VirQEMUSaveHeader.unpack(b"LibvirtQemudSavX" + GOLDEN_RAW_HEADER[16:], offset=4096)
    assert exc.value.offset == 4096


@pytest.mark.parametrize("cut", [16, 40, 91, 92, 500, 1001, 66773, 66774, 66777, 70000])
def test_truncated_headers(raw_head: bytes, tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.save"
    path.write_bytes(raw_head[:cut])
    with pytest.raises(FormatError) as exc:
        mappedram.open_file(path)
    assert exc.value.offset is not None and exc.value.offset <= cut
    if cut < 92:
        assert isinstance(exc.value, TruncatedError) and exc.value.offset == 0


def test_xml_errors(raw_head: bytes, tmp_path: Path) -> None:
    # the domain XML (909 bytes at 92) loses its NUL: no cookie, data_len ends at the XML
    no_nul = raw_head[:20] + struct.pack("<I", 909) + raw_head[24:32] + struct.pack("<I", 0) + raw_head[36:]
    with pytest.raises(LayoutError, match="not NUL-terminated") as e1:
        mappedram.open_file(_patched(tmp_path, no_nul, 0, b""))
    assert e1.value.offset == 92 + 909
    with pytest.raises(FormatError, match="does not parse") as e2:
        mappedram.open_file(_patched(tmp_path, raw_head, 92 + 100, b"<<"))
    assert e2.value.offset is not None and 92 <= e2.value.offset <= 92 + 102
    renamed = raw_head.replace(b"<domain", b"<dom4in", 1).replace(b"</domain>", b"</dom4in>", 1)
    with pytest.raises(FormatError, match="not a domain") as e4:
        mappedram.open_file(_patched(tmp_path, renamed, 0, b""))
    assert e4.value.actual == "<dom4in>"
    with pytest.raises(FormatError, match="not UTF-8") as e3:
        mappedram.open_file(_patched(tmp_path, raw_head, 92 + 30, b"\xff"))
    assert e3.value.offset == 92 + 30


def test_verify_flags_format_and_machine_mismatches(raw_full: bytes, tmp_path: Path) -> None:
    # a raw image whose header says sparse: libvirt would restore it with mapped-ram on
    r = ops.verify(_patched(tmp_path, raw_full, 28, struct.pack("<I", 6)))
    assert not r.ok and r.problems[0].field == "format" and r.problems[0].offset == 28
    assert "needs a mapped-ram stream" in (r.error_text or "")
    # the XML names another machine than the stream carries (same length, so nothing moves)
    xml_at = raw_full.index(b"machine='pc-i440fx-10.0'")
    r = ops.verify(_patched(tmp_path, raw_full, xml_at, b"machine='pc-i440fx-9.2' "))
    assert not r.ok and r.problems[0].field == "os/type@machine" and r.problems[0].offset == xml_at
    assert r.problems[0].expected == "pc-i440fx-10.0" and r.problems[0].actual == "pc-i440fx-9.2"


# -- the domain XML ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "expect"),
    [(65536, None, 64 << 20), (64, "MiB", 64 << 20), (64, "M", 64 << 20), (2, "G", 2 << 30), (2, "GB", 2 * 10**9),
     (4096, "bytes", 4096), (4096, "b", 4096), (1, "KB", 1000), (1, "k", 1024), (1, "EiB", 1 << 60),
     (1, "furlongs", None)],
)  # fmt: skip
def test_memory_units(value: int, unit: str | None, expect: int | None) -> None:
    assert memory_bytes(value, unit) == expect


def test_parse_domain_xml() -> None:
    d = parse_domain_xml("<domain type='kvm'><name>g</name><memory unit='GiB'>4</memory></domain>")
    assert (d.name, d.domain_type, d.memory_bytes, d.memory_unit, d.machine, d.uuid) == ("g", "kvm", 4 << 30, "GiB",
                                                                                         None, None)  # fmt: skip
    d = parse_domain_xml("<domain><memory>1024</memory><os><type machine='pc-q35-9.2'>hvm</type></os></domain>")
    assert (d.memory_bytes, d.memory_unit, d.machine, d.name) == (1 << 20, "KiB", "pc-q35-9.2", None)
    with pytest.raises(FormatError, match="not a number"):
        parse_domain_xml("<domain><memory>lots</memory></domain>", 92)
    with pytest.raises(FormatError, match="has a DTD") as exc:
        parse_domain_xml('<!DOCTYPE d [<!ENTITY a "b">]><domain/>', 92)
    assert exc.value.offset == 92


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_headers_raise_only_format_errors(raw_head: bytes, data: st.DataObject) -> None:
    """Random byte changes in the header and XML: a record, or a FormatError; nothing else."""
    buf = bytearray(raw_head[:2048])
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        h = VirQEMUSaveHeader.unpack(bytes(buf[:92]))
        decode_save_data(h, bytes(buf[92:]), 0)
    except FormatError as exc:
        assert exc.offset is not None


def test_padding_before_the_stream(raw_head: bytes) -> None:
    """libvirt's 64 KiB of zeros after the cookie; the stream starts at 92 + data_len."""
    raw = raw_head
    assert raw[STREAM_AT : STREAM_AT + 4] == b"QEVM"
    assert not np.frombuffer(raw[92 + 910 + 236 : STREAM_AT], dtype=np.uint8).any()

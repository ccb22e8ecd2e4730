"""Truncated and corrupted input gives the project's format error, naming offset and field."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mappedram
from mappedram import ops
from mappedram.errors import FormatError, LayoutError, TruncatedError, UnsupportedError
from tests.helpers.patterns import random_pages
from tests.helpers.streams import PAGE, RAM_ID, legacy_stream, mapped_ram_stream
from tests.helpers.vectors import VECTORS

DATA = random_pages(16, 0.4, 7).tobytes()
SMALL = random_pages(2, 0.0, 8).tobytes()


def _mapped() -> bytes:
    return mapped_ram_stream([("pc.ram", DATA), ("pc.bios", SMALL)])


def _open(tmp_path, data: bytes, offset: int = 0) -> None:
    p = tmp_path / "bad.mig"
    p.write_bytes(data)
    with mappedram.open_file(p, offset) as f:
        for b in f.blocks:
            f.read_pages(b, 0, b.num_pages)


def _entry_header_offset(data: bytes, name: bytes) -> int:
    i = data.index(bytes([len(name)]) + name)
    return i + 1 + len(name) + 8  # MappedRamHeader


@pytest.mark.parametrize("kind", ["mapped", "legacy"])
def test_every_truncation_is_rejected(tmp_path, kind):
    data = _mapped() if kind == "mapped" else legacy_stream([("pc.ram", DATA)])
    step = max(1, len(data) // 300)
    cuts = sorted(set(range(0, len(data), step)) | {len(data) - 1, len(data) - 5, len(data) - 30})
    for cut in cuts:
        with pytest.raises(FormatError) as info:
            _open(tmp_path, data[:cut])
        assert info.value.path is not None and info.value.offset is not None, cut
        _says_truncated(info.value, cut)
        assert not ops.verify(tmp_path / "bad.mig").ok


def _says_truncated(err: FormatError, size: int) -> None:
    """A cut file's error says so, with the file's size, and points inside the file."""
    text = str(err)
    assert "truncated" in text and (f"{size:,}" in text or size == 0), (size, text)
    assert err.offset is not None and 0 <= err.offset <= size, (size, text)


def test_truncated_qemu_vectors(tmp_path, vector):
    src, _ = vector("pc-64M-mapped-ram.mig")
    size = os.path.getsize(src)
    cuts = [0, 7, 8, 60, 0x87, 0x100000, 0x2000000, size - 100000, size - 99385, size - 5000, size - 1]
    for cut in cuts:
        dst = tmp_path / "cut.mig"
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            os.copy_file_range(fin.fileno(), fout.fileno(), cut, 0, 0) if cut else None
        report = ops.verify(dst)
        assert not report.ok, cut
        p = report.problems[0]
        assert p.offset is not None and p.offset <= cut, (cut, p)
        assert report.error_text is not None and "truncated" in report.error_text, (cut, report.error_text)
        assert f"{cut:,}" in report.error_text or cut == 0, (cut, report.error_text)


def test_cut_file_errors_read_alike_in_every_command(tmp_path, vector):
    """One prefix for every command (``mappedram: FILE: ...``), the same fields in JSON."""
    src, _ = vector("pc-64M-mapped-ram.mig")
    cut = tmp_path / "cut.mig"
    cut.write_bytes(src.read_bytes()[:300_000])
    texts = []
    for argv in (["info", cut], ["verify", cut], ["export", cut, "-o", tmp_path / "x.elf"],
                 ["extract", cut, "--block", "m0", "-o", tmp_path / "m0.raw"], ["diff", cut, src]):  # fmt: skip
        proc = _cli([os.fspath(a) for a in argv])
        assert proc.returncode != 0, argv
        assert proc.stderr.startswith(f"mappedram: {cut}: truncated: the file ends at byte 300,000"), proc.stderr
        texts.append(proc.stderr.strip())
        js = _cli([os.fspath(a) for a in argv] + ["--output", "json"])
        data = json.loads(js.stdout)
        fields = data["problems"][0] if argv[0] == "verify" else data
        assert {"message", "offset", "field", "expected", "actual", "block", "error"} <= set(fields), data
        assert fields["offset"] <= 300_000 and "truncated" in fields["message"], data
    assert len(set(texts)) == 1, texts
    assert not (tmp_path / "x.elf").exists() and not (tmp_path / "m0.raw").exists()


def _cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mappedram", *argv], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


CASES = {
    "bad magic": (lambda d: _patch(d, 0, b"QEVX"), FormatError, "not a QEMU migration stream", 0),
    "obsolete version": (lambda d: _patch(d, 4, struct.pack(">I", 2)), UnsupportedError, "v2 format is obsolete", 4),
    "machine name too long": (lambda d: _patch(d, 9, struct.pack(">I", 0xFFFFFFF0)), LayoutError, "too long", 9),
    "RAM version 5": (
        lambda d: _patch(d, d.index(b"\x03ram") + 8, struct.pack(">I", 5)),
        UnsupportedError,
        "RAM section version",
        None,
    ),
    "header version 2": (
        lambda d: _patch(d, _entry_header_offset(d, b"pc.ram"), struct.pack(">I", 2)),
        UnsupportedError,
        "version not supported",
        None,
    ),
    "misaligned pages_offset": (
        lambda d: _patch(
            d,
            _entry_header_offset(d, b"pc.ram") + 20,
            struct.pack(">Q", struct.unpack_from(">Q", d, _entry_header_offset(d, b"pc.ram") + 20)[0] + 8),
        ),
        FormatError,
        None,
        None,
    ),
    "pages_offset past the end": (
        lambda d: _patch(d, _entry_header_offset(d, b"pc.ram") + 20, struct.pack(">Q", 1 << 40)),
        FormatError,
        None,
        None,
    ),
    "bitmap overlaps pages": (
        lambda d: _patch(
            d,
            _entry_header_offset(d, b"pc.bios") + 12,
            struct.pack(">Q", struct.unpack_from(">Q", d, _entry_header_offset(d, b"pc.ram") + 20)[0]),
        ),
        LayoutError,
        "overlaps",
        None,
    ),
    "huge used_length": (
        lambda d: _patch(d, d.index(b"\x06pc.ram") + 7, struct.pack(">Q", 1 << 62)),
        LayoutError,
        "exceed the MEM_SIZE total",
        None,
    ),
    "misaligned used_length": (
        lambda d: _patch(d, d.index(b"\x06pc.ram") + 7, struct.pack(">Q", 16 * PAGE + 1)),
        LayoutError,
        "multiple of the page size",
        None,
    ),
    "footer id mismatch": (
        lambda d: _patch(d, d.index(b"\x7e" + struct.pack(">I", RAM_ID)) + 1, struct.pack(">I", 9)),
        FormatError,
        "Mismatched section id in footer",
        None,
    ),
    "vmdesc length lies": (
        lambda d: _patch(d, d.rindex(b"\x06"), b"\x06" + struct.pack(">I", 5)),
        FormatError,
        "claims 5 bytes of JSON, but",
        None,
    ),
    "vmdesc cut inside its JSON": (
        lambda d: d[:-20],
        TruncatedError,
        "truncated: .* inside the vmdesc trailer",
        None,
    ),
    "vmdesc not JSON": (lambda d: d[:-1] + b"!", FormatError, "not valid JSON", None),
    "device section renamed": (
        lambda d: _patch(d, d.index(b"\x05timer"), b"\x05tamer"),
        FormatError,
        "describes device section 0 as 'timer'",
        None,
    ),
    "idstr not UTF-8": (lambda d: _patch(d, d.index(b"\x06pc.ram") + 1, b"\xff\xfe"), FormatError, "UTF-8", None),
    "bit past the block": (None, LayoutError, "outside of the RAM block", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corruption_gives_format_error(tmp_path, case):
    mutate, exc_type, match, offset = CASES[case]
    data = _mapped()
    if case == "bit past the block":
        # pc.ram has 16 pages: its 8-byte bitmap has 48 padding bits; set bit 20
        bo = struct.unpack_from(">Q", data, _entry_header_offset(data, b"pc.ram") + 12)[0]
        data = _patch(data, bo + 2, bytes([data[bo + 2] | 0x10]))
    else:
        data = mutate(data)
    with pytest.raises(exc_type, match=match) as info:
        _open(tmp_path, data)
    err = info.value
    assert err.offset is not None and err.path == str(tmp_path / "bad.mig")
    if offset is not None:
        assert err.offset == offset
    assert f"offset {err.offset:#x}" in str(err)
    report = ops.verify(tmp_path / "bad.mig")
    assert not report.ok and report.problems[0].offset == err.offset


LEGACY_CASES = {
    "XBZRLE page": (0x40, UnsupportedError, "XBZRLE"),
    "COMPRESS_PAGE": (0x100, UnsupportedError, "COMPRESS_PAGE"),
    "HOOK": (0x80, UnsupportedError, "HOOK"),
    "FULL": (0x01, FormatError, "Unknown combination"),
    "PAGE|ZERO": (0x0A, FormatError, "Unknown combination"),
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_bad_flags(tmp_path, case):
    flag, exc_type, match = LEGACY_CASES[case]
    data = legacy_stream([("pc.ram", DATA)])
    first_page = data.index(b"\x06pc.ram", data.index(b"\x02" + struct.pack(">I", RAM_ID))) - 8
    word = struct.unpack_from(">Q", data, first_page)[0]
    data = _patch(data, first_page, struct.pack(">Q", (word & ~0xFFF) | flag))
    with pytest.raises(exc_type, match=match) as info:
        _open(tmp_path, data)
    assert info.value.offset == first_page


def test_legacy_page_outside_block_and_unknown_block(tmp_path):
    data = legacy_stream([("pc.ram", DATA)])
    first_page = data.index(b"\x06pc.ram", data.index(b"\x02" + struct.pack(">I", RAM_ID))) - 8
    with pytest.raises(LayoutError, match="page outside of the RAM block"):
        _open(tmp_path, _patch(data, first_page, struct.pack(">Q", (64 * PAGE) | 0x08)))
    with pytest.raises(FormatError, match="unknown RAM block"):
        _open(tmp_path, _patch(data, first_page + 9, b"pX.ram"))


def test_mapped_ram_rejects_page_records(tmp_path):
    data = _mapped()
    eos = data.index(struct.pack(">Q", 0x10) + b"\x7e")
    with pytest.raises(FormatError, match="Unexpected RAM flags") as info:
        _open(tmp_path, _patch(data, eos, struct.pack(">Q", 0x08)))
    assert info.value.offset == eos


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_only_format_errors(tmp_path, data):
    """Flip bytes anywhere outside page data: decoding either succeeds or raises FormatError."""
    kind = data.draw(st.sampled_from(["mapped", "legacy"]))
    raw = bytearray(_mapped() if kind == "mapped" else legacy_stream([("pc.ram", SMALL)], [[("pc.ram", 1, None)]]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz.mig"
    p.write_bytes(bytes(raw))
    try:
        with mappedram.open_file(p) as f:
            for b in f.blocks:
                f.read_pages(b, 0, b.num_pages)
    except FormatError:
        pass
    report = ops.verify(p)
    assert isinstance(report.ok, bool)


SWEEP_EVERY = {"q35-64M-mapped-ram.mig": 1, "pc-64M-mapped-ram-offset4096.mig": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_4k_truncation_of_qemu_vectors_is_rejected(vector, name):
    """Cuts at 4 KiB steps: all of them for two vectors, every 8th (mapped-ram) or 64th (legacy)
    for the others here; `python tools/sweep_truncations.py` checks them all."""

    from tools.sweep_truncations import sweep

    path, offset = vector(name)
    every = SWEEP_EVERY.get(name, 64 if "legacy" in name else 8)
    assert sweep(str(path), offset, every=every, restore_every=16) > 100


def test_fuzz_briefly(tmp_path):
    """A short run of tools/fuzz.py (the long one takes --inputs 1000000): only FormatError.

    How fast each input decodes is the fuzz tool's business (its --timeout, 1 s by default);
    here the limit only catches an input that never finishes."""
    from tools import fuzz

    result = fuzz.run(4000, 2, seed=7, timeout=120.0, max_mem=2048, out=str(tmp_path / "crashes"))
    crashes = sorted(p.name for p in (tmp_path / "crashes").glob("*.txt")) if (tmp_path / "crashes").exists() else []
    assert result["crashes"] == 0 and result["hangs"] == 0, crashes


def test_mem_size_total_not_matching(tmp_path):
    data = _mapped()
    at = data.index(b"\x03ram") + 12  # MEM_SIZE word after the START header
    total = struct.unpack_from(">Q", data, at)[0] & ~0xFFF
    with pytest.raises(LayoutError, match="exceed the MEM_SIZE total"):
        _open(tmp_path, _patch(data, at, struct.pack(">Q", (total - 4096) | 4)))
    with pytest.raises(FormatError):  # more than the blocks: the EOS is read as another entry
        _open(tmp_path, _patch(data, at, struct.pack(">Q", (total + 4096) | 4)))


def test_nul_in_idstr(tmp_path):
    data = _mapped()
    with pytest.raises(FormatError, match="NUL") as info:
        _open(tmp_path, _patch(data, data.index(b"\x06pc.ram") + 3, b"\x00"))
    assert info.value.field == "RAM block idstr"


def test_legacy_claim_larger_than_file_is_rejected_before_allocation(tmp_path):
    import tracemalloc

    data = legacy_stream([("pc.ram", DATA)])
    at = data.index(b"\x06pc.ram") + 7
    huge = _patch(data, at, struct.pack(">Q", 1 << 50))  # a 1 PiB block: 2**38 pages
    huge = _patch(huge, data.index(b"\x03ram") + 12, struct.pack(">Q", (1 << 50) | 4))
    tracemalloc.start()
    with pytest.raises(LayoutError, match="more pages than the file's"):
        _open(tmp_path, huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20

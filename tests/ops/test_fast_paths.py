"""The fast paths of convert and diff give what the plain paths give.

* the decoder's batched page runs (a legacy file's scan) against one event per record,
  errors and offsets included;
* the vectorised legacy record encoder against the one-record encoder;
* the staging writer with O_DIRECT against buffered writes;
* reads that skip long absent runs: pages stored in neither file are never read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mappedram
from mappedram import ops
from mappedram.engine.copy import GATHER_SPLIT_GAP
from mappedram.engine.directio import probe_direct_io
from mappedram.engine.faults import inject
from mappedram.errors import FormatError
from mappedram.format import decoder as sd
from mappedram.format import encoder as se
from mappedram.format import events as sv
from mappedram.ops import EngineOptions
from tests.helpers.streams import PAGE, legacy_stream, mapped_ram_stream


def _decode(data: bytes, *, batch: bool, split: int) -> tuple[dict[tuple[str, int], int], int]:
    """Decode ``data`` fed in pieces; return the page index (last record wins) and the record count."""
    dec = sd.Decoder(batch_pages=batch)
    index: dict[tuple[str, int], int] = {}
    records = 0
    while True:
        ev = dec.next_event()
        if ev is sv.NEED_DATA:
            at = dec.feed_offset
            dec.feed(data[at : at + split])
        elif isinstance(ev, sv.RamPage):
            index[(ev.idstr, ev.addr // PAGE)] = -1 if ev.data_offset is None else ev.data_offset
            records += 1
        elif isinstance(ev, sv.RamPageRun):
            for addr, off in zip(ev.addrs.tolist(), ev.data_offsets.tolist()):
                index[(ev.idstr, addr // PAGE)] = off
            records += len(ev.addrs)
        elif isinstance(ev, sv.DeviceStateStart):
            return index, records


def _error(data: bytes, *, batch: bool, split: int) -> tuple[type[FormatError], int | None, str]:
    with pytest.raises(FormatError) as exc:
        _decode(data, batch=batch, split=split)
    return type(exc.value), exc.value.offset, exc.value.message


@st.composite
def legacy_streams(draw: st.DrawFn) -> bytes:
    blocks = []
    for b in range(draw(st.integers(1, 2))):
        npages = draw(st.integers(1, 12))
        zero = draw(st.lists(st.booleans(), min_size=npages, max_size=npages))
        data = b"".join(bytes(PAGE) if z else bytes([b * 16 + i + 1]) * PAGE for i, z in enumerate(zero))
        blocks.append((f"b{b}", data))
    passes = []
    for _ in range(draw(st.integers(0, 2))):
        recs = []
        for _ in range(draw(st.integers(0, 6))):
            name, data = blocks[draw(st.integers(0, len(blocks) - 1))]
            page = draw(st.integers(0, len(data) // PAGE - 1))
            recs.append((name, page, None if draw(st.booleans()) else bytes([0xA0 + page]) * PAGE))
        passes.append(recs)
    return legacy_stream(blocks, passes)


@settings(max_examples=150, deadline=None)
@given(legacy_streams(), st.sampled_from([1, 7, 100, 4105, 9000, 1 << 20]))
def test_batched_scan_equals_one_event_per_record(data: bytes, split: int) -> None:
    assert _decode(data, batch=True, split=split) == _decode(data, batch=False, split=1 << 20)


def test_batched_scan_errors_are_the_same() -> None:
    data = bytes(range(256)) * 16
    stream = legacy_stream([("pc.ram", (data + bytes(PAGE)) * 4)])
    first_zero = _zero_records(stream)[1]  # a ZERO record inside a run, after a PAGE record
    bad_fill = stream[: first_zero + 8] + b"\x01" + stream[first_zero + 9 :]
    word = int.from_bytes(stream[first_zero : first_zero + 8], "big")
    outside = stream[:first_zero] + ((0x100000 << 12) | (word & 0xFFF)).to_bytes(8, "big") + stream[first_zero + 8 :]
    cases = [bad_fill, outside] + [stream[:cut] for cut in (first_zero + 4, first_zero + 8, first_zero + 500)]
    for bad in cases:
        for split in (1, 13, 4096, 1 << 20):
            assert _error(bad, batch=True, split=split) == _error(bad, batch=False, split=split)


def _zero_records(stream: bytes) -> list[int]:
    """Offsets of the ZERO records of a legacy stream (from the per-record decoder)."""
    dec = sd.Decoder()
    dec.feed(stream)
    dec.feed(b"")
    out = []
    while not isinstance(ev := dec.next_event(), sv.DeviceStateStart):
        if isinstance(ev, sv.RamPage) and ev.data_offset is None:
            out.append(ev.offset)
    return out


def test_open_file_index_of_a_multipass_legacy_file(tmp_path: Path) -> None:
    data = b"".join(bytes([i + 1]) * PAGE for i in range(8))
    passes = [[("pc.ram", 3, None), ("pc.ram", 3, b"\x77" * PAGE), ("pc.ram", 5, None)]]
    path = tmp_path / "l.mig"
    path.write_bytes(legacy_stream([("pc.ram", data)], passes))
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.legacy_records == 11
        got = mf.read_pages(b, 0, 8)
    want = bytearray(data)
    want[3 * PAGE : 4 * PAGE] = b"\x77" * PAGE
    want[5 * PAGE : 6 * PAGE] = bytes(PAGE)
    assert got == bytes(want)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.floats(0, 1), st.booleans(), st.integers(0, 1000), st.integers(0, 2**32))
def test_vectorised_records_equal_one_record_encoding(
    n: int, density: float, named: bool, first: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    nonzero = rng.random(n) < density
    pages = np.zeros((n, PAGE), dtype=np.uint8)
    pages[nonzero] = rng.integers(0, 256, (int(nonzero.sum()), PAGE), dtype=np.uint8)
    pages[nonzero, 0] |= 1
    idstr = "pc.ram" if named else None
    want = b"".join(
        se.encode_page_record(idstr if i == 0 else None, (first + i) * PAGE, pages[i].tobytes() if nonzero[i] else None)
        for i in range(n)
    )
    out = np.full(se.page_records_size(idstr, nonzero, PAGE) + 100, 0xCC, dtype=np.uint8)
    size = se.encode_page_records_into(idstr, first * PAGE, pages, nonzero, out)
    assert size == len(want) and out[:size].tobytes() == want and (out[size:] == 0xCC).all()


def _direct_ok(path: Path) -> None:
    reason = probe_direct_io(str(path))
    if reason is not None:
        pytest.skip(reason)




def test_convert_to_legacy_direct_io_is_byte_identical(tmp_path: Path, vector, expected_ram: bytes) -> None:  # type: ignore[no-untyped-def]
    _direct_ok(tmp_path)
    path, offset = vector("q35-64M-mapped-ram.mig")
    outs = []
    for direct in (False, True):
        out = tmp_path / f"legacy-{direct}.mig"
        report = ops.convert(path, out, to="legacy", source_offset=offset, options=EngineOptions(direct_io=direct, durable=False))
        assert report.direct_io is direct
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with mappedram.open_file(tmp_path / "legacy-True.mig") as mf:
        assert mf.read_pages("m0", 0, mf.block("m0").num_pages) == expected_ram


def _mapped(tmp_path: Path, name: str, data: bytes) -> tuple[Path, int]:
    """A mapped-ram file whose absent slots hold 0xEE; returns it and pc.ram's pages_offset."""
    path = tmp_path / name
    path.write_bytes(mapped_ram_stream([("pc.ram", data)], stale=True, alignment=1 << 20))
    with mappedram.open_file(path) as mf:
        lay = mf.block("pc.ram").layout
        assert lay is not None
        return path, lay.pages_offset


def test_pages_stored_in_neither_file_are_never_read(tmp_path: Path) -> None:
    npages = 256
    gap = range(40, 40 + 3 * GATHER_SPLIT_GAP)  # absent in both: stale 0xEE slots, never read
    a = bytearray(b"\x11" * PAGE * npages)
    for i in gap:
        a[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    b = bytearray(a)
    b[5 * PAGE : 6 * PAGE] = bytes(PAGE)  # only in A: compared against zero
    b[200 * PAGE : 201 * PAGE] = b"\x22" * PAGE  # in both, different
    pa, off_a = _mapped(tmp_path, "a.mig", bytes(a))
    pb, off_b = _mapped(tmp_path, "b.mig", bytes(b))
    holes = {str(pa): (off_a + gap.start * PAGE, off_a + gap.stop * PAGE),
             str(pb): (off_b + gap.start * PAGE, off_b + gap.stop * PAGE)}  # fmt: skip
    touched = []

    def refuse(op: str, path: str, offset: int, length: int) -> int | None:
        lo, hi = holes.get(path, (0, 0))
        if op == "read" and offset < hi and offset + length > lo:
            touched.append((path, offset, length))
            raise OSError(5, "read of a slot no file stores")
        return None

    with inject(refuse):
        r = ops.diff(pa, pb, options=EngineOptions(channels=1))
        ops.extract(pa, tmp_path / "a.raw", block="pc.ram", options=EngineOptions(channels=1))
    assert not touched
    assert [(first, count) for first, count in r.blocks[0].ranges] == [(5, 1), (200, 1)]
    assert (tmp_path / "a.raw").read_bytes() == bytes(a)

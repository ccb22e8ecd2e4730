"""Property round trips: bitmaps, the layout planner, and whole streams (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mappedram
from mappedram._runs import bit_runs
from mappedram.format.bitmap import bitmap_size, decode_bitmap, encode_bitmap, padding_bits_set
from mappedram.layout import check_layout, plan_mapped_ram
from tests.helpers import strategies as mst


@given(mst.bits, st.sampled_from([4, 8]), st.sampled_from(["little", "big"]))
def test_bitmap_round_trip(bits, word_size, order):
    raw = encode_bitmap(bits, word_size=word_size, byteorder=order)
    assert len(raw) == bitmap_size(len(bits), word_size)
    assert len(raw) % word_size == 0
    assert np.array_equal(decode_bitmap(raw, len(bits), word_size=word_size, byteorder=order), bits)
    assert padding_bits_set(raw, len(bits), word_size=word_size, byteorder=order) == -1


@given(mst.bits)
def test_bitmap_qemu_little_endian_layout(bits):
    """On 64-bit LE hosts bit i is bit (i % 8) of byte i // 8 (QEMU's raw unsigned long[])."""
    raw = encode_bitmap(bits)
    for i in np.flatnonzero(bits)[:50]:
        assert raw[i // 8] >> (i % 8) & 1
    words = np.frombuffer(raw, dtype="<u8")
    for i in np.flatnonzero(bits)[:50]:
        assert int(words[i // 64]) >> (i % 64) & 1


def test_bitmap_big_endian_words_differ():
    bits = np.zeros(64, dtype=np.bool_)
    bits[0] = True
    assert encode_bitmap(bits, byteorder="little")[0] == 1
    assert encode_bitmap(bits, byteorder="big")[7] == 1


@given(mst.bits, st.booleans())
def test_bit_runs_matches_naive(bits, value):
    starts, lengths = bit_runs(bits, value)
    naive = []
    i = 0
    while i < len(bits):
        if bits[i] == value:
            j = i
            while j < len(bits) and bits[j] == value:
                j += 1
            naive.append((i, j - i))
            i = j
        else:
            i += 1
    assert list(zip(starts.tolist(), lengths.tolist())) == naive


@given(mst.block_list, st.integers(0, 1 << 20), st.sampled_from([4096, 0x10000, 0x100000]))
def test_planner_regions_aligned_disjoint_and_checkable(blocks, entries_offset, alignment):
    plan = plan_mapped_ram(blocks, entries_offset=entries_offset, alignment=alignment)
    prev_end = entries_offset
    for lay, (name, size) in zip(plan.blocks, blocks):
        assert lay.entry_offset == prev_end
        assert lay.bitmap_offset == lay.header_offset + 28
        assert lay.pages_offset % alignment == 0
        assert lay.pages_offset >= lay.bitmap_offset + lay.bitmap_size
        assert lay.pages_offset - (lay.bitmap_offset + lay.bitmap_size) < alignment
        prev_end = lay.end
    assert plan.eos_offset == prev_end
    check_layout(plan.blocks, stream_start=0, file_size=plan.eos_offset + 1)


def test_planner_reproduces_qemu_offsets():
    from tests.helpers.vectors import vector_meta

    meta = vector_meta("q35-64M-mapped-ram.mig")
    blocks = [(b["idstr"], b["used_length"]) for b in meta["ram_blocks"]]
    # entries start after MEM_SIZE: START at 0x47 (11-byte machine name), 17 bytes of header, be64
    plan = plan_mapped_ram(blocks, entries_offset=0x47 + 17 + 8)
    got = [(b.bitmap_offset, b.pages_offset) for b in plan.blocks]
    assert got == [(b["bitmap_offset"], b["pages_offset"]) for b in meta["ram_blocks"]]


@settings(max_examples=40, deadline=None)
@given(
    mst.named_blocks,
    st.integers(0, 9000),
    st.integers(0, 3),
)
def test_mapped_ram_stream_round_trip(tmp_path_factory, blocks, start, parts):
    from tests.helpers.streams import mapped_ram_stream

    path = tmp_path_factory.mktemp("rt") / "f.mig"
    path.write_bytes(mapped_ram_stream(blocks, start=start, parts=parts))
    with mappedram.open_file(path, start) as f:
        for name, data in blocks:
            b = f.block(name)
            assert f.read_pages(b, 0, b.num_pages) == data  # stale 0xEE slots never show
            nz = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4096).any(axis=1)
            assert b.pages_present == int(nz.sum())


@settings(max_examples=40, deadline=None)
@given(
    mst.pages,
    mst.page_rewrites,
    st.integers(1, 4),
)
def test_legacy_last_write_wins(tmp_path_factory, data, rewrites, npasses):
    from tests.helpers.streams import legacy_stream

    num = len(data) // 4096
    expected = bytearray(data)
    passes = []
    for p in range(npasses):
        records = []
        for idx, fill in rewrites[p::npasses]:
            idx %= num
            page = None if fill is None else fill * 4096
            records.append(("pc.ram", idx, page))
            expected[idx * 4096 : (idx + 1) * 4096] = page or bytes(4096)
        passes.append(records)
    path = tmp_path_factory.mktemp("lg") / "f.mig"
    path.write_bytes(legacy_stream([("pc.ram", data)], passes))
    with mappedram.open_file(path) as f:
        assert f.read_pages("pc.ram", 0, num) == bytes(expected)

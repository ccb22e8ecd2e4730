"""The eight QEMU 10.0.2 files decode, and their RAM and block tables are what QEMU saved."""

from __future__ import annotations

import hashlib

import pytest

import mappedram
from mappedram import ops
from tests.helpers.vectors import INDEX, VECTORS, vector_meta


@pytest.mark.parametrize("name", VECTORS)
def test_vector_main_block_equals_pattern(name, vector, expected_ram):
    path, offset = vector(name)
    with mappedram.open_file(path, offset) as f:
        block = f.block("m0")
        data = f.read_pages(block, 0, block.num_pages)
    if data != expected_ram:
        bad = next(i for i in range(0, len(data), 4096) if data[i : i + 4096] != expected_ram[i : i + 4096])
        pytest.fail(f"{name}: m0 differs from the pattern first at page {bad // 4096}")
    assert hashlib.sha256(data).hexdigest() == INDEX["expected_ram_sha256"]


@pytest.mark.parametrize("name", VECTORS)
def test_vector_structure_matches_index(name, vector):
    meta = vector_meta(name)
    path, offset = vector(name)
    with mappedram.open_file(path, offset) as f:
        assert f.machine_type == meta["stream_machine"]
        assert f.mapped_ram == bool(meta["caps"].get("mapped-ram"))
        assert f.capabilities == (("mapped-ram",) if f.mapped_ram else ())
        assert f.mem_size == meta["ram_total_bytes"]
        assert f.file_size == meta["apparent_bytes"]
        assert [b.idstr for b in f.blocks] == [b["idstr"] for b in meta["ram_blocks"]]
        for b, want in zip(f.blocks, meta["ram_blocks"]):
            assert b.used_length == want["used_length"]
            if f.mapped_ram:
                assert b.layout is not None
                assert b.layout.bitmap_offset == want["bitmap_offset"]
                assert b.layout.pages_offset == want["pages_offset"]
                assert b.layout.bitmap_size == want["bitmap_bytes"]
                assert b.layout.page_size == want["mr_page_size"]
                assert b.pages_present == want["pages_present"]
        assert f.block("m0").pages_present == INDEX["nonzero_pages"]
        assert f.block("m0").pages_zero == INDEX["zero_pages"]
        # device state: the vmdesc lists every FULL section, in stream order
        assert f.vmdesc is not None and f.device_sections is not None
        assert [d.idstr for d in f.device_sections] == [d["name"] for d in f.vmdesc.devices]
        assert f.device_state()[-1] == 0  # QEMU_VM_EOF
        assert f.vmdesc.offset == f.device_state_offset + f.device_state_length


@pytest.mark.parametrize("name", VECTORS)
def test_vector_verifies(name, vector):
    path, offset = vector(name)
    report = ops.verify(path, offset)
    assert report.ok, report.error_text
    assert report.notes == []  # QEMU's own layout


def test_offset_files_keep_absolute_offsets(vector):
    plain, _ = vector("q35-64M-mapped-ram.mig")
    shifted, offset = vector("q35-64M-mapped-ram-offset4096.mig")
    assert offset == 4096
    with mappedram.open_file(plain) as a, mappedram.open_file(shifted, offset) as b:
        assert b.block("m0").layout.bitmap_offset == a.block("m0").layout.bitmap_offset + 4096
        assert b.block("m0").layout.pages_offset == a.block("m0").layout.pages_offset == 0x100000
    with pytest.raises(mappedram.BadMagicError, match="not a QEMU migration stream"):
        mappedram.open_file(shifted, 0)


def test_legacy_counts_records_over_passes(vector):
    path, _ = vector("pc-64M-legacy.mig")
    with mappedram.open_file(path) as f:
        m0 = f.block("m0")
        assert m0.legacy_records == m0.num_pages  # first pass sends every page, PAGE or ZERO
        assert m0.layout is None

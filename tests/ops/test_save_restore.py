"""Save, restore and rewrite: round trips through real files (buffered and O_DIRECT), safety."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mappedram
from mappedram import ops
from mappedram.engine.directio import aligned_buffer, probe_direct_io
from mappedram.errors import IOEngineError, UsageError
from mappedram.format.vmdesc import configuration_entry_of
from mappedram.ops import TEMP_MARKER, EngineOptions, restore, rewrite, save
from tests.helpers.patterns import random_pages
from tests.helpers.streams import as_qemu_writes_it, legacy_stream
from tests.helpers.vectors import VECTORS, vector_meta

DIRECT_OK = probe_direct_io("/tmp") is None


def _blocks(seed: int, sizes: list[int], zero: float) -> dict[str, np.ndarray]:
    return {f"blk{i}/{seed}": random_pages(n, zero, seed + i) for i, n in enumerate(sizes)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    zero=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    channels=st.integers(1, 8),
    direct=st.booleans() if DIRECT_OK else st.just(False),
    seed=st.integers(0, 1000),
    aligned=st.booleans(),
)
def test_round_trip_bit_exact(tmp_path, sizes, zero, channels, direct, seed, aligned):
    src = _blocks(seed, sizes, zero)
    if aligned:  # page-aligned sources take the zero-copy O_DIRECT path; numpy arrays are bounced
        maps = {}
        for k, v in src.items():
            m = aligned_buffer(len(v))
            m[: len(v)] = v.tobytes()
            maps[k] = memoryview(m)[: len(v)]
        sources = maps
    else:
        sources = src
    path = tmp_path / "rt.mig"
    report = save(path, list(sources.items()), options=EngineOptions(channels=channels, direct_io=direct))
    nonzero = sum(int(v.reshape(-1, 4096).any(axis=1).sum()) for v in src.values())
    assert report.pages_written == nonzero
    assert report.direct_io == direct
    assert ops.verify(path).ok
    dest = {k: np.full_like(v, 0) for k, v in src.items()}
    r = restore(path, dest, options=EngineOptions(channels=channels, direct_io=direct))
    assert r.pages_read == nonzero
    for k in src:
        assert np.array_equal(dest[k], src[k]), k
    # zero pages were never written: they are holes (buffered), so the file stays small
    if not direct:
        assert os.stat(path).st_blocks * 512 <= (nonzero + 8 * len(sizes) + 16) * 4096


def test_restore_leaves_absent_pages_untouched_or_zeroes_them(tmp_path):
    data = random_pages(64, 0.5, 1)
    path = tmp_path / "f.mig"
    save(path, {"pc.ram": data})
    dirty = np.full_like(data, 0xAB)
    restore(path, {"pc.ram": dirty})
    pages = dirty.reshape(-1, 4096)
    zero = ~data.reshape(-1, 4096).any(axis=1)
    assert (pages[zero] == 0xAB).all() and np.array_equal(pages[~zero], data.reshape(-1, 4096)[~zero])
    restore(path, {"pc.ram": dirty}, zero_absent=True)
    assert np.array_equal(dirty, data)


def test_restore_never_copies_stale_slots(tmp_path):
    """A slot whose bit is 0 may hold old bytes (a page that became zero): they never reach memory."""
    from tests.helpers.streams import mapped_ram_stream

    data = random_pages(32, 0.5, 2).tobytes()
    path = tmp_path / "stale.mig"
    path.write_bytes(mapped_ram_stream([("pc.ram", data)], stale=True))  # 0-bit slots hold 0xEE
    for direct in [False, True] if DIRECT_OK else [False]:
        dest = bytearray(len(data))
        restore(path, {"pc.ram": dest}, options=EngineOptions(direct_io=direct))
        assert bytes(dest) == data


@pytest.mark.parametrize("direct", [False, True] if DIRECT_OK else [False])
@pytest.mark.parametrize(("zero", "channels"), [(0.1, 1), (0.5, 3), (0.9, 2)])
def test_restore_files_writes_present_pages_and_keeps_holes(tmp_path, direct, zero, channels):
    """A raw image destination: bit-exact, absent pages stay holes, and a stale slot (bit 0)
    never reaches the file."""
    from tests.helpers.streams import mapped_ram_stream

    data = random_pages(5000, zero, 7)  # more than one task (CHUNK_PAGES) per block; short and long runs
    if zero >= 0.5:
        data[1000 * 4096 : 2100 * 4096] = 0  # absent 2 MiB chunks, pages 1024..2047 of the file
    small = random_pages(33, 0.5, 8)
    path = tmp_path / "f.mig"
    path.write_bytes(mapped_ram_stream([("pc.ram", data.tobytes()), ("other", small.tobytes())], stale=True))
    out, other = tmp_path / "ram.raw", tmp_path / "other.raw"
    r = ops.restore_files(path, [("pc.ram", os.fspath(out)), ("other", os.fspath(other))],
                          options=EngineOptions(channels=channels, direct_io=direct))  # fmt: skip
    present = int(data.reshape(-1, 4096).any(axis=1).sum()) + int(small.reshape(-1, 4096).any(axis=1).sum())
    assert r.pages_read == present and r.direct_io == direct
    assert out.read_bytes() == data.tobytes() and other.read_bytes() == small.tobytes()
    assert os.stat(out).st_mode & 0o777 == 0o600
    if zero >= 0.5:
        # Holes stay holes. The page cache's folios (up to 2 MiB, aligned to their size) may
        # take the absent neighbours of a written page along, so the bound is per 2 MiB chunk:
        # a chunk with no present page stays a hole, and only chunks with one hold blocks.
        chunk = 512
        held = np.zeros(-(-5000 // chunk), dtype=np.bool_)
        np.logical_or.at(held, np.flatnonzero(data.reshape(-1, 4096).any(axis=1)) // chunk, True)
        assert not held[2:4].any()
        fd = os.open(out, os.O_RDONLY)
        try:
            for c in np.flatnonzero(~held).tolist():
                try:
                    assert os.lseek(fd, c * chunk * 4096, os.SEEK_DATA) >= (c + 1) * chunk * 4096, f"chunk {c}"
                except OSError as exc:  # ENXIO: no data after it
                    assert exc.errno == errno.ENXIO
        finally:
            os.close(fd)
        assert os.stat(out).st_blocks * 512 <= (int(held.sum()) * chunk + 16) * 4096


@pytest.mark.parametrize("direct", [False, True] if DIRECT_OK else [False])
@pytest.mark.parametrize("zero", [0.5, 0.05])  # short runs, long runs
def test_restore_files_into_an_existing_file_leaves_or_zeroes_absent_pages(tmp_path, direct, zero):
    data = random_pages(3000, zero, 3)
    path = tmp_path / "f.mig"
    save(path, {"pc.ram": data})
    out = tmp_path / "old.raw"
    out.write_bytes(b"\xab" * (len(data) + 8192))  # longer than the block: the rest is kept
    out.chmod(0o640)
    opts = EngineOptions(direct_io=direct)
    r = ops.restore_files(path, [("pc.ram", os.fspath(out))], options=opts)
    got = np.frombuffer(out.read_bytes(), dtype=np.uint8)
    pages, want = got[: len(data)].reshape(-1, 4096), data.reshape(-1, 4096)
    zero = ~want.any(axis=1)
    assert (pages[zero] == 0xAB).all() and np.array_equal(pages[~zero], want[~zero])
    assert (got[len(data) :] == 0xAB).all() and any("existing file" in n for n in r.notes)
    ops.restore_files(path, [("pc.ram", os.fspath(out))], zero_absent=True, options=opts)
    got = np.frombuffer(out.read_bytes(), dtype=np.uint8)
    assert np.array_equal(got[: len(data)], data) and (got[len(data) :] == 0xAB).all()
    assert os.stat(out).st_mode & 0o777 == 0o640


def test_restore_validates_before_writing(tmp_path):
    data = random_pages(64, 0.3, 3)
    path = tmp_path / "f.mig"
    save(path, {"pc.ram": data})
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[:-10]))  # cut the vmdesc: the save looks incomplete
    dest = np.full_like(data, 0x11)
    with pytest.raises(mappedram.TruncatedError):
        restore(path, {"pc.ram": dest})
    assert (dest == 0x11).all()
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="holds 4096 bytes"):
        restore(path, {"pc.ram": bytearray(4096)})
    with pytest.raises(UsageError, match="no RAM block 'nope'"):
        restore(path, {"nope": bytearray(4096)})
    with pytest.raises(UsageError, match="read-only"):
        restore(path, {"pc.ram": bytes(len(data))})


def test_failed_save_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "snap.mig"
    save(target, {"pc.ram": random_pages(16, 0.5, 4)})
    before = target.read_bytes()

    def boom(_: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        save(target, {"pc.ram": random_pages(5000, 0.5, 5)}, options=EngineOptions(progress=boom))
    assert target.read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if TEMP_MARKER in p and p.endswith(".tmp")] == []
    fresh = tmp_path / "new.mig"
    with pytest.raises(RuntimeError):
        save(fresh, {"pc.ram": random_pages(16, 0.5, 4)}, options=EngineOptions(progress=boom))
    assert not fresh.exists()


def test_save_in_place_at_offset_keeps_prefix(tmp_path):
    target = tmp_path / "disk.img"
    target.write_bytes(b"A" * 8000 + b"B" * 5000)
    data = random_pages(40, 0.5, 6)
    save(target, {"pc.ram": data}, offset=0x1234)
    raw = target.read_bytes()
    assert raw[:0x1234] == b"A" * 0x1234 and raw[0x1234:0x1238] == b"QEVM"
    with mappedram.open_file(target, 0x1234) as f:
        assert f.read_pages("pc.ram", 0, 40) == data.tobytes()
        assert f.block("pc.ram").layout.pages_offset == 0x100000  # absolute 1 MiB alignment


def test_save_rejects_bad_blocks(tmp_path):
    with pytest.raises(UsageError, match="multiple of 4096"):
        save(tmp_path / "x.mig", {"a": bytearray(100)})
    with pytest.raises(UsageError, match="not a buffer"):
        save(tmp_path / "x.mig", {"a": 12})
    with pytest.raises(UsageError, match="no RAM blocks"):
        save(tmp_path / "x.mig", {})
    assert not (tmp_path / "x.mig").exists()


def test_direct_io_refused_on_tmpfs_unless_fallback(tmp_path, monkeypatch):
    from mappedram.ops import protocol as snap

    monkeypatch.setattr(snap, "probe_direct_io", lambda d: f"the filesystem of {d} does not support O_DIRECT")
    with pytest.raises(IOEngineError, match="does not support O_DIRECT"):
        save(tmp_path / "x.mig", {"a": bytearray(4096)}, options=EngineOptions(direct_io=True))
    r = save(tmp_path / "x.mig", {"a": bytearray(4096)}, options=EngineOptions(direct_io=True, direct_io_fallback=True))
    assert not r.direct_io and "fallback" in r.direct_io_reason and "does not support O_DIRECT" in r.direct_io_reason


MAPPED = [n for n in VECTORS if "legacy" not in n]


@pytest.mark.parametrize("name", MAPPED)
def test_rewrite_qemu_vector_is_byte_identical(tmp_path, vector, name):
    src, offset = vector(name)
    out = tmp_path / "rw.mig"
    # through the page cache: O_DIRECT writes merged extents, zero pages between data included
    rewrite(src, out, source_offset=offset, offset=offset or None, options=EngineOptions(channels=1, direct_io="off"))
    # byte for byte, but for the trailer's "mappedram" key (QEMU's tools ignore it)
    assert as_qemu_writes_it(out.read_bytes()) == src.read_bytes()
    # holes where QEMU has holes: not one byte more allocated than QEMU's file
    assert os.stat(out).st_blocks <= vector_meta(name)["allocated_bytes"] // 512 + 8


def _same_trailer(ours, theirs) -> bool:
    """The source's trailer, its configuration entry describing our configuration section."""
    a, b = dict(ours.vmdesc.data), dict(theirs.vmdesc.data)
    entry = a.pop("configuration", None)
    b.pop("configuration", None)
    promise = a.pop("mappedram", None)
    return a == b and entry == configuration_entry_of(ours.configuration) and promise == (
        {"clean-zero-slots": True} if ours.mapped_ram else None
    )


@pytest.mark.parametrize("name", ["q35-64M-legacy.mig", "pc-64M-legacy.mig"])
def test_rewrite_legacy_to_mapped_ram(tmp_path, vector, expected_ram, name):
    src, _ = vector(name)
    out = tmp_path / "conv.mig"
    r = rewrite(src, out, options=EngineOptions(channels=4))
    with mappedram.open_file(out) as f, mappedram.open_file(src) as g:
        assert f.mapped_ram and f.machine_type == g.machine_type
        assert f.read_pages("m0", 0, f.block("m0").num_pages) == expected_ram
        assert f.device_state() == g.device_state() and _same_trailer(f, g)
        assert f.ram_section_id == g.ram_section_id
        for a, b in zip(f.blocks, g.blocks):
            assert f.read_pages(a, 0, a.num_pages) == g.read_pages(b, 0, b.num_pages)
    assert r.pages_written == sum(b.pages_present for b in g.blocks)


def test_rewrite_multipass_legacy_last_write_wins(tmp_path):
    data = random_pages(8, 0.0, 9).tobytes()
    src = tmp_path / "lg.mig"
    src.write_bytes(legacy_stream([("pc.ram", data)], [[("pc.ram", 2, b"\x07" * 4096)], [("pc.ram", 5, None)]]))
    out = tmp_path / "mr.mig"
    rewrite(src, out)
    want = bytearray(data)
    want[2 * 4096 : 3 * 4096] = b"\x07" * 4096
    want[5 * 4096 : 6 * 4096] = bytes(4096)
    with mappedram.open_file(out) as f:
        assert f.read_pages("pc.ram", 0, 8) == bytes(want)
        assert f.block("pc.ram").pages_present == 7


def _scattered_passes(sizes: dict[str, int], seed: int) -> tuple[list[list[tuple[str, int, bytes | None]]], int]:
    """Later passes of a legacy stream: scattered pages (across chunk boundaries, out of order,
    some sent twice in one pass), as new data, ZERO records, or PAGE records of zero bytes."""
    rng = np.random.default_rng(seed)
    passes = []
    for p in range(3):
        records: list[tuple[str, int, bytes | None]] = []
        for name, n in sizes.items():
            idx = rng.choice(n, size=n // 3, replace=True)
            if p == 0:
                idx = np.sort(idx)  # QEMU's order; the others are shuffled
            for i in idx.tolist():
                kind = rng.integers(0, 3)
                page = None if kind == 0 else bytes(4096) if kind == 1 else rng.bytes(4096)
                records.append((name, i, page))
        passes.append(records)
    return passes, 3


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("direct", [False, True] if DIRECT_OK else [False])
def test_streamed_legacy_rewrite_many_chunks_and_passes(tmp_path, channels, direct):
    # pc.ram spans three 8 MiB chunks (lanes); every pass rewrites pages in each of them
    data = {"pc.ram": random_pages(5000, 0.4, 21).tobytes(), "vga.vram": random_pages(300, 0.2, 22).tobytes()}
    passes, _ = _scattered_passes({k: len(v) // 4096 for k, v in data.items()}, 23)
    src = tmp_path / "lg.mig"
    src.write_bytes(legacy_stream(list(data.items()), passes))
    want = {k: bytearray(v) for k, v in data.items()}
    for records in passes:
        for name, i, page in records:
            want[name][i * 4096 : (i + 1) * 4096] = page or bytes(4096)
    out = tmp_path / "mr.mig"
    report = rewrite(src, out, options=EngineOptions(channels=channels, direct_io=direct))
    assert report.channels == channels
    with mappedram.open_file(src) as lg, mappedram.open_file(out) as mr:
        assert mr.mapped_ram and mr.device_state() == lg.device_state() and _same_trailer(mr, lg)
        for name, expected in want.items():
            n = len(expected) // 4096
            assert lg.read_pages(name, 0, n) == bytes(expected)  # the reference reader agrees
            assert mr.read_pages(name, 0, n) == bytes(expected)
            nonzero = np.frombuffer(bytes(expected), dtype=np.uint8).reshape(n, 4096).any(axis=1)
            assert np.array_equal(mr.block(name).present, nonzero)  # zero pages are holes
    assert report.pages_written == sum(b.pages_present for b in mappedram.open_file(out).blocks)
    assert ops.verify(out).ok


def test_streamed_legacy_rewrite_of_a_cut_stream_leaves_nothing(tmp_path):
    data = random_pages(5000, 0.3, 31).tobytes()
    passes, _ = _scattered_passes({"pc.ram": 5000}, 32)
    whole = legacy_stream([("pc.ram", data)], passes)
    src = tmp_path / "cut.mig"
    src.write_bytes(whole[: len(whole) * 3 // 4])  # mid-way through a later pass
    out = tmp_path / "mr.mig"
    with pytest.raises(mappedram.FormatError) as info:
        rewrite(src, out, options=EngineOptions(channels=3))
    assert info.value.path == str(src)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if TEMP_MARKER in p.name and p.suffix == ".tmp"] == []


def test_save_from_mmap_of_a_file(tmp_path):
    raw = tmp_path / "ram.raw"
    data = random_pages(256, 0.5, 10)
    raw.write_bytes(data.tobytes())
    with raw.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        save(tmp_path / "m.mig", {"pc.ram": m}, options=EngineOptions(channels=2))
    dest = mmap.mmap(-1, len(data))
    restore(tmp_path / "m.mig", {"pc.ram": dest})
    assert dest[:] == data.tobytes()


def test_rewrite_onto_its_source_is_refused(tmp_path):
    path = tmp_path / "x.mig"
    save(path, {"pc.ram": random_pages(8, 0.5, 11)})
    before = path.read_bytes()
    for offset in (0, None):
        with pytest.raises(UsageError, match="the output is the input file"):
            rewrite(path, path, offset=offset)
    assert path.read_bytes() == before


def test_save_of_a_raw_file_onto_itself_is_refused(tmp_path):
    raw = tmp_path / "ram.raw"
    raw.write_bytes(random_pages(8, 0.5, 12).tobytes())
    before = raw.read_bytes()
    with pytest.raises(UsageError, match="the output is the input file"):
        ops.save_files(raw, [("pc.ram", raw)])
    assert raw.read_bytes() == before


def test_machine_alias_refused(tmp_path):
    with pytest.raises(UsageError, match="alias"):
        save(tmp_path / "x.mig", {"a": bytearray(4096)}, machine_type="q35")


@pytest.mark.parametrize("name", ["q35-64M-mapped-ram.mig", "pc-64M-legacy.mig"])
def test_convert_to_legacy_and_back(tmp_path, vector, expected_ram, name):
    from mappedram.ops import convert

    src, offset = vector(name)
    legacy = tmp_path / "l.mig"
    r = convert(src, legacy, to="legacy", source_offset=offset)
    assert r.format == "legacy"
    back = tmp_path / "m.mig"
    convert(legacy, back, to="mapped-ram")
    with mappedram.open_file(legacy) as f, mappedram.open_file(back) as g, mappedram.open_file(src, offset) as q:
        assert not f.mapped_ram and g.mapped_ram
        assert f.read_pages("m0", 0, 16384) == expected_ram == g.read_pages("m0", 0, 16384)
        assert f.device_state() == q.device_state() == g.device_state()
        assert f.machine_type == q.machine_type and f.ram_section_id == q.ram_section_id
    assert ops.verify(legacy).ok and ops.diff(src, back, offset_a=offset).identical


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.sets(st.integers(0, 4999), max_size=40), zero=st.sampled_from([0.0, 0.5, 1.0]))
def test_diff_finds_exactly_the_changed_pages(tmp_path, changes, zero):
    base = random_pages(5000, zero, 12)
    other = base.copy().reshape(-1, 4096)
    for page in changes:
        other[page, page % 4096] ^= 0xFF  # one byte flipped (a zero page becomes non-zero)
    a, b = tmp_path / "a.mig", tmp_path / "b.mig"
    save(a, {"pc.ram": base})
    from mappedram.ops import convert

    save(b, {"pc.ram": other.reshape(-1)})
    convert(b, tmp_path / "b-legacy.mig", to="legacy")
    for right in (b, tmp_path / "b-legacy.mig"):
        report = ops.diff(a, right)
        (blk,) = report.blocks
        assert blk.pages_differ == len(changes)
        got = {p for first, n in blk.ranges for p in range(first, first + n)}
        assert got == changes
        assert report.identical == (not changes)

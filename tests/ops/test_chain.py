"""Incremental snapshot chains (format/chain.py, ops/chain.py, image.open_file, vm/child.py).

A child written by ``diff --write-child`` or ``vm save --parent`` reads as the file it was
made from, page for page, through every reader; ``flatten`` gives the whole file back.
Hostile chains (a parent missing, replaced, resized; cycles; a chain too deep; malformed
parent entries; other blocks; no parent entry) are refused before any destination byte is
written: every destination checked here is unchanged (or was never created) afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import mappedram
from mappedram import ops
from mappedram.errors import FormatError, IntegrityError, UsageError
from mappedram.format.chain import MAX_CHAIN
from mappedram.format.constants import CAP_MAPPEDRAM_CHILD
from mappedram.format.encoder import encode_vmdesc
from mappedram.format.vmdesc import PARENT, set_extension
from mappedram.format.vmstate import find_vmdesc
from mappedram.ops import SealOptions
from mappedram.ops.seal import content_digest
from mappedram.vm import ops as vmops
from mappedram.vm.kvm import kvm_available
from mappedram.vm.uffd import userfaultfd_problem
from tests.helpers.patterns import random_pages
from tests.helpers.streams import device_state

PAGE = 4096
PAGES = 512  # pc.ram: 2 MiB
BIOS_PAGES = 16
FILL = 0xAB  # what a destination holds before a reader that must refuse is called
BIOS = random_pages(BIOS_PAGES, 0.0, 9).reshape(-1, PAGE)

KVM_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
GUESTS = [pytest.param("kvm", marks=needs_kvm), "software"]
BATCH = 4096

Pages = npt.NDArray[np.uint8]


# -- helpers -----------------------------------------------------------------------------


def _save(path: Path, ram: Pages, *, bios: Pages = BIOS, seal: SealOptions | None = None) -> Path:
    state, trailer = device_state()
    ops.save(path, [("pc.ram", ram.reshape(-1)), ("pc.bios", bios.reshape(-1))], device_state=state,
             vmdesc=trailer[5:], ram_section_id=1, seal=seal)  # fmt: skip
    return path


def _blocks(path: Path) -> dict[str, bytes]:
    """Every block's RAM as a reader reads it."""
    with mappedram.open_file(path) as mf:
        return {b.idstr: mf.read_pages(b, 0, b.num_pages) for b in mf.blocks}


def _expected(ram: Pages, bios: Pages = BIOS) -> dict[str, bytes]:
    return {"pc.ram": ram.tobytes(), "pc.bios": bios.tobytes()}


@dataclass(frozen=True)
class Pair:
    """A and B: B is A with pages changed, pages made zero and zero pages made non-zero
    in pc.ram; pc.bios is the same in both."""

    a: Path
    b: Path
    ram_a: Pages  # (PAGES, PAGE)
    ram_b: Pages
    rewritten: npt.NDArray[np.int64]  # non-zero in both, other bytes
    became_zero: npt.NDArray[np.int64]
    became_nonzero: npt.NDArray[np.int64]

    @property
    def changed(self) -> npt.NDArray[np.bool_]:
        mask = np.zeros(PAGES, dtype=np.bool_)
        mask[np.concatenate([self.rewritten, self.became_zero, self.became_nonzero])] = True
        return mask


def _pair(directory: Path, seed: int = 1) -> Pair:
    ram_a = random_pages(PAGES, 0.3, seed).reshape(PAGES, PAGE).copy()
    nonzero = np.flatnonzero(ram_a.any(axis=1))
    zero = np.flatnonzero(~ram_a.any(axis=1))
    # the first and last non-zero pages, and runs in between
    rewritten = np.unique(np.concatenate([nonzero[:1], nonzero[-1:], nonzero[10:30], nonzero[100:102]]))
    became_zero = nonzero[40:50]
    became_nonzero = zero[:8]
    ram_b = ram_a.copy()
    ram_b[rewritten, 17] ^= 0x5A
    ram_b[became_zero] = 0
    ram_b[became_nonzero, PAGE - 1] = 0x42  # one byte at the end of the page
    return Pair(_save(directory / "a.mig", ram_a), _save(directory / "b.mig", ram_b), ram_a, ram_b, rewritten,
                became_zero, became_nonzero)  # fmt: skip


def _child(pair: Pair, out: Path, *, seal: SealOptions | None = None) -> ops.DiffReport:
    report = ops.diff(pair.a, pair.b, write_child=out, seal=seal)
    assert report.child is not None and out.exists()
    return report


def _trailer(path: Path) -> tuple[int, dict[str, Any]]:
    """Where the vmdesc trailer starts and its JSON (read without open_file: a hostile
    child does not open)."""
    data = path.read_bytes()
    vd = find_vmdesc(data, 0)
    assert vd is not None, f"{path}: no vmdesc trailer"
    return vd.offset, json.loads(vd.raw)


def _set_parent(path: Path, value: object) -> None:
    """Put ``value`` as the trailer's "mappedram"/"parent" entry (None: remove it)."""
    data = path.read_bytes()
    vd = find_vmdesc(data, 0)
    assert vd is not None
    text = set_extension(vd.raw, PARENT, value)
    with open(path, "r+b") as f:
        f.truncate(vd.offset)
        f.seek(vd.offset)
        f.write(encode_vmdesc(text))


def _stream(path: Path) -> int:
    """A file's bytes before its vmdesc trailer (what a child records of its parent)."""
    vd = find_vmdesc(path.read_bytes(), 0)
    assert vd is not None
    return vd.offset


def _parent_entry(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = _trailer(path)[1]["mappedram"]["parent"]
    return entry


def _flip(path: Path, offset: int, bit: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def _slot(path: Path, block: str, page: int) -> int:
    with mappedram.open_file(path) as mf:
        lay = mf.block(block).layout
        assert lay is not None
        return lay.pages_offset + page * PAGE


def _same_file(p: Path, q: Path) -> bool:
    """Whether two (possibly large, sparse) files hold the same bytes: their sizes, and the
    bytes of every region either stores (a raw export places the BIOS below 4 GiB)."""
    size = p.stat().st_size
    if q.stat().st_size != size:
        return False
    with open(p, "rb") as fp, open(q, "rb") as fq:
        regions: list[tuple[int, int]] = []
        for f in (fp, fq):
            at = 0
            while at < size:
                try:
                    start = os.lseek(f.fileno(), at, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after at
                    break
                end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
                regions.append((start, end))
                at = end
        for start, end in regions:
            if os.pread(fp.fileno(), end - start, start) != os.pread(fq.fileno(), end - start, start):
                return False
    return True


Reader = Callable[[Path, Path], object]


def _readers(other: Path) -> dict[str, Reader]:
    """Every reader of a file that writes a destination, as (source, output) -> report;
    ``other`` is the B a diff compares with."""
    return {
        "restore_files": lambda src, out: ops.restore_files(src, [("pc.ram", os.fspath(out))]),
        "extract": lambda src, out: ops.extract(src, out, block="pc.ram"),
        "extract-all": lambda src, out: ops.extract(src, out, all_blocks=True),
        "export-elf": lambda src, out: ops.export(src, out, format="elf"),
        "export-raw": lambda src, out: ops.export(src, out, format="raw"),
        "flatten": lambda src, out: ops.flatten(src, out),
        "diff-write-child": lambda src, out: ops.diff(src, other, write_child=out),
        "rewrite": lambda src, out: ops.rewrite(src, out),
        "convert-legacy": lambda src, out: ops.convert(src, out, to="legacy"),
        "compress": lambda src, out: ops.compress(src, out),
    }


#: the readers that check a seal (and, first, a chain's digests) before their first byte
SEAL_CHECKING = ("restore_files", "extract", "extract-all", "export-elf", "export-raw")
#: the readers that check a chain's digests before their first byte
CHECKING = (*SEAL_CHECKING, "flatten", "diff-write-child")


def _refused_everywhere(child: Path, other: Path, tmp_path: Path, error: type[Exception], field: str | None,
                        readers: tuple[str, ...] | None = None) -> list[BaseException]:  # fmt: skip
    """Each reader refuses ``child`` with ``error`` (its field ``field``) and has written
    nothing: a fresh output is never created, an existing one and a buffer keep every byte."""
    raised: list[BaseException] = []
    table = _readers(other)
    for name in readers or tuple(table):
        out = tmp_path / f"out-{name}"
        with pytest.raises(error) as err:
            table[name](child, out)
        if field is not None:
            assert getattr(err.value, "field", None) == field, (name, err.value)
        assert not out.exists(), f"{name} created {out} from a chain it refused"
        raised.append(err.value)
    buf = bytearray([FILL]) * (PAGES * PAGE)
    with pytest.raises(error):
        ops.restore(child, {"pc.ram": buf})
    assert buf == bytearray([FILL]) * (PAGES * PAGE), "restore wrote into the buffer before it refused"
    existing = tmp_path / "existing.raw"
    existing.write_bytes(bytes([FILL]) * (PAGES * PAGE))
    with pytest.raises(error):
        ops.restore_files(child, [("pc.ram", os.fspath(existing))])
    assert existing.read_bytes() == bytes([FILL]) * (PAGES * PAGE), "restore_files wrote an existing file"
    return raised


# -- a child made by diff ---------------------------------------------------------------


def test_a_child_holds_exactly_the_changed_pages_and_reads_as_b(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    report = _child(pair, child)
    c = report.child
    assert c is not None
    assert [(d.idstr, d.pages_differ) for d in report.blocks] == [("pc.ram", int(pair.changed.sum())), ("pc.bios", 0)]
    assert c.pages_changed == int(pair.changed.sum()) and c.pages_changed_zero == len(pair.became_zero)
    assert c.mode in ("reflink", "sparse") and c.ram_bytes == (PAGES + BIOS_PAGES) * PAGE
    assert c.file_size == child.stat().st_size and c.parent == os.fspath(pair.a)
    with mappedram.open_file(child) as mf, mappedram.open_file(pair.a) as pa:
        assert CAP_MAPPEDRAM_CHILD in mf.capabilities and mf.mapped_ram
        assert mf.parent is not None and os.path.samefile(mf.parent.path, pair.a)
        assert mf.parent_ref is not None and mf.parent_ref.path == "a.mig"
        assert mf.parent_ref.stream_bytes == _stream(pair.a)
        assert mf.parent_ref.digest.hex() == c.parent_digest == content_digest(pa)[0].hex()
        ram = mf.block("pc.ram")
        assert np.array_equal(ram.own, pair.changed), "the child's bitmap marks other pages than the changed ones"
        assert not mf.block("pc.bios").own.any() and not ram.slots
        # every page of every block, and pages in any order, as B holds them
        assert mf.read_pages("pc.ram", 0, PAGES) == pair.ram_b.tobytes()
        assert mf.read_pages("pc.bios", 0, BIOS_PAGES) == BIOS.tobytes()
        order = np.random.default_rng(3).permutation(PAGES).astype(np.int64)
        buf = bytearray(PAGES * PAGE)
        mf.read_page_list("pc.ram", order, buf)
        assert bytes(buf) == pair.ram_b[order].tobytes()
        for page in pair.became_zero:
            assert mf.read_pages("pc.ram", int(page)) == bytes(PAGE)
    if c.mode == "sparse":  # the child stores the changed pages, not the parent's
        assert c.allocated_bytes < 16 * PAGE + int(pair.changed.sum()) * PAGE < c.file_size // 10
        assert any("FICLONE" in n for n in c.notes)


def test_a_chain_of_three_reads_as_its_newest_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child of a child, in another directory (paths relative to each child's directory,
    whatever the working directory), moved with its chain as one tree."""
    tree = tmp_path / "tree"
    tree.mkdir()
    pair = _pair(tree)
    c1 = tree / "c1.mig"
    _child(pair, c1)
    ram_b2 = pair.ram_b.copy()
    ram_b2[pair.rewritten[:3]] = pair.ram_a[pair.rewritten[:3]]  # changed back to the grandparent's bytes
    ram_b2[pair.became_zero[:2], 5] = 0x77  # zero in c1, non-zero again
    ram_b2[pair.became_nonzero[:2]] = 0  # non-zero in c1, zero again
    fresh = np.flatnonzero(~pair.changed)[200:210]
    ram_b2[fresh, 100] ^= 0x33  # not changed by c1
    b2 = _save(tree / "b2.mig", ram_b2)
    (tree / "sub").mkdir()
    c2 = tree / "sub" / "c2.mig"
    report = ops.diff(c1, b2, write_child=c2)
    assert report.child is not None and report.child.mode == "sparse"  # a child's blocks have no slots to clone
    want = np.zeros(PAGES, dtype=np.bool_)
    want[np.concatenate([pair.rewritten[:3], pair.became_zero[:2], pair.became_nonzero[:2], fresh])] = True
    assert report.child.pages_changed == int(want.sum()) and report.child.pages_changed_zero == 2
    assert _parent_entry(c2)["path"] == "../c1.mig"
    monkeypatch.chdir(tree / "sub")
    assert _blocks(c2) == _expected(ram_b2)
    with mappedram.open_file(c2) as mf:
        assert [os.path.basename(m.path) for m in mf.chain] == ["c2.mig", "c1.mig", "a.mig"]
        assert np.array_equal(mf.block("pc.ram").own, want)
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved"
    os.rename(tree, moved)
    monkeypatch.chdir("/")
    assert _blocks(moved / "sub" / "c2.mig") == _expected(ram_b2)
    dest = bytearray(PAGES * PAGE)
    assert ops.restore(moved / "sub" / "c2.mig", {"pc.ram": dest}).seal is not None  # the chain was checked
    assert bytes(dest) == ram_b2.tobytes()


def test_info_lists_the_chain_and_each_blocks_own_pages(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    _child(pair, c1)
    ram_b2 = pair.ram_b.copy()
    ram_b2[np.flatnonzero(~pair.changed)[:5], 9] ^= 1
    ops.diff(c1, _save(tmp_path / "b2.mig", ram_b2), write_child=c2)
    info = ops.info(c2)
    assert info.chain is not None and info.capabilities == ["mapped-ram", CAP_MAPPEDRAM_CHILD]
    assert [os.path.basename(m.path) for m in info.chain] == ["c2.mig", "c1.mig", "a.mig"]
    assert [m.parent for m in info.chain] == ["c1.mig", "a.mig", None]
    own_a = int(pair.ram_a.any(axis=1).sum()) + BIOS_PAGES
    assert [m.pages_own for m in info.chain] == [5, int(pair.changed.sum()), own_a]
    assert [m.file_size for m in info.chain] == [c2.stat().st_size, c1.stat().st_size, pair.a.stat().st_size]
    assert all(m.format == "mapped-ram" and m.allocated_bytes > 0 for m in info.chain)
    assert [(b.idstr, b.pages_own) for b in info.blocks] == [("pc.ram", 5), ("pc.bios", 0)]
    assert [(b.idstr, b.pages_own) for b in ops.info(c1).blocks] == [("pc.ram", int(pair.changed.sum())),
                                                                     ("pc.bios", 0)]  # fmt: skip
    whole = ops.info(pair.a)
    assert whole.chain is None and all(b.pages_own is None for b in whole.blocks)
    assert info.to_dict()["chain"][0]["pages_own"] == 5


def test_flatten_writes_the_whole_file_b_is(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child, flat = tmp_path / "c.mig", tmp_path / "flat.mig"
    _child(pair, child)
    report = ops.flatten(child, flat)
    assert report.format == "mapped-ram" and report.file_size == flat.stat().st_size
    os.remove(pair.a)  # a whole file: the parent is no longer needed
    with mappedram.open_file(flat) as mf:
        assert CAP_MAPPEDRAM_CHILD not in mf.capabilities and mf.parent is None and mf.parent_ref is None
        assert mf.chain == [mf] and all(b.slots for b in mf.blocks)
        assert mf.vmdesc is not None and PARENT not in mf.vmdesc.data.get("mappedram", {})
    assert _blocks(flat) == _expected(pair.ram_b)
    assert flat.read_bytes() == pair.b.read_bytes(), "flatten of a child of A made from B is not B"
    assert ops.verify(flat).ok and ops.info(flat).chain is None
    with pytest.raises(UsageError, match="not a child"):
        ops.flatten(flat, tmp_path / "again.mig")
    assert not (tmp_path / "again.mig").exists()


def test_every_reader_of_a_child_gives_what_it_gives_of_b(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    for name, call in _readers(pair.b).items():
        if name == "diff-write-child":
            continue
        out_c, out_b = tmp_path / f"{name}.child", tmp_path / f"{name}.b"
        call(child, out_c)
        if name == "flatten":  # B is a whole file already
            shutil.copy(pair.b, out_b)
        else:
            call(pair.b, out_b)
        if out_b.is_dir():
            assert sorted(p.name for p in out_c.iterdir()) == sorted(p.name for p in out_b.iterdir())
            for p in out_b.iterdir():
                assert _same_file(out_c / p.name, p), f"{name}: {p.name} differs"
        elif name == "compress":  # the same RAM (a child's zero pages it changed are marked: compare contents)
            assert _blocks(out_c) == _blocks(out_b) == _expected(pair.ram_b), name
        else:
            assert _same_file(out_c, out_b), f"{name} of the child differs from {name} of B"
    buf_c, buf_b = bytearray(PAGES * PAGE), bytearray(PAGES * PAGE)
    rc = ops.restore(child, {"pc.ram": buf_c, "pc.bios": bytearray(BIOS_PAGES * PAGE)})
    ops.restore(pair.b, {"pc.ram": buf_b})
    assert buf_c == buf_b == bytearray(pair.ram_b.tobytes())
    assert rc.seal is not None and rc.seal.status == "unsealed"  # the chain was checked, there is no seal
    for x, y in ((child, pair.b), (pair.b, child)):
        assert ops.diff(x, y).identical
    assert [d.ranges for d in ops.diff(pair.a, child).blocks] == [d.ranges for d in ops.diff(pair.a, pair.b).blocks]


def test_children_of_legacy_and_compressed_files_and_from_them(tmp_path: Path) -> None:
    """A parent or a B of any format this project reads: legacy (no slots to share) or compressed."""
    pair = _pair(tmp_path)
    ops.convert(pair.a, tmp_path / "a-legacy.mig", to="legacy")
    ops.compress(pair.a, tmp_path / "a-zstd.mig")
    ops.convert(pair.b, tmp_path / "b-legacy.mig", to="legacy")
    ops.compress(pair.b, tmp_path / "b-zstd.mig")
    for a in ("a-legacy.mig", "a-zstd.mig"):
        for b in ("b.mig", "b-legacy.mig", "b-zstd.mig"):
            out = tmp_path / f"c-{a}-{b}"
            report = ops.diff(tmp_path / a, tmp_path / b, write_child=out)
            assert report.child is not None and report.child.mode == "sparse", (a, b)
            assert report.child.pages_changed == int(pair.changed.sum())
            assert _blocks(out) == _expected(pair.ram_b), (a, b)


# -- seals ------------------------------------------------------------------------------


def test_a_sealed_child_verifies_and_its_seal_is_bs(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    report = _child(pair, child, seal=SealOptions())
    assert report.child is not None and report.child.seal is not None
    sealed_b = shutil.copy(pair.b, tmp_path / "b-sealed.mig")
    ops.seal_file(sealed_b)
    with mappedram.open_file(child) as mf, mappedram.open_file(sealed_b) as mb:
        assert mf.seal is not None and mb.seal is not None
        assert ops.verify_seal(mf).ok and ops.check_seal(mf).ok
        # the seal digests the RAM as a reader reads it: through the chain, as B's
        assert [b.digests for b in mf.seal.blocks] == [b.digests for b in mb.seal.blocks]
    v = ops.verify(child, data=True)
    assert v.ok, v.problems
    assert any(c.startswith("chain: every parent's RAM digest matches") for c in v.checks), v.checks
    dest = bytearray(PAGES * PAGE)
    r = ops.restore(child, {"pc.ram": dest})
    assert r.seal is not None and r.seal.ok and r.seal.status == "ok" and bytes(dest) == pair.ram_b.tobytes()
    # a flipped bit in a page the child holds: the child's seal names it
    page = int(pair.rewritten[5])
    _flip(child, _slot(child, "pc.ram", page) + 9)
    with mappedram.open_file(child) as mf:
        assert not ops.verify_seal(mf).ok
    _refused_everywhere(child, pair.b, tmp_path, IntegrityError, "seal chunk", SEAL_CHECKING)


def test_a_child_sealed_in_place(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    before, entry = child.read_bytes(), _parent_entry(child)
    at, _ = _trailer(child)
    report = ops.seal_file(child)
    assert report.chunks > 0
    assert child.read_bytes()[:at] == before[:at], "sealing in place changed more than the trailer"
    assert _parent_entry(child) == entry
    assert ops.verify(child, data=True).ok and _blocks(child) == _expected(pair.ram_b)
    # a page of the parent the child does not hold: the chain's digest finds it first
    page = int(np.flatnonzero(pair.ram_a.any(axis=1) & ~pair.changed)[3])
    _flip(pair.a, _slot(pair.a, "pc.ram", page) + 1)
    errors = _refused_everywhere(child, pair.b, tmp_path, IntegrityError, "vmdesc mappedram.parent.digest", CHECKING)
    assert "changed since" in str(errors[0])


# -- vm save --parent ------------------------------------------------------------------


def _vm_parent(tmp_path: Path, guest: str, name: str = "p.mig", seed: int = 1) -> Path:
    path = tmp_path / name
    vmops.vm_save(path, vmops.GuestConfig(kind=guest, mem_mib=16, batch=BATCH, seed=seed),
                  warmup_iterations=2 * BATCH, step_batches=2,
                  live=vmops.VM_LIVE_DEFAULTS.replace(downtime_limit=1000))  # fmt: skip
    return path


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_child_holds_the_pages_the_guest_wrote(tmp_path: Path, guest: str) -> None:
    parent = _vm_parent(tmp_path, guest)
    child = tmp_path / "c.mig"
    report = vmops.vm_save_child(child, parent, warmup_iterations=BATCH)
    assert report.ok and report.guest == ("kvm" if guest == "kvm" else "soft") and report.mem_mib == 16
    assert report.counter == report.counter_from + BATCH
    assert report.pages_dirty == report.child.pages_changed
    assert 0 < report.pages_dirty < 16 << 8
    with mappedram.open_file(child) as mf:
        ram = mf.block("pc.ram")
        assert CAP_MAPPEDRAM_CHILD in mf.capabilities and mf.parent is not None
        assert int(np.count_nonzero(ram.own)) == report.pages_dirty
        own = ram.own.copy()
    for d in ops.diff(parent, child).blocks:  # every page that differs from the parent is the child's
        for first, n in d.ranges:
            assert own[first : first + n].all(), (d.idstr, first, n)
    assert vmops.vm_restore(child, mode="eager", run_iterations=BATCH).ok
    with pytest.raises(UsageError, match="map mode"):
        vmops.vm_restore(child, mode="map", run_iterations=BATCH)
    flat = tmp_path / "flat.mig"
    ops.flatten(child, flat)
    assert _blocks(flat) == _blocks(child)
    for mode in ("eager", "map"):
        assert vmops.vm_restore(flat, mode=mode, run_iterations=BATCH).ok, mode
    # a child of the child: a chain of three restores too
    grandchild = tmp_path / "c2.mig"
    later = vmops.vm_save_child(grandchild, child, warmup_iterations=BATCH)
    assert later.ok and later.counter_from == report.counter and later.pages_dirty == later.child.pages_changed
    assert vmops.vm_restore(grandchild, mode="eager", run_iterations=BATCH).ok
    assert len(ops.info(grandchild).chain or []) == 3


@needs_kvm
@pytest.mark.skipif(userfaultfd_problem() is not None, reason=f"userfaultfd is not usable: {userfaultfd_problem()}")
def test_vm_child_restores_lazily(tmp_path: Path) -> None:
    parent = _vm_parent(tmp_path, "kvm")
    child = tmp_path / "c.mig"
    assert vmops.vm_save_child(child, parent, warmup_iterations=BATCH).ok
    report = vmops.vm_restore(child, mode="lazy", run_iterations=BATCH)
    assert report.ok and report.restore.mode == "lazy"


def test_vm_restore_of_a_child_whose_parent_was_replaced_is_refused(tmp_path: Path) -> None:
    parent = _vm_parent(tmp_path, "software")
    child = tmp_path / "c.mig"
    assert vmops.vm_save_child(child, parent, warmup_iterations=BATCH).ok
    other = _vm_parent(tmp_path, "software", "other.mig", seed=2)
    assert other.stat().st_size == parent.stat().st_size
    os.replace(other, parent)
    for mode in ("eager", "map"):  # the check comes first in every mode
        with pytest.raises(IntegrityError) as err:
            vmops.vm_restore(child, mode=mode, run_iterations=BATCH)
        assert err.value.field == "vmdesc mappedram.parent.digest"
    assert vmops.vm_restore(child, mode="eager", run=0, seal=ops.NO_CHECK).restore.seal is None


# -- hostile chains ----------------------------------------------------------------------


def test_a_missing_parent_is_named(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    os.remove(pair.a)
    with pytest.raises(FormatError) as err:
        mappedram.open_file(child)
    assert err.value.field == "vmdesc mappedram.parent.path" and "a.mig" in str(err.value)
    assert err.value.path == os.fspath(child) and err.value.offset is not None
    _refused_everywhere(child, pair.b, tmp_path, FormatError, "vmdesc mappedram.parent.path")
    v = ops.verify(child)
    assert not v.ok and v.problems[0].field == "vmdesc mappedram.parent.path"


def test_a_missing_grandparent_is_named_by_its_child(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    _child(pair, c1)
    ops.diff(c1, pair.b, write_child=c2)
    os.remove(pair.a)
    with pytest.raises(FormatError) as err:
        mappedram.open_file(c2)
    assert err.value.path is not None and os.path.samefile(err.value.path, c1)  # the file that names it
    assert err.value.field == "vmdesc mappedram.parent.path" and "a.mig" in str(err.value)


def test_a_parent_replaced_by_another_file_of_its_size_is_refused(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    other_ram = random_pages(PAGES, 0.3, 77).reshape(PAGES, PAGE)
    other = _save(tmp_path / "other.mig", other_ram)
    assert other.stat().st_size == pair.a.stat().st_size
    os.replace(other, pair.a)
    with mappedram.open_file(child) as mf:  # the structure is sound: only the digest tells
        assert mf.parent is not None
    errors = _refused_everywhere(child, pair.b, tmp_path, IntegrityError, "vmdesc mappedram.parent.digest", CHECKING)
    assert "a.mig" in str(errors[0]) and "changed since" in str(errors[0])
    v = ops.verify(child, data=True)
    assert not v.ok and v.problems[0].field == "vmdesc mappedram.parent.digest"
    assert ops.verify(child).ok  # the structure alone is right
    # --no-verify-seal reads it anyway: the child's pages over the new parent's
    dest = bytearray(PAGES * PAGE)
    report = ops.restore(child, {"pc.ram": dest}, seal=ops.NO_CHECK)
    assert report.seal is None
    want = other_ram.copy()
    want[pair.changed] = pair.ram_b[pair.changed]
    assert bytes(dest) == want.tobytes()


@pytest.mark.parametrize("reader", ["rewrite", "convert-legacy", "compress"])
def test_rewrite_convert_and_compress_check_a_childs_parents_first(tmp_path: Path, reader: str) -> None:
    """They read a chain as one file and write a whole one: from a parent that changed they
    would bake the wrong pages into a file nothing can check any more."""
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    _save(tmp_path / "other.mig", random_pages(PAGES, 0.3, 77).reshape(PAGES, PAGE))
    os.replace(tmp_path / "other.mig", pair.a)
    out = tmp_path / "out.mig"
    with pytest.raises(IntegrityError) as err:
        _readers(pair.b)[reader](child, out)
    assert err.value.field == "vmdesc mappedram.parent.digest"
    assert not out.exists()


def test_a_parent_of_another_stream_size_is_refused(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    size = _stream(pair.a)
    _set_parent(child, {**_parent_entry(child), "stream_bytes": size + PAGE})
    with pytest.raises(FormatError) as err:
        mappedram.open_file(child)
    assert err.value.field == "vmdesc mappedram.parent.stream_bytes"
    assert err.value.expected == size + PAGE and err.value.actual == size
    _refused_everywhere(child, pair.b, tmp_path, FormatError, "vmdesc mappedram.parent.stream_bytes")


def test_a_truncated_parent_is_refused(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    with open(pair.a, "r+b") as f:
        f.truncate(pair.a.stat().st_size - PAGE)
    with pytest.raises(FormatError, match="truncated") as err:
        mappedram.open_file(child)
    assert err.value.fields.get("path") == os.fspath(pair.a) or os.fspath(pair.a) in str(err.value)
    _refused_everywhere(child, pair.b, tmp_path, FormatError, None)


def test_sealing_the_parent_in_place_keeps_its_children(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    ops.seal_file(pair.a)
    assert _blocks(child) == _blocks(pair.b)
    ops.seal.check_chain(mappedram.open_file(child))


@pytest.mark.parametrize("how", ["itself", "hard-link", "symlink", "absolute"])
def test_a_child_naming_itself_is_a_cycle(tmp_path: Path, how: str) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    name = {"itself": "c.mig", "hard-link": "link.mig", "symlink": "sym.mig", "absolute": os.fspath(child)}[how]
    _set_parent(child, {**_parent_entry(child), "path": name, "stream_bytes": _stream(child)})
    if how == "hard-link":
        os.link(child, tmp_path / "link.mig")
    elif how == "symlink":
        os.symlink("c.mig", tmp_path / "sym.mig")
    with pytest.raises(FormatError, match="cycle") as err:
        mappedram.open_file(child)
    assert err.value.field == "vmdesc mappedram.parent.path"
    _refused_everywhere(child, pair.b, tmp_path, FormatError, "vmdesc mappedram.parent.path")


def test_two_children_naming_each_other_are_a_cycle(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    _child(pair, c1)
    _child(pair, c2)
    # each names the other by its size as it is once both are edited: the cycle alone is wrong
    for _ in range(3):
        _set_parent(c2, {**_parent_entry(c2), "path": "c1.mig", "stream_bytes": _stream(c1)})
        _set_parent(c1, {**_parent_entry(c1), "path": "c2.mig", "stream_bytes": _stream(c2)})
    assert _parent_entry(c2)["stream_bytes"] == _stream(c1) and _parent_entry(c1)["stream_bytes"] == _stream(c2)
    for path in (c1, c2):
        with pytest.raises(FormatError, match="cycle") as err:
            mappedram.open_file(path)
        assert err.value.field == "vmdesc mappedram.parent.path"
    _refused_everywhere(c1, pair.b, tmp_path, FormatError, None)


def test_a_child_naming_its_own_child_is_a_cycle(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    _child(pair, c1)
    ops.diff(c1, pair.b, write_child=c2)
    entry = _parent_entry(c1)
    # c1 names c2, c2 records c1's new size, c1 records c2's: both sizes are right, the cycle alone is wrong
    _set_parent(c1, {**entry, "path": "c2.mig", "stream_bytes": _stream(c2)})
    _set_parent(c2, {**_parent_entry(c2), "stream_bytes": _stream(c1)})
    _set_parent(c1, {**entry, "path": "c2.mig", "stream_bytes": _stream(c2)})
    assert _parent_entry(c2)["stream_bytes"] == _stream(c1) and _parent_entry(c1)["stream_bytes"] == _stream(c2)
    for path in (c1, c2):
        with pytest.raises(FormatError, match="cycle"):
            mappedram.open_file(path)


def _deep_chain(tmp_path: Path, children: int) -> tuple[Path, bytes]:
    """A chain of ``children`` honest children of a tiny base, the newest last: the first made
    by diff, the others copies of it naming the one before (the same RAM, so the same digest)."""
    base_ram = np.zeros((4, PAGE), dtype=np.uint8)
    base_ram[0, 5] = 1
    top = base_ram.copy()
    top[1, 9] = 7
    ops.save(tmp_path / "base.mig", {"pc.ram": base_ram.reshape(-1)})
    ops.save(tmp_path / "top.mig", {"pc.ram": top.reshape(-1)})
    first = tmp_path / "c01.mig"
    ops.diff(tmp_path / "base.mig", tmp_path / "top.mig", write_child=first)
    with mappedram.open_file(first) as mf:
        digest = content_digest(mf)[0].hex()
    prev = first
    for k in range(2, children + 1):
        path = tmp_path / f"c{k:02d}.mig"
        shutil.copy(first, path)
        _set_parent(path, {"path": prev.name, "stream_bytes": _stream(prev), "digest": digest})
        prev = path
    return prev, top.tobytes()


def test_a_chain_of_64_children_reads_and_65_are_refused(tmp_path: Path) -> None:
    assert MAX_CHAIN == 64
    newest, top = _deep_chain(tmp_path, MAX_CHAIN + 1)
    deepest_ok = tmp_path / f"c{MAX_CHAIN:02d}.mig"
    with mappedram.open_file(deepest_ok) as mf:
        assert len(mf.chain) == MAX_CHAIN + 1 and mf.read_pages("pc.ram", 0, 4) == top
    dest = bytearray(4 * PAGE)
    assert ops.restore(deepest_ok, {"pc.ram": dest}).seal is not None and bytes(dest) == top  # digests checked
    with pytest.raises(FormatError, match=f"more than {MAX_CHAIN} files deep") as err:
        mappedram.open_file(newest)
    assert err.value.field == "vmdesc mappedram.parent"
    out = tmp_path / "out.raw"
    with pytest.raises(FormatError):
        ops.restore_files(newest, [("pc.ram", os.fspath(out))])
    assert not out.exists()


def test_a_child_is_not_written_where_no_reader_could_open_it(tmp_path: Path) -> None:
    """A child of a chain MAX_CHAIN children deep would be refused by every reader: writing it is refused."""
    newest, top = _deep_chain(tmp_path, MAX_CHAIN)
    more = np.frombuffer(top, dtype=np.uint8).reshape(4, PAGE).copy()
    more[3, 0] = 9
    ops.save(tmp_path / "more.mig", {"pc.ram": more.reshape(-1)})
    out = tmp_path / "too-deep.mig"
    try:
        ops.diff(newest, tmp_path / "more.mig", write_child=out)
    except (UsageError, FormatError):
        assert not out.exists()
        return
    try:  # written: then it must be readable
        mf = mappedram.open_file(out)
    except FormatError as exc:
        pytest.fail(f"write_child wrote {out.name}, a child of a chain {MAX_CHAIN} children deep, which no reader "
                    f"opens: {exc}")  # fmt: skip
    with mf:
        assert mf.read_pages("pc.ram", 0, 4) == more.tobytes()


GOOD_DIGEST = "ab" * 32
#: (parent entry, the field named): each field of a wrong type or value, and entries that are not one
MALFORMED: list[tuple[str, object, str]] = [
    ("string", "a.mig", ""),
    ("list", ["a.mig", 1, GOOD_DIGEST], ""),
    ("extra-key", {"path": "a.mig", "stream_bytes": 1, "digest": GOOD_DIGEST, "more": 1}, ""),
    ("missing-key", {"path": "a.mig", "digest": GOOD_DIGEST}, ""),
    ("path-int", {"path": 7, "stream_bytes": 1, "digest": GOOD_DIGEST}, ".path"),
    ("path-empty", {"path": "", "stream_bytes": 1, "digest": GOOD_DIGEST}, ".path"),
    ("path-nul", {"path": "a\x00.mig", "stream_bytes": 1, "digest": GOOD_DIGEST}, ".path"),
    ("path-long", {"path": "a" * 4097, "stream_bytes": 1, "digest": GOOD_DIGEST}, ".path"),
    ("size-string", {"path": "a.mig", "stream_bytes": "1", "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("size-bool", {"path": "a.mig", "stream_bytes": True, "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("size-float", {"path": "a.mig", "stream_bytes": 1.5, "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("size-zero", {"path": "a.mig", "stream_bytes": 0, "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("size-negative", {"path": "a.mig", "stream_bytes": -4096, "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("size-huge", {"path": "a.mig", "stream_bytes": 1 << 62, "digest": GOOD_DIGEST}, ".stream_bytes"),
    ("digest-int", {"path": "a.mig", "stream_bytes": 1, "digest": 5}, ".digest"),
    ("digest-short", {"path": "a.mig", "stream_bytes": 1, "digest": "ab" * 31}, ".digest"),
    ("digest-long", {"path": "a.mig", "stream_bytes": 1, "digest": "ab" * 33}, ".digest"),
    ("digest-upper", {"path": "a.mig", "stream_bytes": 1, "digest": "AB" * 32}, ".digest"),
    ("digest-not-hex", {"path": "a.mig", "stream_bytes": 1, "digest": "zz" * 32}, ".digest"),
]


@pytest.mark.parametrize(("entry", "field"), [pytest.param(e, f, id=i) for i, e, f in MALFORMED])
def test_a_malformed_parent_entry_names_its_field(tmp_path: Path, entry: object, field: str) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    _set_parent(child, entry)
    at, _ = _trailer(child)
    want = "vmdesc mappedram.parent" + field  # the whole entry: the key itself, no trailing dot
    with pytest.raises(FormatError) as err:
        mappedram.open_file(child)
    assert err.value.field == want, err.value
    assert err.value.offset is not None and at < err.value.offset < child.stat().st_size
    assert err.value.path == os.fspath(child)
    v = ops.verify(child)
    assert not v.ok and v.problems[0].field == want
    buf = bytearray([FILL]) * (PAGES * PAGE)
    with pytest.raises(FormatError):
        ops.restore(child, {"pc.ram": buf})
    assert buf == bytearray([FILL]) * (PAGES * PAGE)


def test_a_parent_with_other_blocks_is_refused(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    cases = {
        "fewer": [("pc.ram", pair.ram_a.reshape(-1))],
        "larger": [("pc.ram", np.concatenate([pair.ram_a.reshape(-1), np.ones(PAGE, np.uint8)])),
                   ("pc.bios", BIOS.reshape(-1))],
        "renamed": [("pc.ram", pair.ram_a.reshape(-1)), ("pc.rom", BIOS.reshape(-1))],
        "reordered": [("pc.bios", BIOS.reshape(-1)), ("pc.ram", pair.ram_a.reshape(-1))],
    }  # fmt: skip
    entry = _parent_entry(child)
    for name, blocks in cases.items():
        other = tmp_path / f"{name}.mig"
        ops.save(other, blocks)
        _set_parent(child, {**entry, "path": other.name, "stream_bytes": _stream(other)})
        with pytest.raises(FormatError, match="other RAM blocks") as err:
            mappedram.open_file(child)
        assert err.value.field == "RAM blocks", name
    _refused_everywhere(child, pair.b, tmp_path, FormatError, "RAM blocks")


def test_a_child_without_a_parent_entry_is_refused(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    _set_parent(child, None)
    _, trailer = _trailer(child)
    assert "parent" not in trailer.get("mappedram", {})
    with pytest.raises(FormatError, match="names no parent") as err:
        mappedram.open_file(child)
    assert err.value.field == "vmdesc mappedram.parent" and err.value.path == os.fspath(child)
    _refused_everywhere(child, pair.b, tmp_path, FormatError, "vmdesc mappedram.parent")


@pytest.mark.parametrize("reader", [r for r in _readers(Path("b.mig")) if r != "extract-all"])  # a directory
def test_no_reader_writes_over_a_file_of_the_chain_it_reads(tmp_path: Path, reader: str) -> None:
    """The output is the child's parent: writing it would destroy the pages being read
    (every reader refuses an output that is its input; a chain's parents are its input too)."""
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    before = pair.a.read_bytes()
    with pytest.raises(UsageError):
        _readers(pair.b)[reader](child, pair.a)
    assert pair.a.read_bytes() == before, f"{reader} wrote over the parent of the chain it read"
    assert _blocks(child) == _expected(pair.ram_b)


def test_write_child_refuses_its_parent_as_output(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    before = pair.a.read_bytes()
    with pytest.raises(UsageError, match="itself"):
        ops.diff(pair.a, pair.b, write_child=pair.a)
    assert pair.a.read_bytes() == before


def test_write_child_refuses_other_blocks(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    other = tmp_path / "other.mig"
    ops.save(other, [("pc.ram", pair.ram_b.reshape(-1))])
    out = tmp_path / "c.mig"
    with pytest.raises(UsageError, match="other RAM blocks"):
        ops.diff(pair.a, other, write_child=out)
    assert not out.exists()


# -- what a read-through review found --------------------------------------------------


def test_a_parent_replaced_after_the_child_was_opened_is_not_read(tmp_path: Path) -> None:
    """Stores open the chain's files by path: each must still be the file that was checked."""
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    other = tmp_path / "other.mig"
    shutil.copy(pair.a, other)
    _flip(other, _slot(other, "pc.ram", int(np.flatnonzero(pair.ram_a.any(axis=1) & ~pair.changed)[0])) + 3)
    with mappedram.open_file(child) as mf:
        ops.seal.check_chain(mf)
        os.replace(other, pair.a)
        with pytest.raises(mappedram.IOEngineError, match="replaced since it was opened"):
            mf.read_pages("pc.ram", 0, PAGES)


def test_diff_does_not_write_a_child_over_a_file_of_bs_chain(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1 = tmp_path / "c1.mig"
    _child(pair, c1)  # c1's parent is A
    before = pair.a.read_bytes()
    with pytest.raises(UsageError, match="cannot write into the file it reads"):
        ops.diff(pair.b, c1, write_child=pair.a)
    assert pair.a.read_bytes() == before


def test_check_chain_names_the_oldest_file_that_changed(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    _child(pair, c1)
    ops.diff(c1, pair.b, write_child=c2)
    _flip(pair.a, _slot(pair.a, "pc.ram", int(np.flatnonzero(pair.ram_a.any(axis=1) & ~pair.changed)[0])) + 1)
    with mappedram.open_file(c2) as mf, pytest.raises(IntegrityError) as err:
        ops.seal.check_chain(mf)
    assert f"the parent {os.path.join('.', 'a.mig')} changed" in str(err.value) or "a.mig changed" in str(err.value)
    assert "c1.mig changed" not in str(err.value)


def test_a_closed_chain_is_not_read(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    child = tmp_path / "c.mig"
    _child(pair, child)
    mf = mappedram.open_file(child)
    mf.read_pages("pc.ram", 0, 1)
    mf.close()
    with pytest.raises(mappedram.IOEngineError, match="closed"):
        mf.read_pages("pc.ram", 0, 1)

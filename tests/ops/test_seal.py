"""Sealed files (ops/seal.py), on real files: every digest checked, each kind of corruption
found and named (a data page, a stale slot made visible by its bitmap bit, the device
state, the configuration), keys that pass and fail, key files refused, readers that write
nothing from a file that fails its seal, legacy files, and sealing in place."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest

import mappedram
from mappedram import ops
from mappedram.engine.faults import inject
from mappedram.errors import FormatError, IntegrityError, IOEngineError, UsageError
from mappedram.format.encoder import encode_vmdesc
from mappedram.format.seal import KEY_CONTEXT, SealKey
from mappedram.ops import EngineOptions, SealOptions
from mappedram.vm import ops as vmops
from tests.helpers.patterns import random_pages
from tests.helpers.streams import device_state

PAGE = 4096
PAGES = 1024  # 4 MiB: four chunks
BIOS = random_pages(16, 0.0, 9).tobytes()


def _ram(seed: int = 1) -> np.ndarray:
    return random_pages(PAGES, 0.5, seed)


def _key(tmp_path: Path, material: bytes = b"k" * 32, name: str = "seal.key", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_bytes(material)
    os.chmod(path, mode)
    return path


def _save(tmp_path: Path, *, key: Path | None = None, name: str = "a.mig", seal: bool = True,
          ram: np.ndarray | None = None) -> Path:  # fmt: skip
    out = tmp_path / name
    state, trailer = device_state()
    options = SealOptions(key=None if key is None else ops.load_key(key)) if seal else None
    ops.save(out, [("pc.ram", _ram() if ram is None else ram), ("pc.bios", BIOS)], device_state=state,
             vmdesc=trailer[5:], ram_section_id=1, seal=options)  # fmt: skip
    return out


def _flip(path: Path, offset: int, bit: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def _stored_page(path: Path, index: int = 300) -> tuple[int, int]:
    """(page number, file offset) of the ``index``-th stored page of pc.ram."""
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.bitmap is not None and b.layout is not None
        page = int(np.flatnonzero(b.bitmap)[index])
        return page, b.layout.pages_offset + page * PAGE


def test_save_with_seal_verifies_and_info_says_so(tmp_path: Path) -> None:
    path = _save(tmp_path)
    with mappedram.open_file(path) as mf:
        assert mf.seal is not None and mf.seal.algorithm == "blake3" and not mf.seal.keyed
        assert [b.chunks for b in mf.seal.blocks] == [4, 1] and mf.seal.chunk_bytes == 1 << 20
        data = mf.vmdesc.data if mf.vmdesc else {}
    assert data["mappedram"]["clean-zero-slots"] is True and list(data["mappedram"]) == ["clean-zero-slots", "seal"]
    report = ops.verify(path, data=True)
    assert report.ok and report.seal is not None and report.seal.status == "ok", report
    assert report.seal.chunks == 5 and report.seal.chunks_read == 5
    assert ops.info(path).seal == ops.SealInfo(1, "blake3", False, 1 << 20, 5, 2)
    structure = ops.verify(path)
    assert structure.ok and structure.seal is not None and structure.seal.status == "structure"
    assert any("one digest per 1024 KiB chunk" in c for c in structure.checks)


def test_a_flipped_bit_in_a_data_page_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path)
    page, at = _stored_page(path)
    _flip(path, at + 123)
    report = ops.verify(path, data=True)
    assert not report.ok and report.seal is not None and report.seal.status == "mismatch"
    (m,) = report.seal.mismatches
    assert m.block == "pc.ram" and m.first_page is not None and m.pages == 256
    assert m.first_page <= page < m.first_page + m.pages
    assert m.file_offset is not None and m.file_end is not None and m.file_offset <= at + 123 < m.file_end
    assert m.first_chunk == page // 256 and m.chunks == 1
    assert report.problems[0].block == "pc.ram" and report.problems[0].offset == m.file_offset
    assert report.error_text is not None and "1 of 5 chunks differ from the seal" in report.error_text
    assert "pc.ram" in report.problems[0].message and f"pages {m.first_page}.." in report.problems[0].message
    with mappedram.open_file(path) as mf, pytest.raises(IntegrityError) as err:
        ops.check_seal(mf)
    assert err.value.block == "pc.ram" and err.value.offset == m.file_offset
    assert err.value.mismatches[0]["first_page"] == m.first_page and "--no-verify-seal" in str(err.value)


def test_a_stale_slot_made_visible_by_its_bitmap_bit_is_found(tmp_path: Path) -> None:
    """A 0-bit page reads as zeros whatever its slot holds (digested as zeros), until its bit is set."""
    path = _save(tmp_path, seal=False)
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.bitmap is not None and b.layout is not None
        page = int(np.flatnonzero(~b.bitmap)[200])
        slot = b.layout.pages_offset + page * PAGE
        bit_byte = b.layout.bitmap_offset + page // 8
    with open(path, "r+b") as f:  # stale bytes, as QEMU leaves in the slot of a page that became zero
        f.seek(slot)
        f.write(b"\xee" * PAGE)
    ops.seal_file(path)
    assert ops.verify(path, data=True).ok
    _flip(path, bit_byte, 1 << (page % 8))
    report = ops.verify(path, data=True)
    assert report.seal is not None and not report.ok
    (m,) = report.seal.mismatches
    assert m.block == "pc.ram" and m.first_page is not None and m.first_page <= page < m.first_page + 256
    assert m.bitmap_offset is not None and m.bitmap_end is not None and m.bitmap_offset <= bit_byte < m.bitmap_end
    assert m.file_offset is not None and m.file_end is not None and m.file_offset <= slot < m.file_end


@pytest.mark.parametrize("where", ["device-state", "configuration"])
def test_non_ram_state_is_sealed(tmp_path: Path, where: str) -> None:
    path = _save(tmp_path)
    with mappedram.open_file(path) as mf:
        if where == "device-state":
            at = mf.device_state_offset + mf.device_state_length - 2 - 8  # a byte of the timer's data field
        else:
            at = mf.configuration.offset + 1 + 4 + len("pc-q35-10.") # the machine type's last digit
    _flip(path, at)
    with mappedram.open_file(path) as mf:
        if where == "configuration":
            assert mf.machine_type == "pc-q35-10.1"
    report = ops.verify(path, data=True)
    assert not report.ok and report.seal is not None
    assert [m.kind for m in report.seal.mismatches] == ["state"]
    assert "configuration section" in report.seal.mismatches[0].message
    with mappedram.open_file(path) as mf, pytest.raises(IntegrityError, match="non-RAM state"):
        ops.check_seal(mf)


def test_keyed_seal_right_wrong_and_no_key(tmp_path: Path) -> None:
    right = _key(tmp_path, os.urandom(32))
    wrong = _key(tmp_path, os.urandom(32), "wrong.key")
    path = _save(tmp_path, key=right)
    with mappedram.open_file(path) as mf:
        assert mf.seal is not None and mf.seal.keyed
    good = ops.verify(path, data=True, seal=SealOptions(key=ops.load_key(right)))
    assert good.ok and good.seal is not None and good.seal.keyed
    bad = ops.verify(path, data=True, seal=SealOptions(key=ops.load_key(wrong)))
    assert not bad.ok and bad.seal is not None and bad.seal.status == "mismatch"
    assert sum(m.chunks or 0 for m in bad.seal.mismatches) == 5 and bad.seal.mismatches[-1].kind == "state"
    assert "every chunk" in bad.seal.message
    none = ops.verify(path, data=True)
    assert not none.ok and none.seal is not None and none.seal.status == "no-key"
    assert "cannot be checked" in none.seal.message and none.error_text is not None
    assert ops.verify(path).ok  # the structure alone
    with mappedram.open_file(path) as mf:
        with pytest.raises(UsageError, match="cannot be checked without it"):
            ops.check_seal(mf)
        with pytest.raises(IntegrityError):
            ops.check_seal(mf, key=ops.load_key(wrong))
        assert ops.check_seal(mf, key=ops.load_key(right)).ok


def test_a_key_refuses_unsealed_and_unkeyed_files(tmp_path: Path) -> None:
    """An attacker can strip a keyed seal or recompute an unkeyed one: with a key, neither passes."""
    key = ops.load_key(_key(tmp_path))
    unkeyed, unsealed = _save(tmp_path, name="u.mig"), _save(tmp_path, name="n.mig", seal=False)
    for path, status in ((unkeyed, "unkeyed"), (unsealed, "unsealed")):
        report = ops.verify(path, data=True, seal=SealOptions(key=key))
        assert not report.ok and report.seal is not None and report.seal.status == status
        with mappedram.open_file(path) as mf, pytest.raises(IntegrityError):
            ops.check_seal(mf, key=key)
        with pytest.raises(IntegrityError):
            ops.restore_files(path, [("pc.ram", os.fspath(tmp_path / "r.raw"))], seal=SealOptions(key=key))
    with mappedram.open_file(unsealed) as mf:
        assert ops.check_seal(mf).status == "unsealed"  # no key: nothing to check, nothing refused
    assert not ops.verify(unsealed, data=True).ok


@pytest.mark.parametrize(("mode", "what"), [(0o644, "0644"), (0o640, "0640"), (0o602, "0602"), (0o620, "0620")])
def test_key_files_others_may_read_or_write_are_refused(tmp_path: Path, mode: int, what: str) -> None:
    path = _key(tmp_path, mode=mode)
    with pytest.raises(UsageError) as err:
        ops.load_key(path)
    assert str(path) in str(err.value) and f"mode {what}" in str(err.value) and "0600" in str(err.value)


def test_key_files_that_are_links_dirs_short_or_others_are_refused(tmp_path: Path) -> None:
    real = _key(tmp_path)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        ops.load_key(link)
    with pytest.raises(UsageError, match="not a regular file"):
        ops.load_key(tmp_path)
    with pytest.raises(UsageError, match="16 to 65536 bytes") as err:
        ops.load_key(_key(tmp_path, b"short", "short.key"))
    assert "short.key" in str(err.value) and "mode 0600" in str(err.value)
    with pytest.raises(UsageError, match="cannot be read"):
        ops.load_key(tmp_path / "missing.key")
    assert ops.load_key(_key(tmp_path, b"x" * 16, "ro.key", 0o400)) is not None
    if os.geteuid() == 0:
        theirs = _key(tmp_path, name="theirs.key")
        os.chown(theirs, 65534, -1)
        with pytest.raises(UsageError, match="belongs to uid 65534"):
            ops.load_key(theirs)


def _outputs_hold_key(texts: list[str], material: bytes) -> list[str]:
    derived = [blake3.blake3(material, derive_key_context=KEY_CONTEXT).digest(),
               hashlib.sha256(KEY_CONTEXT.encode() + b"\x00" + material).digest()]  # fmt: skip
    needles = [material.hex(), material.decode("latin-1"), repr(material)[2:-1], *(d.hex() for d in derived)]
    assert SealKey(material)  # the material is a valid key
    return [t[:80] for t in texts for n in needles if n and n in t]


def test_the_key_never_appears_in_reports_json_logs_or_errors(tmp_path: Path) -> None:
    material = bytes(range(0x41, 0x41 + 32))  # printable: it would show if printed
    key, wrong = _key(tmp_path, material), _key(tmp_path, os.urandom(32), "wrong.key")
    raw = tmp_path / "ram.raw"
    raw.write_bytes(_ram().tobytes())
    out = tmp_path / "k.mig"

    def run(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=120)
        return [proc.stdout, proc.stderr]

    texts: list[str] = []
    texts += run("save", "--block", f"pc.ram={raw}", "-o", str(out), "--key", str(key), "--output", "json")
    texts += run("save", "--block", f"pc.ram={raw}", "-o", str(out), "--key", str(key))
    texts += run("seal", str(out), "--key", str(key), "--output", "json")
    texts += run("info", str(out), "--output", "json")
    for k in (key, wrong):
        texts += run("verify", str(out), "--data", "--key", str(k), "--output", "json")
        texts += run("verify", str(out), "--data", "--key", str(k))
        texts += run("restore", str(out), "--block", f"pc.ram={tmp_path / 'r.raw'}", "--key", str(k), "--output",
                     "json")  # fmt: skip
        texts += run("extract", str(out), "--block", "pc.ram", "-o", str(tmp_path / "e.raw"), "--key", str(k))
    texts += run("verify", str(out), "--data", "--output", "json")
    _flip(out, _stored_page(out)[1])
    texts += run("verify", str(out), "--data", "--key", str(key), "--output", "json")
    texts += run("restore", str(out), "--block", f"pc.ram={tmp_path / 'r2.raw'}", "--key", str(key))
    os.chmod(key, 0o644)
    texts += run("verify", str(out), "--data", "--key", str(key))
    os.chmod(key, 0o600)
    seal = SealOptions(key=ops.load_key(key))
    texts += [repr(seal), str(seal), repr(ops.load_key(key))]
    for call in (lambda: ops.restore_files(out, [("pc.ram", os.fspath(tmp_path / "r3.raw"))], seal=seal),
                 lambda: ops.check_seal(mappedram.open_file(out), key=seal.key)):  # fmt: skip
        with pytest.raises(IntegrityError) as err:
            call()
        texts += [str(err.value), repr(err.value), json.dumps(err.value.to_dict(), default=str)]
    assert any("differ from the seal" in t for t in texts) and any("mode 0644" in t for t in texts)
    assert not _outputs_hold_key(texts, material)


READERS = {
    "restore": lambda src, out, seal: ops.restore_files(src, [("pc.ram", os.fspath(out))], seal=seal),
    "extract": lambda src, out, seal: ops.extract(src, out, block="pc.ram", seal=seal),
    "extract-all": lambda src, out, seal: ops.extract(src, out, all_blocks=True, seal=seal),
    "export-elf": lambda src, out, seal: ops.export(src, out, format="elf", seal=seal),
    "export-raw": lambda src, out, seal: ops.export(src, out, format="raw", seal=seal),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_readers_refuse_a_corrupted_sealed_file_and_write_nothing(tmp_path: Path, reader: str) -> None:
    path = _save(tmp_path)
    _flip(path, _stored_page(path)[1] + 7)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="differ from the seal") as err:
        READERS[reader](path, out, ops.SEAL_CHECK)
    assert err.value.block == "pc.ram"
    assert not out.exists(), f"{reader} wrote {out} from a file that fails its seal"
    report = READERS[reader](path, out, ops.NO_CHECK)  # --no-verify-seal: read anyway
    assert report.seal is None and out.exists()


def test_restore_of_a_sealed_file_reports_the_check_and_no_verify_restores_the_corruption(tmp_path: Path) -> None:
    ram = _ram()
    path = _save(tmp_path, ram=ram)
    report = ops.restore_files(path, [("pc.ram", os.fspath(tmp_path / "ok.raw"))])
    assert report.seal is not None and report.seal.ok and report.seal.chunks == 5
    assert (tmp_path / "ok.raw").read_bytes() == ram.tobytes()
    page, at = _stored_page(path)
    _flip(path, at)
    with pytest.raises(IntegrityError):
        ops.restore(path, {"pc.ram": bytearray(PAGES * PAGE)})
    dest = bytearray(PAGES * PAGE)
    ops.restore(path, {"pc.ram": dest}, seal=ops.NO_CHECK)
    expected = bytearray(ram.tobytes())
    expected[page * PAGE] ^= 1
    assert dest == expected


def test_a_legacy_file_is_sealed_and_verified_with_the_same_chunk_digests(tmp_path: Path) -> None:
    mapped = _save(tmp_path)
    legacy = tmp_path / "legacy.mig"
    report = ops.convert(mapped, legacy, to="legacy", seal=SealOptions())
    assert report.seal is not None and report.seal.path == os.fspath(legacy) and report.file_size == legacy.stat().st_size
    with mappedram.open_file(mapped) as a, mappedram.open_file(legacy) as b:
        assert b.format_name == "legacy" and a.seal is not None and b.seal is not None
        # the chunks are the RAM as a restore reads it: the same in both formats
        assert [x.digests for x in a.seal.blocks] == [x.digests for x in b.seal.blocks]
        assert a.seal.state != b.seal.state  # the configuration names the format
        blk = b.block("pc.ram")
        page = int(np.flatnonzero(blk.present)[100])
        at = int(blk.sources(page, 1)[0])
    assert ops.verify(legacy, data=True).ok
    _flip(legacy, at + 5)
    bad = ops.verify(legacy, data=True)
    assert bad.seal is not None and not bad.ok
    (m,) = bad.seal.mismatches
    assert m.block == "pc.ram" and m.first_page is not None and m.first_page <= page < m.first_page + 256
    assert m.file_offset is not None and m.file_end is not None and m.file_offset <= at + 5 < m.file_end
    assert m.bitmap_offset is None


def test_seal_in_place_replaces_a_seal_and_only_the_trailer(tmp_path: Path) -> None:
    plain = _save(tmp_path, seal=False)
    before = plain.read_bytes()
    with mappedram.open_file(plain) as mf:
        assert mf.vmdesc is not None
        at = mf.vmdesc.offset
    first = ops.seal_file(plain, seal=SealOptions(algorithm="sha256"))
    assert not first.replaced and first.trailer_offset == at and first.algorithm == "sha256"
    after = plain.read_bytes()
    assert after[:at] == before[:at] and len(after) == first.file_size
    assert ops.verify(plain, data=True).ok
    second = ops.seal_file(plain)
    assert second.replaced and second.algorithm == "blake3" and plain.read_bytes()[:at] == before[:at]
    with mappedram.open_file(plain) as mf:
        assert mf.seal is not None and mf.seal.algorithm == "blake3" and mf.vmdesc is not None
        assert mf.vmdesc.raw.count(b'"seal"') == 1
    # sealed in place, or sealed by the writer: the same seal
    with mappedram.open_file(plain) as a, mappedram.open_file(_save(tmp_path, name="b.mig")) as b:
        assert a.seal == b.seal
    assert os.stat(plain).st_mode & 0o777 == 0o600


def test_seal_in_place_refuses_links_and_files_without_a_trailer(tmp_path: Path) -> None:
    real = _save(tmp_path, seal=False)
    link = tmp_path / "link.mig"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        ops.seal_file(link)
    cut = tmp_path / "cut.mig"  # no trailer: not a file to seal (nor to read)
    cut.write_bytes(real.read_bytes()[:-10])
    with pytest.raises(FormatError):
        ops.seal_file(cut)
    assert not (tmp_path / f".{cut.name}.mappedram-lock").exists()


@pytest.mark.parametrize("step", [0, 1])
def test_a_seal_in_place_cut_short_leaves_a_file_every_reader_rejects(tmp_path: Path, step: int) -> None:
    """A crash (here: a failed write) after the old trailer's mark is gone never leaves a
    file that looks sealed; before it, the file is as it was."""
    path = _save(tmp_path, seal=False)
    with mappedram.open_file(path) as mf:
        assert mf.vmdesc is not None
        at = mf.vmdesc.offset
    writes = []

    def fail(op: str, p: str, offset: int, length: int) -> int | None:
        if op == "write" and p == os.fspath(path) and offset >= at:
            writes.append(offset)
            if len(writes) > step:
                raise OSError(errno.EIO, "injected")
        return None

    with inject(fail), pytest.raises(IOEngineError):
        ops.seal_file(path)
    if step == 0:
        with mappedram.open_file(path) as mf:
            assert mf.seal is None  # untouched
        return
    with pytest.raises(FormatError, match="no vmdesc trailer"):
        mappedram.open_file(path)
    assert not ops.verify(path).ok


def test_a_save_whose_seal_fails_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "a.mig"

    def fail(op: str, p: str, offset: int, length: int) -> int | None:
        if op == "write" and p.endswith(".tmp") and length == 1 and offset > PAGES * PAGE:
            raise OSError(errno.ENOSPC, "injected")
        return None

    with inject(fail), pytest.raises(IOEngineError):
        ops.save(out, {"pc.ram": _ram()}, seal=SealOptions())
    assert not out.exists() and os.listdir(tmp_path) == []


def test_rewrite_drops_a_source_seal_and_seals_its_own(tmp_path: Path) -> None:
    sealed = _save(tmp_path)
    plain = tmp_path / "plain.mig"
    assert ops.rewrite(sealed, plain).seal is None
    with mappedram.open_file(plain) as mf:
        assert mf.seal is None and mf.vmdesc is not None and b"seal" not in mf.vmdesc.raw
    again = tmp_path / "again.mig"
    report = ops.rewrite(sealed, again, seal=SealOptions(), options=EngineOptions(channels=1))
    assert report.seal is not None and ops.verify(again, data=True).ok


def _rewrite_trailer(path: Path, edit: object) -> None:
    with mappedram.open_file(path) as mf:
        assert mf.vmdesc is not None
        at, data = mf.vmdesc.offset, json.loads(mf.vmdesc.raw)
    edit(data["mappedram"]["seal"])  # type: ignore[operator]
    with open(path, "r+b") as f:
        f.truncate(at)
        f.seek(at)
        f.write(encode_vmdesc(json.dumps(data).encode()))


@pytest.mark.parametrize(("edit", "field"), [
    (lambda s: s["blocks"][0].update(digests=s["blocks"][0]["digests"][:-64]), ".blocks[0].digests"),
    (lambda s: s["blocks"].pop(), ".blocks"),
    (lambda s: s["blocks"].append(dict(s["blocks"][0])), ".blocks"),
    (lambda s: s.update(algorithm="crc32"), ".algorithm"),
    (lambda s: s.update(version=9), ".version"),
    (lambda s: s.update(state="zz" * 32), ".state"),
])  # fmt: skip
def test_a_seal_that_lies_is_a_format_error_from_open_and_verify(tmp_path: Path, edit: object, field: str) -> None:
    path = _save(tmp_path)
    _rewrite_trailer(path, edit)
    with pytest.raises(FormatError) as err:
        mappedram.open_file(path)
    assert err.value.field == f"vmdesc mappedram.seal{field}" and err.value.offset is not None
    report = ops.verify(path, data=True)
    assert not report.ok and report.problems[0].field == f"vmdesc mappedram.seal{field}"


def test_vm_save_sealed_and_vm_restore_refuses_it_corrupted(tmp_path: Path) -> None:
    path = tmp_path / "vm.mig"
    saved = vmops.vm_save(path, vmops.GuestConfig(kind="software", mem_mib=16, batch=4096), warmup_iterations=8192,
                          step_batches=2, live=vmops.VM_LIVE_DEFAULTS.replace(downtime_limit=1000),
                          seal=SealOptions())  # fmt: skip
    assert saved.save.seal is not None and saved.save.file_size == path.stat().st_size
    assert ops.verify(path, data=True).ok
    for mode in ("eager", "map"):
        report = vmops.vm_restore(path, mode=mode, run_iterations=4096)
        assert report.ok and report.restore.seal is not None and report.restore.seal.ok
    _flip(path, _stored_page(path, 10)[1] + 100)
    for mode in ("eager", "map"):
        with pytest.raises(IntegrityError, match=r"pc\.ram"):
            vmops.vm_restore(path, mode=mode, run_iterations=4096)
    unchecked = vmops.vm_restore(path, mode="eager", run=0, seal=ops.NO_CHECK)
    assert unchecked.restore.seal is None


def test_check_seal_is_the_readers_one_call(tmp_path: Path) -> None:
    """What serve (and any reader) calls: an open file, the engine options, the key."""
    path = _save(tmp_path)
    with mappedram.open_file(path) as mf:
        check = ops.check_seal(mf, EngineOptions(channels=2), key=None)
        assert check.ok and dataclasses.asdict(check)["status"] == "ok" and check.to_dict()["ok"] is True

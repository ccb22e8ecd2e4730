"""Restoring the built-in guest eagerly and by mapping its file, and again and again.

Both guests run (the KVM guest where /dev/kvm works; these tests skip only where it does
not, and say why). Every guest is driven step by step (exact numbers of batches), so each
assertion holds on any machine: the restored RAM and vCPU state equal the file's, the
guest runs on and verifies with the workload's oracle, and a repeat restore after the
guest wrote some pages equals a full restore.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram.format.encoder import encode_vmdesc
from mappedram.ops.mapping import stale_slots
from mappedram.vm import ops as vmops
from mappedram.vm.kvm import kvm_available
from mappedram.vm.restore import RestoreLoop, restore_guest

KVM_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
GUESTS = [pytest.param("kvm", marks=needs_kvm), "software"]
BATCH = 4096
PAGE = 4096


def _saved(tmp_path: Path, guest: str, mem: int = 16) -> Path:
    out = tmp_path / f"{guest}.mig"
    args = ["vm", "save", os.fspath(out), "--guest", guest, "--mem", str(mem), "--batch", str(BATCH),
            "--warmup-iterations", str(2 * BATCH), "--step-batches", "2", "--downtime-limit", "1000", "-q"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _file_ram(path: Path) -> bytes:
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        return mf.read_pages(b, 0, b.num_pages)


@pytest.mark.parametrize("mode", vmops.RESTORE_MODES)
@pytest.mark.parametrize("guest", GUESTS)
def test_each_mode_restores_exactly_and_runs_on(tmp_path: Path, guest: str, mode: str) -> None:
    path = _saved(tmp_path, guest)
    with mappedram.open_file(path) as mf:
        vm, cpu, report = restore_guest(mf, mode=mode)
    with vm:
        assert report.mode == mode and bytes(vm.memory) == _file_ram(path)
        assert vm.check(cpu).ok
        later = vm.run_until(cpu.counter + 3 * BATCH)
        assert later.counter == cpu.counter + 3 * BATCH and vm.check(later).ok
        assert vm.first_entry is not None
    if mode == "map":
        assert report.pages_read == 0 and report.pages_mapped + report.pages_zero == report.pages
        assert not report.stale_checked  # the file says its 0-bit slots are clean
    assert _file_ram(path) == _file_ram(path)  # the file is never modified (read twice, same)


@pytest.mark.parametrize("guest", GUESTS)
def test_cli_map_mode_reports_the_first_instruction(tmp_path: Path, guest: str) -> None:
    path = _saved(tmp_path, guest)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "mappedram", "vm", "restore", os.fspath(path), "--mode", "map",
                           "--run-iterations", str(BATCH), "--output", "json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    r = json.loads(proc.stdout)
    assert proc.returncode == 0 and r["ok"], r
    assert r["restore"]["mode"] == "map" and r["seconds_to_first_instruction"] is not None
    assert r["at_restore"] is None and r["after"]["ok"] and r["counter_after"] == r["counter"] + BATCH
    assert path.read_bytes() == before


def _with_stale_slot(src: Path, dst: Path) -> int:
    """``dst``: ``src`` as QEMU could have written it: garbage in a 0-bit slot, no clean-slot promise."""
    data = bytearray(src.read_bytes())
    with mappedram.open_file(src) as mf:
        b = mf.block("pc.ram")
        assert b.layout is not None and mf.vmdesc is not None
        page = int(np.flatnonzero(~np.asarray(b.present))[-1])
        at = b.layout.pages_offset + page * PAGE
        trailer = json.loads(mf.vmdesc.raw)
        cut = mf.vmdesc.offset
    data[at : at + PAGE] = b"\xa5" * PAGE
    trailer.pop("mappedram")
    dst.write_bytes(bytes(data[:cut]) + encode_vmdesc(json.dumps(trailer).encode()))
    return page


@pytest.mark.parametrize("guest", GUESTS)
def test_stale_bytes_in_zero_slots_are_never_seen(tmp_path: Path, guest: str) -> None:
    stale = tmp_path / "stale.mig"
    page = _with_stale_slot(_saved(tmp_path, guest), stale)
    with mappedram.open_file(stale) as mf:
        found = stale_slots(mf, "pc.ram")
        assert not found.trusted and found.count == 1 and found.first() == page
        for mode in vmops.RESTORE_MODES:
            vm, cpu, report = restore_guest(mf, mode=mode)
            with vm:
                assert bytes(vm.memory[page * PAGE : (page + 1) * PAGE]) == bytes(PAGE), mode
                assert vm.check(cpu).ok
            if mode == "map":
                assert report.stale_checked and report.stale_pages_zeroed == 1
                assert f"first: page {page}" in report.notes[0]


def test_qemu_files_zero_slots_are_checked(vector) -> None:  # type: ignore[no-untyped-def]
    path, offset = vector("q35-64M-mapped-ram.mig")
    with mappedram.open_file(path, offset) as mf:
        assert not mf.clean_zero_slots  # QEMU promises nothing
        found = stale_slots(mf, "m0")
        assert not found.trusted and found.count == 0  # a paused guest's save: no stale slot


@pytest.mark.parametrize("mode", vmops.RESTORE_MODES)
@pytest.mark.parametrize("guest", GUESTS)
def test_repeat_restore_rewrites_what_changed_and_equals_a_full_one(tmp_path: Path, guest: str, mode: str) -> None:
    path = _saved(tmp_path, guest, mem=32)
    ram = _file_ram(path)
    with RestoreLoop(path, mode=mode) as loop:
        for rounds in (1, 3):
            later = loop.vm.run_until(loop.cpu.counter + rounds * BATCH)
            assert loop.vm.check(later).ok
            report = loop.reset()
            assert 0 < report.pages_rewritten < report.pages, report
            assert bytes(loop.vm.memory) == ram, f"after {rounds} batches the repeat restore differs from a full one"
            assert loop.vm.check(loop.cpu).ok
        again = loop.vm.run_until(loop.cpu.counter + BATCH)
        assert again.counter == loop.cpu.counter + BATCH and loop.vm.check(again).ok

"""Restoring the built-in guest eagerly and by mapping its file, and again and again.

Both guests run (the KVM guest where /dev/kvm works; these tests skip only where it does
not, and say why). Every guest is driven step by step (exact numbers of batches), so each
assertion holds on any machine: the restored RAM and vCPU state equal the file's, the
guest runs on and verifies with the workload's oracle, and a repeat restore after the
guest wrote some pages equals a full restore.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mappedram
from mappedram.engine.faults import inject
from mappedram.errors import IOEngineError, KvmError, UsageError
from mappedram.format.encoder import encode_vmdesc
from mappedram.ops.live import LiveOptions
from mappedram.ops.mapping import stale_slots
from mappedram.vm import ops as vmops
from mappedram.vm.kvm import kvm_available
from mappedram.vm.lazy import LazyOptions
from mappedram.vm.restore import RestoreLoop, restore_guest
from mappedram.vm.uffd import userfaultfd_problem

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


def _modes(guest: str) -> list[str]:
    return [m for m in vmops.RESTORE_MODES if not (m == "lazy" and guest == "software")]


CASES = [pytest.param(g, m, marks=needs_kvm if g == "kvm" else ()) for g in ("kvm", "software") for m in _modes(g)]


@pytest.mark.parametrize(("guest", "mode"), CASES)
def test_each_mode_restores_exactly_and_runs_on(tmp_path: Path, guest: str, mode: str) -> None:
    path = _saved(tmp_path, guest)
    with mappedram.open_file(path) as mf:
        vm, cpu, report = restore_guest(mf, mode=mode)
    with vm:
        if mode == "lazy":
            assert vm.lazy.wait_resident(120) and vm.lazy.error is None  # reading RAM from here needs it resident
        assert report.mode == mode and bytes(vm.memory) == _file_ram(path)
        assert vm.check(cpu).ok
        later = vm.run_until(cpu.counter + 3 * BATCH)
        assert later.counter == cpu.counter + 3 * BATCH and vm.check(later).ok
        assert vm.first_entry is not None
    if mode == "map":
        assert report.pages_read == 0 and report.pages_mapped + report.pages_zero == report.pages
        assert not report.stale_checked  # the file says its 0-bit slots are clean
    assert _file_ram(path) == _file_ram(path)  # the file is never modified (read twice, same)


@pytest.mark.parametrize(("guest", "mode"), [c for c in CASES if c.values[1] != "eager"])
def test_cli_instant_modes_report_the_first_instruction(tmp_path: Path, guest: str, mode: str) -> None:
    path = _saved(tmp_path, guest)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "mappedram", "vm", "restore", os.fspath(path), "--mode", mode,
                           "--run-iterations", str(BATCH), "--output", "json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    r = json.loads(proc.stdout)
    assert proc.returncode == 0 and r["ok"], r
    assert r["restore"]["mode"] == mode and r["seconds_to_first_instruction"] is not None
    if mode == "lazy":
        z = r["restore"]["lazy"]
        assert z["installed"] == z["pages"] and z["seconds_to_resident"] is not None and z["error"] is None, z
        assert z["pages_faulted"] + z["pages_prefetched"] + z["pages_zero"] + z["pages_early"] == z["pages"], z
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
        for mode in _modes(guest):
            vm, cpu, report = restore_guest(mf, mode=mode)
            with vm:
                if mode == "lazy":
                    assert vm.lazy.wait_resident(120)
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


@pytest.mark.parametrize(("guest", "mode"), CASES)
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


# -- lazy restore (userfaultfd) ----------------------------------------------------------

needs_uffd = pytest.mark.skipif(
    KVM_REASON is not None or userfaultfd_problem() is not None,
    reason=f"KVM or userfaultfd is not usable here: {KVM_REASON or userfaultfd_problem()}",
)


@needs_uffd
def test_lazy_faults_first_then_prefetch_installs_each_page_once(tmp_path: Path) -> None:
    """The guest runs (touching its pages in the workload's random order) with prefetch held
    back: every page it needs is served on fault; then prefetch installs the rest."""
    path = _saved(tmp_path, "kvm", mem=32)
    with mappedram.open_file(path) as mf:
        vm, cpu, _ = restore_guest(mf, mode="lazy", lazy=LazyOptions(prefetch_threads=3, chunk_pages=256,
                                                                        start_prefetch=False))  # fmt: skip
    with vm:
        later = vm.run_until(cpu.counter + 4 * BATCH)
        early = vm.lazy.stats()
        assert early.pages_faulted > 0 and early.pages_prefetched == 0 and early.installed < early.pages, early
        vm.lazy.start_prefetch()
        assert vm.lazy.wait_resident(120) and vm.lazy.error is None
        z = vm.lazy.stats()
        assert z.installed == z.pages == z.pages_faulted + z.pages_prefetched + z.pages_zero + z.pages_early, z  # each page once
        assert vm.check(later).ok
        again = vm.run_until(later.counter + BATCH)
        assert vm.check(again).ok


@needs_uffd
def test_lazy_read_error_stops_the_guest_with_a_clear_error(tmp_path: Path) -> None:
    path = _saved(tmp_path, "kvm", mem=32)

    def eio(op: str, name: str, offset: int, length: int) -> int | None:
        if op == "read" and name == os.fspath(path) and offset >= 1 << 20:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return None

    with mappedram.open_file(path) as mf:
        vm, cpu, _ = restore_guest(mf, mode="lazy", lazy=LazyOptions(start_prefetch=False))
    with vm, inject(eio):
        with pytest.raises(KvmError):
            vm.run_until(cpu.counter + 4 * BATCH, timeout=120)  # fails at once, never hangs
        assert vm.lazy.wait_resident(10) and vm.lazy.error is not None
        text = str(vm.lazy.error)
        assert "lazy restore of block 'pc.ram' failed at page" in text and "Input/output error" in text, text
        assert "the guest was stopped" in text


@pytest.mark.parametrize("mode", [pytest.param("lazy", marks=needs_uffd), pytest.param("map", marks=needs_kvm)])
def test_restored_guest_saves_live_again(tmp_path: Path, mode: str) -> None:
    """Dirty logging works over a memslot that userfaultfd filled, or that maps the file
    privately: a later live save of the restored guest restores exactly."""
    path = _saved(tmp_path, "kvm", mem=32)
    with mappedram.open_file(path) as mf:
        vm, cpu, _ = restore_guest(mf, mode=mode, dirty_log=True)
    again = tmp_path / "again.mig"
    with vm:
        if mode == "lazy":
            assert vm.lazy.wait_resident(120)
        vm.run_until(cpu.counter + 2 * BATCH)
        stopped: list[object] = []
        report = vmops.live_save_guest(vm, again, "mapped-ram", stopped, step_batches=2,  # type: ignore[arg-type]
                                       live=LiveOptions(max_passes=3, downtime_limit=1000))  # fmt: skip
        assert report.ok, report
        assert bytes(vm.memory) == _file_ram(again)
    r = vmops.vm_restore(again, mode=mode, run_iterations=BATCH)
    assert r.ok and (mode != "lazy" or (r.restore.lazy is not None and r.restore.lazy.error is None))


def test_userfaultfd_refused_names_the_sysctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mappedram.vm import uffd

    class Refusing:
        def syscall(self, *_: object) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(uffd, "_libc", Refusing())
    monkeypatch.setattr(uffd, "_USERFAULTFD_DEV", os.fspath(tmp_path / "no-such-device"))
    problem = uffd.userfaultfd_problem()
    assert problem is not None and "vm.unprivileged_userfaultfd=1" in problem and "CAP_SYS_PTRACE" in problem
    if KVM_REASON is None:
        path = _saved(tmp_path, "kvm")
        with pytest.raises(uffd.UserfaultfdUnavailable, match=r"vm\.unprivileged_userfaultfd"):
            vmops.vm_restore(path, mode="lazy", run_iterations=BATCH)
        r = vmops.vm_restore(path, mode="lazy", run_iterations=BATCH, lazy_fallback=True)
        assert r.ok and r.restore.mode == "eager" and "restored eagerly" in r.restore.notes[-1]


def test_software_guest_cannot_be_restored_lazily(tmp_path: Path) -> None:
    path = _saved(tmp_path, "software")
    with mappedram.open_file(path) as mf, pytest.raises(UsageError, match="interpreter lock"):
        restore_guest(mf, mode="lazy")


@pytest.mark.parametrize(("guest", "mode"), [c for c in CASES if c.values[1] != "eager"])
def test_a_file_replaced_after_it_was_checked_is_not_used(tmp_path: Path, guest: str, mode: str) -> None:
    """Map and lazy restores open the file again by its path: if a save replaced it meanwhile
    (renamed over it), they refuse instead of laying its bytes out by the old file's bitmap."""
    path = _saved(tmp_path, guest)
    other = tmp_path / "other.mig"
    other.write_bytes(path.read_bytes())
    with mappedram.open_file(path) as mf:
        os.replace(other, path)
        with pytest.raises((IOEngineError, KvmError), match="was replaced since it was opened and checked"):
            restore_guest(mf, mode=mode)

"""The touch guest (tests/helpers/touchguest.py) runs as QEMU's firmware: it fills its RAM, then sweeps it."""

from __future__ import annotations

import mmap
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import touchguest
from tests.helpers.qemu_harness import QemuError, QemuVM, require_qemu
from tests.helpers.touchguest import Status

pytestmark = pytest.mark.qemu

RAM_MIB = 64
#: Generous: a sweep of 64 MiB takes milliseconds under TCG; nothing else here is timed.
LIMIT = 60.0


def _poll(vm: QemuVM, ram_path: Path, done: Callable[[Status], bool], what: str) -> Status:
    """Read the status area from the shared RAM file until ``done``; fail after LIMIT seconds."""
    deadline = time.monotonic() + LIMIT
    while True:
        status = touchguest.read_status_file(ram_path)
        if done(status):
            return status
        run = vm.cmd("query-status")
        if run["status"] != "running":
            raise QemuError(f"{what}: the guest is {run['status']!r}, status area {status}", vm.stderr)
        if time.monotonic() > deadline:
            regs = vm.cmd("human-monitor-command", {"command-line": "info registers"})
            raise QemuError(f"{what}: not within {LIMIT} s; status area {status}\n{regs}", vm.stderr)
        time.sleep(0.01)


def test_pattern_rule() -> None:
    assert touchguest.expected_page_word(touchguest.RAM_START_PAGE - 1) is None
    assert touchguest.expected_page_word(15 + 16 * 100) is None
    lo = (300 * touchguest.MULTIPLIER ^ touchguest.SEED) & 0xFFFFFFFF
    assert touchguest.expected_page_word(300) == lo | (lo ^ 0xFFFFFFFF) << 32
    assert touchguest.expected_page_word(touchguest.DEFAULT_RAM_END // touchguest.PAGE_SIZE) is None
    ram = touchguest.expected_ram(RAM_MIB << 20)
    assert touchguest.check_ram(memoryview(ram)) is None
    page = touchguest.RAM_START_PAGE + 5
    assert int.from_bytes(ram[page * 4096 : page * 4096 + 8], "little") == touchguest.expected_page_word(page)
    ram[page * 4096 + 100] = 1
    assert touchguest.check_ram(memoryview(ram)) is not None
    n = touchguest.DEFAULT_RAM_END // touchguest.PAGE_SIZE - touchguest.RAM_START_PAGE
    stride = touchguest.touch_stride(n)
    assert sorted((i * stride) % n for i in range(n)) == list(range(n))
    image = touchguest.bios_image()
    assert len(image) == touchguest.BIOS_SIZE and image[-16] == 0xE9


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_touch_guest_runs(tmp_path: Path, machine: str) -> None:
    binary = require_qemu((10, 0, 0))
    bios = touchguest.build_bios(tmp_path / "touch.bin")
    ram_path = tmp_path / "ram"
    args = ["-bios", str(bios), "-action", "reboot=shutdown,shutdown=pause"]
    with QemuVM(ram_path, machine=machine, ram_mib=RAM_MIB, binary=binary, accel="tcg", extra_args=args) as vm:
        vm.cmd("cont")
        first = _poll(vm, ram_path, lambda s: s.touching and s.loops >= 2, "two sweeps")
        vm.cmd("stop")
        stopped = touchguest.read_status_file(ram_path)

        regs = vm.cmd("human-monitor-command", {"command-line": "info registers"})
        cr0 = re.search(r"CR0=([0-9a-f]+)", regs)
        assert cr0 is not None and int(cr0[1], 16) & 1, f"vCPU not in protected mode:\n{regs}"
        assert re.search(r"^CS =0008 00000000 ffffffff 00cf9", regs, re.M), regs

        assert stopped.magic == touchguest.MAGIC
        assert stopped.phase == touchguest.PHASE_TOUCHING
        assert stopped.loops >= first.loops >= 2
        assert stopped.errors == 0 and stopped.first_bad_page is None, stopped
        assert stopped.pages == (touchguest.DEFAULT_RAM_END - touchguest.RAM_START) // touchguest.PAGE_SIZE
        assert stopped.seed == touchguest.SEED
        with open(ram_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mismatch = touchguest.check_ram(memoryview(m))
        assert mismatch is None, mismatch

        vm.cmd("cont")
        later = _poll(vm, ram_path, lambda s: s.loops > stopped.loops, "sweeps after cont")
        vm.cmd("stop")
        assert later.errors == 0, later


def test_touch_guest_sees_corruption(tmp_path: Path) -> None:
    """A word changed behind the guest's back (through the shared RAM file) is counted and its page named."""
    binary = require_qemu((10, 0, 0))
    bios = touchguest.build_bios(tmp_path / "touch.bin")
    ram_path = tmp_path / "ram"
    args = ["-bios", str(bios), "-action", "reboot=shutdown,shutdown=pause"]
    data_page = touchguest.RAM_START_PAGE + 1000
    zero_page = touchguest.RAM_START_PAGE + 16 * 700 - 1
    assert touchguest.expected_page_word(zero_page) is None
    word = touchguest.expected_page_word(data_page)
    assert word is not None
    with (
        QemuVM(ram_path, ram_mib=RAM_MIB, binary=binary, accel="tcg", extra_args=args) as vm,
        open(ram_path, "r+b") as f,
    ):
        vm.cmd("cont")
        _poll(vm, ram_path, lambda s: s.touching and s.loops >= 1, "one sweep")
        for page, bad in ((data_page, word ^ 1 << 40), (zero_page, 1)):
            os.pwrite(f.fileno(), bad.to_bytes(8, "little"), page * touchguest.PAGE_SIZE)
            seen = _poll(vm, ram_path, lambda s, page=page: s.errors > 0 and s.last_bad == page, f"page {page} seen")
            assert seen.first_bad == data_page, seen
            os.pwrite(f.fileno(), (word if page == data_page else 0).to_bytes(8, "little"), page * touchguest.PAGE_SIZE)
        # once both are repaired and a whole sweep has passed, the count stands still
        base = _poll(vm, ram_path, lambda s: True, "status")
        settled = _poll(vm, ram_path, lambda s: s.loops >= base.loops + 2, "two sweeps after the repair")
        final = _poll(vm, ram_path, lambda s: s.loops >= settled.loops + 2, "two more sweeps")
        vm.cmd("stop")
        assert final.errors == settled.errors, (settled, final)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert touchguest.check_ram(memoryview(m)) is None

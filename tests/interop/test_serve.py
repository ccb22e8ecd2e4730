"""``serve``: mappedram as the migration source of a real QEMU 10 destination, precopy and postcopy.

QEMU is the oracle: it must complete the incoming migration, and the RAM it then holds
(its memory-backend-file, read back) must equal the file's. Postcopy destinations keep
their RAM on tmpfs (/dev/shm): QEMU's postcopy registers shared memory with userfaultfd,
which a file on a disk filesystem does not support.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mappedram
from mappedram.errors import MigrationError, UsageError
from mappedram.ops import EngineOptions, ServeOptions, ServeReport, convert, rewrite, serve, serve_qemu
from tests.helpers import touchguest
from tests.helpers.qemu_cases import (
    LEGACY,
    MAPPED_RAM,
    OFFSET,
    RAM_MIB,
    Variant,
    qemu_pattern,
    qemu_save,
    write_src_ram,
)
from tests.helpers.qemu_harness import QemuVM, file_uri, first_mismatch, kvm_usable, require_qemu
from tests.helpers.vectors import VECTORS

pytestmark = pytest.mark.qemu

#: Every wait here is bounded by this; nothing asserts on speed.
LIMIT = 60.0


@contextlib.contextmanager
def destination(
    ram: Path,
    tmp_path: Path,
    *,
    machine: str = "q35",
    postcopy: bool = False,
    preempt: bool = False,
    ram_mib: int = RAM_MIB,
    accel: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[tuple[QemuVM, str]]:
    """An incoming QEMU listening on a unix socket; yields it and the address to serve to.
    It has a second QMP socket, ``serve.qmp`` beside its first, for serve's own use
    (a QMP socket takes one client at a time)."""
    binary = require_qemu((10, 0, 0))
    qmp = tmp_path / "serve.qmp"
    extra = (*extra_args, "-qmp", f"unix:{qmp},server=on,wait=off")
    with QemuVM(ram, machine=machine, ram_mib=ram_mib, binary=binary, incoming=True, workdir=tmp_path,
                accel=accel, extra_args=extra) as vm:  # fmt: skip
        caps = {"postcopy-ram": True, **({"postcopy-preempt": True} if preempt else {})}
        vm.configure_migration(caps if postcopy else {}, None)
        sock = Path(vm.socket_path).parent / f"{vm.name}.mig"
        vm.cmd("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
        yield vm, f"unix:{sock}"


def read_ram(path: Path) -> bytes:
    return path.read_bytes()


def assert_ram(path: Path, expected: bytes | Any) -> None:
    actual = read_ram(path)
    if actual != bytes(expected):
        pytest.fail(f"destination RAM differs: {first_mismatch(actual, bytes(expected))}")


def serve_and_complete(
    vm: QemuVM, path: Path, to: str, *, offset: int = 0, options: ServeOptions | None = None
) -> ServeReport:
    report = serve(path, to, offset=offset, options=options or ServeOptions(timeout=LIMIT))
    assert report.ok and report.destination_status == 0, report
    info = vm.wait_migration(LIMIT)
    assert info["status"] == "completed", info
    return report


# -- every file we read, served -------------------------------------------------------------


@pytest.mark.parametrize("name", VECTORS)
def test_serve_vectors_precopy(tmp_path: Path, vector: Any, expected_ram: bytes, name: str) -> None:
    """Each of QEMU's test vectors (mapped-ram, multifd, legacy, with offsets), served precopy."""
    if not kvm_usable():
        pytest.skip("the vectors were saved under KVM: their kvmclock section needs a KVM destination")
    path, offset = vector(name)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    machine = "q35" if name.startswith("q35") else "pc"
    with destination(tmp_path / "dst.ram", tmp_path, machine=machine) as (vm, to):
        report = serve_and_complete(vm, path, to, offset=offset)
        assert report.mode == "precopy" and report.pages_sent == mappedram.open_file(path, offset).main_block.pages_present + sum(
            b.pages_present for b in mappedram.open_file(path, offset).blocks if b.idstr != "m0"
        )
        assert_ram(tmp_path / "dst.ram", expected_ram)
        assert vm.cmd("query-status")["status"] != "running"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "serve changed the file"


@pytest.mark.parametrize("name", ["q35-64M-mapped-ram-multifd4.mig", "pc-64M-legacy.mig"])
def test_serve_vectors_postcopy(tmp_path: Path, shm: Path, vector: Any, expected_ram: bytes, name: str) -> None:
    if not kvm_usable():
        pytest.skip("the vectors were saved under KVM: their kvmclock section needs a KVM destination")
    path, offset = vector(name)
    machine = "q35" if name.startswith("q35") else "pc"
    with destination(shm / "dst.ram", tmp_path, machine=machine, postcopy=True) as (vm, to):
        report = serve_and_complete(vm, path, to, offset=offset, options=ServeOptions(postcopy=True, timeout=LIMIT))
        assert report.mode == "postcopy" and report.seconds_to_run is not None
        assert_ram(shm / "dst.ram", expected_ram)


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
@pytest.mark.parametrize("variant", [MAPPED_RAM, LEGACY, OFFSET], ids=lambda v: v.name)
def test_serve_what_qemu_saved(tmp_path: Path, shm: Path, variant: Variant, postcopy: bool) -> None:
    """A file QEMU saved on this machine (same accelerator), served to a fresh QEMU."""
    binary = require_qemu((10, 0, 0))
    out = tmp_path / "qemu.mig"
    qemu_save(binary, "q35", write_src_ram(tmp_path), out, variant)
    ram = (shm if postcopy else tmp_path) / "dst.ram"
    with destination(ram, tmp_path, postcopy=postcopy) as (vm, to):
        serve_and_complete(vm, out, to, offset=variant.offset or 0, options=ServeOptions(postcopy=postcopy))
        assert_ram(ram, qemu_pattern())


@pytest.mark.parametrize("how", ["rewrite-of-legacy", "convert-to-legacy"])
def test_serve_our_files(tmp_path: Path, how: str) -> None:
    """Files this project wrote from QEMU's: a legacy stream re-laid as mapped-ram, and back."""
    binary = require_qemu((10, 0, 0))
    src = tmp_path / "qemu.mig"
    ours = tmp_path / "ours.mig"
    if how == "rewrite-of-legacy":
        qemu_save(binary, "pc", write_src_ram(tmp_path), src, LEGACY)
        rewrite(src, ours)
    else:
        qemu_save(binary, "pc", write_src_ram(tmp_path), src, MAPPED_RAM)
        convert(src, ours, to="legacy")
    with destination(tmp_path / "dst.ram", tmp_path, machine="pc") as (vm, to):
        serve_and_complete(vm, ours, to)
        assert_ram(tmp_path / "dst.ram", qemu_pattern())


def _touch_args(bios: Path) -> tuple[str, ...]:
    return ("-bios", str(bios), "-action", "reboot=shutdown,shutdown=pause")


def _poll_status(vm: QemuVM, ram: Path, done: Callable[[touchguest.Status], bool], what: str) -> touchguest.Status:
    deadline = time.monotonic() + LIMIT
    while True:
        status = touchguest.read_status_file(ram)
        if done(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {LIMIT} s; status {status}; QEMU says {vm.cmd('query-status')}")
        time.sleep(0.01)


def _touch_guest_saved(tmp_path: Path, capabilities: dict[str, bool]) -> tuple[Path, Path, Path]:
    """A TCG guest that filled its RAM and is sweeping it, saved by QEMU while it runs: (file, bios, source RAM)."""
    binary = require_qemu((10, 0, 0))
    bios = touchguest.build_bios(tmp_path / "touch.bin")
    ram = tmp_path / "src.ram"
    out = tmp_path / "touch.mig"
    with QemuVM(ram, ram_mib=RAM_MIB, binary=binary, accel="tcg", extra_args=_touch_args(bios), name="src") as vm:
        vm.cmd("cont")
        _poll_status(vm, ram, lambda s: s.touching and s.loops >= 1, "the source's first sweep")
        vm.configure_migration(capabilities, None)
        vm.cmd("migrate", {"uri": file_uri(out)})  # live: the guest runs while QEMU saves
        vm.wait_migration(LIMIT)
    return out, bios, ram


def test_serve_legacy_of_many_passes(tmp_path: Path) -> None:
    """A legacy stream QEMU wrote while the guest ran (the status page sent again in later
    passes) is served as one pass of its last state, and the guest runs on from it."""
    out, bios, src_ram = _touch_guest_saved(tmp_path, {})
    with mappedram.open_file(out) as mf:
        assert mf.main_block.legacy_records > mf.main_block.pages_present or sum(
            1 for s in mf.sections if s.kind == "PART"
        ) > 1, "QEMU wrote a single pass: the case is not covered"
    ram = tmp_path / "dst.ram"
    with destination(ram, tmp_path, accel="tcg", extra_args=_touch_args(bios)) as (vm, to):
        serve_and_complete(vm, out, to)
        assert_ram(ram, read_ram(src_ram))
        at_load = touchguest.read_status_file(ram)
        vm.cmd("cont")
        later = _poll_status(vm, ram, lambda s: s.loops > at_load.loops + 1, "sweeps after the load")
        assert later.errors == 0, later


@pytest.mark.parametrize("preempt", [False, True], ids=["one-channel", "preempt"])
def test_postcopy_guest_runs_before_its_ram_is_read(tmp_path: Path, shm: Path, preempt: bool) -> None:
    """The guest runs (and touches its RAM) while serve answers its page requests before the
    background stream starts; the migration completes, RAM is bit-exact, the guest runs on.
    With preempt the requests are answered on QEMU's postcopy-preempt channel."""
    out, bios, _ = _touch_guest_saved(tmp_path, {"mapped-ram": True})
    ram = shm / "dst.ram"
    asked = 64
    with destination(ram, tmp_path, accel="tcg", postcopy=True, preempt=preempt, extra_args=_touch_args(bios)) as (
        vm,
        to,
    ):
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["report"] = serve(out, to, options=ServeOptions(postcopy=True, timeout=LIMIT,
                                                                       background_after=asked,
                                                                       postcopy_preempt=preempt))  # fmt: skip
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        try:
            deadline = time.monotonic() + LIMIT
            while vm.cmd("query-migrate")["status"] != "postcopy-active":
                assert time.monotonic() < deadline and thread.is_alive(), (result, vm.stderr)
                time.sleep(0.005)
            vm.cmd("cont")  # the destination started paused (-S): the guest runs from here on
        finally:
            thread.join(LIMIT)
        assert "error" not in result, result.get("error")
        report: ServeReport = result["report"]
        assert report.ok and report.mode == "postcopy"
        assert report.pages_requested >= asked and report.requests > 0
        assert report.request_latency_us is not None
        assert vm.wait_migration(LIMIT)["status"] == "completed"
        assert vm.cmd("query-status")["status"] == "running"
        done = touchguest.read_status_file(ram)
        later = _poll_status(vm, ram, lambda s: s.loops >= done.loops + 2, "sweeps after postcopy completed")
        vm.cmd("stop")
        assert later.errors == 0 and later.first_bad_page is None, later
        with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mismatch = touchguest.check_ram(memoryview(m))
        assert mismatch is None, mismatch


# -- refusals: QEMU's own words come back -------------------------------------------------


def _qemu_file(tmp_path: Path, machine: str = "q35", variant: Variant = MAPPED_RAM) -> Path:
    out = tmp_path / f"{machine}.mig"
    qemu_save(require_qemu((10, 0, 0)), machine, write_src_ram(tmp_path), out, variant)
    return out


REFUSALS = [
    pytest.param("pc", RAM_MIB, "Machine type received is 'pc-q35-10.0'", id="machine-type"),
    pytest.param("q35", 2 * RAM_MIB, "Size mismatch", id="ram-size"),
]


@pytest.mark.parametrize(("machine", "ram_mib", "said"), REFUSALS)
def test_refused_stream_carries_qemus_error(tmp_path: Path, machine: str, ram_mib: int, said: str) -> None:
    """With the destination's QMP, the error carries QEMU's error-desc (its reason is on its stderr)."""
    path = _qemu_file(tmp_path)
    with destination(tmp_path / "dst.ram", tmp_path, machine=machine, ram_mib=ram_mib) as (vm, to):
        with pytest.raises(MigrationError) as info:
            serve(path, to, options=ServeOptions(timeout=LIMIT, qmp=os.fspath(tmp_path / "serve.qmp")))
        assert "load of migration failed" in (info.value.qemu_error or ""), (str(info.value), vm.stderr)
        assert "refused the stream" in str(info.value), str(info.value)
        assert said in vm.stderr
        assert vm.cmd("query-migrate")["status"] == "failed"


@pytest.mark.parametrize(("machine", "ram_mib", "said"), REFUSALS)
def test_serve_qemu_refusal_says_why(tmp_path: Path, machine: str, ram_mib: int, said: str) -> None:
    """When serve started QEMU, the error carries the reason QEMU printed; that QEMU is killed."""
    path = _qemu_file(tmp_path)
    ram = tmp_path / "dst.ram"
    ram.write_bytes(b"")
    os.truncate(ram, ram_mib << 20)
    with pytest.raises(MigrationError) as info:
        serve_qemu(path, _qemu_cmdline(ram, machine=machine, ram_mib=ram_mib), options=ServeOptions(timeout=LIMIT))
    assert said in str(info.value), str(info.value)
    assert said in (info.value.qemu_error or "")


def test_missing_device_is_refused(tmp_path: Path, vector: Any) -> None:
    """A file whose device state names a device the destination lacks (the vectors' kvmclock,
    to a TCG QEMU that serve started): the error names the device, as QEMU did."""
    path, _ = vector("q35-64M-mapped-ram.mig")
    ram = tmp_path / "dst.ram"
    ram.write_bytes(b"")
    os.truncate(ram, RAM_MIB << 20)
    with pytest.raises(MigrationError) as info:
        serve_qemu(path, _qemu_cmdline(ram, accel="tcg"), options=ServeOptions(timeout=LIMIT))
    assert "Unknown savevm section or instance 'kvmclock'" in str(info.value), str(info.value)


def test_postcopy_to_a_destination_without_postcopy_ram(tmp_path: Path) -> None:
    path = _qemu_file(tmp_path)
    with destination(tmp_path / "dst.ram", tmp_path, postcopy=False) as (vm, to):
        with pytest.raises(MigrationError) as info:
            serve(path, to, options=ServeOptions(postcopy=True, timeout=LIMIT, qmp=os.fspath(tmp_path / "serve.qmp")))
        assert info.value.stage in ("configuration", "ram-setup", "package", "finish"), info.value
        assert vm.cmd("query-migrate")["status"] == "failed", vm.stderr


def test_nothing_listening(tmp_path: Path) -> None:
    path = _qemu_file(tmp_path)
    with pytest.raises(MigrationError, match="nothing listens"):
        serve(path, f"unix:{tmp_path / 'none.sock'}", options=ServeOptions(timeout=5, connect_retry=0.2))


def test_destination_killed_in_postcopy(tmp_path: Path, shm: Path) -> None:
    """QEMU dies after RUN: serve ends with an error saying the destination went away."""
    path = _qemu_file(tmp_path)
    with destination(shm / "dst.ram", tmp_path, postcopy=True) as (vm, to):
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                serve(path, to, options=ServeOptions(postcopy=True, timeout=LIMIT, background_after=1 << 40))
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + LIMIT
        while vm.cmd("query-migrate")["status"] != "postcopy-active":
            assert time.monotonic() < deadline and thread.is_alive(), (result, vm.stderr)
            time.sleep(0.005)
        assert vm._proc is not None
        vm._proc.kill()
        vm._proc.wait(LIMIT)
        thread.join(LIMIT)
        assert not thread.is_alive()
        exc = result.get("error")
        assert isinstance(exc, MigrationError), exc
        assert "closed the connection" in str(exc) or "return path" in str(exc), str(exc)


def test_destination_killed_in_precopy(tmp_path: Path) -> None:
    """QEMU dies after the first run of pages was sent: serve ends with an error, not a hang."""
    path = _qemu_file(tmp_path)
    with destination(tmp_path / "dst.ram", tmp_path) as (vm, to):
        killed: list[int] = []

        def kill_once(_: int) -> None:
            if not killed and vm._proc is not None:
                vm._proc.kill()
                vm._proc.wait(LIMIT)
                killed.append(1)

        with pytest.raises(MigrationError) as info:
            serve(path, to, options=ServeOptions(timeout=LIMIT, read_pages=256),
                  engine=EngineOptions(progress=kill_once))  # fmt: skip
        assert killed
        assert "closed the connection" in str(info.value) or "return path" in str(info.value), str(info.value)


def test_refuses_plain_tcp_to_another_host(tmp_path: Path) -> None:
    path = _qemu_file(tmp_path)
    with pytest.raises(UsageError, match="in the clear"):
        serve(path, "tcp:192.0.2.1:4444")


def test_serve_over_loopback_tcp(tmp_path: Path) -> None:
    path = _qemu_file(tmp_path)
    binary = require_qemu((10, 0, 0))
    with QemuVM(tmp_path / "dst.ram", ram_mib=RAM_MIB, binary=binary, incoming=True, workdir=tmp_path) as vm:
        vm.configure_migration({}, None)
        vm.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
        port = vm.cmd("query-migrate")["socket-address"][0]["port"]
        serve_and_complete(vm, path, f"tcp:127.0.0.1:{port}")
        assert_ram(tmp_path / "dst.ram", qemu_pattern())


# -- serve starts QEMU itself ----------------------------------------------------------------


def _qemu_cmdline(ram: Path, machine: str = "q35", ram_mib: int = RAM_MIB, accel: str | None = None) -> list[str]:
    """A destination's command line as a user gives it to ``serve --qemu`` (serve adds
    -incoming and its QMP socket); the guest starts paused (-S), its RAM is ``ram``."""
    accel = accel or ("kvm" if kvm_usable() else "tcg")
    return [require_qemu((10, 0, 0)), "-nodefaults", "-no-user-config", "-display", "none", "-accel", accel,
            "-machine", f"{machine},memory-backend=m0", "-m", f"{ram_mib}M", "-smp", "1",
            "-object", f"memory-backend-file,id=m0,size={ram_mib}M,mem-path={ram},share=on", "-S"]  # fmt: skip


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_serve_qemu_api(tmp_path: Path, shm: Path, postcopy: bool) -> None:
    path = _qemu_file(tmp_path)
    ram = shm / "dst.ram"
    ram.write_bytes(b"")
    os.truncate(ram, RAM_MIB << 20)
    report = serve_qemu(path, _qemu_cmdline(ram), options=ServeOptions(postcopy=postcopy, timeout=LIMIT))
    try:
        assert report.ok and report.qemu is not None
        assert report.qemu["status"] in ("paused", "prelaunch"), report.qemu  # -S: the caller starts it
        assert_ram(ram, qemu_pattern())
    finally:
        if report.qemu is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(report.qemu["pid"], 9)
            shutil.rmtree(Path(report.qemu["qmp"]).parent, ignore_errors=True)


def test_cli_serve(tmp_path: Path, shm: Path) -> None:
    path = _qemu_file(tmp_path)
    ram = shm / "dst.ram"
    ram.write_bytes(b"")
    os.truncate(ram, RAM_MIB << 20)
    cmd = [sys.executable, "-m", "mappedram", "serve", str(path), "--postcopy", "--output", "json", "--qemu", "--",
           *_qemu_cmdline(ram)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT * 2, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    try:
        assert report["ok"] and report["mode"] == "postcopy" and report["qemu"]["pid"]
        assert_ram(ram, qemu_pattern())
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError, TypeError):
            os.kill(report["qemu"]["pid"], 9)
        with contextlib.suppress(KeyError, TypeError):
            shutil.rmtree(Path(report["qemu"]["qmp"]).parent, ignore_errors=True)


def test_serve_checks_the_seal_first(tmp_path: Path) -> None:
    """A sealed file is checked whole before the first byte is sent: intact, it is served
    (and says so); with one flipped byte in a page, serve refuses and QEMU saw nothing."""
    from mappedram.errors import IntegrityError
    from mappedram.ops import seal_file

    path = _qemu_file(tmp_path)
    seal_file(path)
    with destination(tmp_path / "dst.ram", tmp_path) as (vm, to):
        report = serve_and_complete(vm, path, to)
        assert report.seal == "ok"
        assert_ram(tmp_path / "dst.ram", qemu_pattern())
    with mappedram.open_file(path) as mf:
        b = mf.main_block
        page = int(np.flatnonzero(b.present)[100])
        at = int(b.sources_of(np.array([page]))[0]) + 7
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    with destination(tmp_path / "dst2.ram", tmp_path) as (vm, to):
        with pytest.raises(IntegrityError) as info:
            serve(path, to, options=ServeOptions(timeout=LIMIT))
        assert info.value.block == b.idstr
        assert vm.cmd("query-migrate").get("status") in (None, "setup"), "serve sent something"

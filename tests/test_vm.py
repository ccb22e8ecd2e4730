"""The built-in guest saved live, restored into a fresh VM and resumed, end to end.

The KVM guest (the micro-VM) runs where /dev/kvm works; these tests skip only where it
does not, and say why. The software guest (the same workload on a thread) runs everywhere,
so the same flow is always tested. What must hold: the restored guest's RAM and vCPU state
equal the source's at the stop point, it runs on and stays exact; a mapped-ram file is
exactly its planned size whatever the number of passes, while a legacy stream of the same
workload grows with every pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mappedram
from mappedram import vmops
from mappedram.engine.kvm import kvm_available
from mappedram.errors import FormatError
from mappedram.format.cpustate import CPUSTATE_IDSTR
from mappedram.softvm import SOFTCPU_IDSTR

KVM_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
GUESTS = [pytest.param("kvm", marks=needs_kvm), "software"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_then_restore_resumes_exactly(tmp_path: Path, guest: str) -> None:
    out = tmp_path / "guest.mig"
    saved = json.loads(
        run(
            "vm",
            "save",
            str(out),
            "--guest",
            guest,
            "--mem",
            "32",
            "--warmup",
            "0.3",
            "--max-passes",
            "3",
            "--downtime-limit",
            "0",
            "--output",
            "json",
        ).stdout
    )
    assert saved["guest"] == guest and saved["source_check"]["ok"], saved["source_check"]
    live = saved["save"]
    assert len(live["passes"]) == 4 and live["passes"][-1]["stopped"], live["passes"]
    assert live["file_size"] == live["planned_size"] == out.stat().st_size
    assert run("verify", str(out)).returncode == 0
    with mappedram.open_file(out) as f:
        assert [b.idstr for b in f.blocks] == ["pc.ram"]
        assert [d.idstr for d in f.device_sections or []] == [CPUSTATE_IDSTR if guest == "kvm" else SOFTCPU_IDSTR]
    restored = json.loads(run("vm", "restore", str(out), "--run", "0.3", "--output", "json").stdout)
    assert restored["ok"] and restored["guest"] == guest, restored
    assert restored["counter"] == saved["counter"]
    assert restored["at_restore"]["ram"]["mismatches"] == 0 and restored["at_restore"]["counter"] == saved["counter"]
    assert restored["counter_after"] > restored["counter"], "the restored guest did not run on"
    assert restored["after"]["ok"]


@pytest.mark.parametrize("guest", GUESTS)
def test_demo(tmp_path: Path, guest: str) -> None:
    proc = run(
        "demo",
        "--guest",
        guest,
        "--mem",
        "32",
        "--warmup",
        "0.2",
        "--run",
        "0.2",
        "--bandwidth-limit",
        "64",
        "--dir",
        str(tmp_path),
        "--output",
        "json",
    )
    report = json.loads(proc.stdout)
    assert report["ok"] and report["guest"] == guest, report
    assert all(report["source_match"].values()), report["source_match"]
    mapped, legacy = report["mapped_ram"], report["legacy"]
    assert mapped["file_size"] == mapped["planned_size"] == (tmp_path / "guest.mig").stat().st_size
    assert len(legacy["passes"]) == len(mapped["passes"])
    assert legacy["file_size"] == (tmp_path / "guest-legacy.mig").stat().st_size
    for name in ("guest.mig", "guest-legacy.mig"):
        assert run("verify", str(tmp_path / name)).returncode == 0
    human = run("demo", "--guest", guest, "--mem", "16", "--warmup", "0.1", "--run", "0.1").stdout
    assert "demo OK" in human and "pass" in human and "legacy" in human and "downtime" in human


def test_mapped_ram_bounded_legacy_grows_on_one_workload(tmp_path: Path) -> None:
    """The software guest rewrites pages faster than a pass writes them: every pass has
    work. The mapped-ram file stays at its planned size (only an 18-byte empty PART section
    per pass is added); the legacy stream of the same workload grows by every pass."""
    sizes = {}
    for fmt in ("mapped-ram", "legacy"):
        for passes in (1, 6):
            r = vmops.vm_save(
                tmp_path / f"{fmt}-{passes}.mig",
                mem_mib=16,
                warmup=0.2,
                guest="software",
                format=fmt,
                max_passes=passes,
                downtime_limit=0.0,
                channels=2,
            )
            assert r.source_check is not None and r.source_check["ok"]
            assert len(r.save.passes) == passes + 1
            sizes[fmt, passes] = r.save.file_size
            if fmt == "mapped-ram":
                assert r.save.file_size == r.save.planned_size
    assert sizes["mapped-ram", 6] - sizes["mapped-ram", 1] == 5 * 18, sizes
    assert sizes["mapped-ram", 6] < (16 << 20) + (2 << 20)  # RAM, its 1 MiB-aligned start, the stream
    assert sizes["legacy", 6] > 2.5 * sizes["legacy", 1] > 2.5 * (8 << 20), sizes


@pytest.mark.parametrize("guest", GUESTS)
def test_restore_rejects_a_damaged_vcpu_section_before_touching_memory(tmp_path: Path, guest: str) -> None:
    out = tmp_path / "guest.mig"
    vmops.vm_save(out, mem_mib=16, warmup=0.1, guest=guest, max_passes=1)
    with mappedram.open_file(out) as f:
        (section,) = f.device_sections or []
        at = section.body_offset + section.body_length - 1  # the last byte of the body
    data = bytearray(out.read_bytes())
    cut = tmp_path / "cut.mig"
    cut.write_bytes(bytes(data[: at - 8]))  # cut inside the vCPU section: no trailer
    with pytest.raises(FormatError):
        vmops.vm_restore(cut)
    if guest == "kvm":  # a value no vCPU holds: rflags bit 1 is always set
        from mappedram.format.cpustate import CpuState

        with mappedram.open_file(out) as f:
            blob = f.device_state()
            base = section.body_offset - f.device_state_offset
        cpu = CpuState.decode(blob, offset=base)
        flags_at = section.body_offset + 17 * 8
        assert int.from_bytes(data[flags_at : flags_at + 8], "big") == cpu.rflags
        data[flags_at + 7] &= ~0x02
        bad = tmp_path / "bad.mig"
        bad.write_bytes(bytes(data))
        with pytest.raises(FormatError) as info:
            vmops.vm_restore(bad)
        assert info.value.offset is not None and section.body_offset <= info.value.offset < section.end, info.value


def test_no_kvm_says_so() -> None:
    choice = vmops.choose_guest("software")
    assert choice.kind == "software" and choice.reason
    if KVM_REASON is not None:
        choice = vmops.choose_guest("auto")
        assert choice.kind == "software" and KVM_REASON in (choice.reason or "")
    else:
        assert vmops.choose_guest("auto") == vmops.GuestChoice("kvm", None)


@pytest.mark.parametrize("guest", GUESTS)
def test_dirty_log_agrees_with_a_compare_tracker(guest: str) -> None:
    """The guest's own tracking (KVM's dirty log, or the software guest's owner marks) and a
    shadow-copy tracker, synced at the same pause points, name the same pages: every write
    of the guest changes its page (the iteration number is stored)."""
    from mappedram.engine.trackers import CompareTracker

    with vmops.make_guest(guest, 16) as vm:
        vm.start()
        vm.wait_filled(60)
        tracker = vmops._tracker(vm)
        cpu = vm.pause()
        shadow = CompareTracker(vm.memory, method="shadow")
        tracker.sync()  # the first KVM read also names pages the guest only read (program, params)
        for _ in range(3):
            vm.resume()
            time.sleep(0.1)
            later = vm.pause()
            a, b = tracker.sync(), shadow.sync()
            assert vmops._counter(later) > vmops._counter(cpu)
            assert a.sum() > 0 and (a == b).all(), f"{(a & ~b).sum()} only in the log, {(b & ~a).sum()} only compared"
            cpu = later


def test_demo_without_kvm_says_so_and_runs_the_software_guest() -> None:
    """Where /dev/kvm cannot be used, `demo` (guest auto) says why and runs the software guest."""
    code = (
        "import sys, mappedram.vmops as v, mappedram.cli as c\n"
        "v.kvm_available = lambda: '/dev/kvm: No such file or directory'\n"
        "sys.exit(c.main(['demo', '--mem', '16', '--warmup', '0.1', '--run', '0.1']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("note: KVM cannot be used here (/dev/kvm: No such file or directory)"), proc.stdout
    assert "16 MiB software guest" in proc.stdout and "demo OK" in proc.stdout

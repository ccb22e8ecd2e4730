"""The built-in guest saved live, restored into a fresh VM and resumed, end to end.

The KVM guest (the micro-VM) runs where /dev/kvm works; these tests skip only where it
does not, and say why. The software guest (the same workload on a thread) runs everywhere,
so the same flow is always tested. What must hold: the restored guest's RAM and vCPU state
equal the source's at the stop point, it runs on and stays exact; a mapped-ram file is
exactly its planned size whatever the number of passes, while a legacy stream of the same
workload grows with every pass; a save or demo says OK only when it converged within its
downtime limit.

Every guest here is driven step by step (``--step-batches``, ``--warmup-iterations``,
``--run-iterations``): it runs an exact number of batches before each dirty sync and is
paused otherwise, so each pass sees the same writes on any machine. Convergence is made
certain or impossible by the downtime limit (1000 s: the first pass converges; 0: no
pass can, since every step dirties pages).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mappedram
from mappedram.errors import FormatError
from mappedram.ops import CompareTracker, DirtyLimit
from mappedram.ops.converge import DirtyLimitController, dirty_limit_throttle
from mappedram.vm import ops as vmops
from mappedram.vm.cpustate import CPUSTATE_IDSTR, CpuState
from mappedram.vm.kvm import kvm_available
from mappedram.vm.softvm import SOFTCPU_IDSTR
from mappedram.vm.uffd import userfaultfd_problem

KVM_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
GUESTS = [pytest.param("kvm", marks=needs_kvm), "software"]
BATCH = 4096
#: Never converges (every step dirties pages) / always converges at the first check.
NEVER, ALWAYS = "0", "1000"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


def stepped(*args: str) -> list[str]:
    return ["--batch", str(BATCH), "--warmup-iterations", str(2 * BATCH), "--step-batches", "2", *args]


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_then_restore_resumes_exactly(tmp_path: Path, guest: str) -> None:
    out = tmp_path / "guest.mig"
    proc = run("vm", "save", str(out), "--guest", guest, "--mem", "32", *stepped("--max-passes", "3"),
               "--downtime-limit", NEVER, "--output", "json", check=False)  # fmt: skip
    saved = json.loads(proc.stdout)
    # three live passes could not converge with no downtime allowed: the command says so
    assert proc.returncode == 1 and not saved["ok"] and not saved["save"]["converged"], saved["save"]
    assert saved["save"]["stop_reason"] == "max-passes"
    assert saved["guest"] == guest and saved["source_check"]["ok"], saved["source_check"]
    live = saved["save"]
    assert len(live["passes"]) == 4 and live["passes"][-1]["stopped"], live["passes"]
    assert all(p["pages_dirtied"] > 0 for p in live["passes"][:-1])
    # warmup, then 2 batches before the first sync and after each of the 3 live passes
    assert saved["counter"] == 2 * BATCH + 4 * 2 * BATCH
    assert live["file_size"] == live["planned_size"] == out.stat().st_size
    assert run("verify", str(out)).returncode == 0
    with mappedram.open_file(out) as f:
        assert [b.idstr for b in f.blocks] == ["pc.ram"]
        assert [d.idstr for d in f.device_sections or []] == [CPUSTATE_IDSTR if guest == "kvm" else SOFTCPU_IDSTR]
    restored = json.loads(run("vm", "restore", str(out), "--run-iterations", str(3 * BATCH), "--output", "json").stdout)
    assert restored["ok"] and restored["guest"] == guest, restored
    assert restored["counter"] == saved["counter"]
    assert restored["at_restore"]["ram"]["mismatches"] == 0 and restored["at_restore"]["counter"] == saved["counter"]
    assert restored["counter_after"] == restored["counter"] + 3 * BATCH
    assert restored["after"]["ok"]


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_that_converges_says_ok(tmp_path: Path, guest: str) -> None:
    out = tmp_path / "guest.mig"
    proc = run("vm", "save", str(out), "--guest", guest, "--mem", "16", *stepped(), "--downtime-limit", ALWAYS)
    # With O_DIRECT pass 1 measures the speed of extents, which a final pass can take; through
    # the page cache the first pass of dirty pages (pass 2) gives the bandwidth the stop needs.
    passes = "1 live pass" if "direct-io on" in proc.stdout else "2 live passes"
    assert f"converged after {passes} (" in proc.stdout and "save OK" in proc.stdout, proc.stdout
    assert "limit 1000 s: met" in proc.stdout


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_with_dirty_limit_throttles_by_the_measured_rate(tmp_path: Path, guest: str) -> None:
    """The stepped guest dirties the same pages on any machine, so the trigger fires after the
    same pass; from then on each pass's throttle is the one that holds the rate the pass
    before measured to the quota (the rate itself depends on the machine: the relation does not)."""
    out = tmp_path / "guest.mig"
    proc = run("vm", "save", str(out), "--guest", guest, "--mem", "32", *stepped("--max-passes", "5"),
               "--downtime-limit", NEVER, "--dirty-limit", "--vcpu-dirty-limit", "2", "--output", "json",
               check=False)  # fmt: skip
    live = json.loads(proc.stdout)["save"]
    assert proc.returncode == 1 and live["stop_reason"] == "max-passes"  # no downtime allowed: not OK
    assert live["dirty_limit"] == 2 and not live["auto_converge"]
    replay = DirtyLimitController(DirtyLimit(vcpu_dirty_limit=2))
    passes = live["passes"]
    assert passes[0]["throttle"] == 0
    for p, after in itertools.pairwise(passes):  # the throttle a pass ran at: the replayed decision after the one before
        replay.after_pass(p["pages_dirtied"] * 4096, p["pages_written"] * 4096, p["dirty_rate"] * 4096)
        assert after["throttle"] == replay.pct, (p, after)
    assert replay.in_service  # every pass after the first dirties over half of what it sent
    human = run("vm", "save", str(out), "--guest", guest, "--mem", "16", *stepped("--max-passes", "3"),
                "--downtime-limit", ALWAYS, "--dirty-limit").stdout  # fmt: skip
    assert "dirty-limit 1 MB/s" in human and "save OK" in human, human
    conflict = run("vm", "save", str(out), "--dirty-limit", "--vcpu-dirty-limit", "0", check=False)
    assert conflict.returncode != 0 and "vcpu-dirty-limit must be at least 1 MB/s" in conflict.stderr


@pytest.mark.parametrize("guest", GUESTS)
def test_vm_save_with_dirty_limit_from_the_start_throttles_pass_1(tmp_path: Path, guest: str) -> None:
    """With the limit set before the save, the rate sampled first (the stepped guest runs its
    batches before that sync too) sets pass 1's throttle; each later pass follows the pass
    before, with no trigger to wait for."""
    out = tmp_path / "guest.mig"
    proc = run("vm", "save", str(out), "--guest", guest, "--mem", "32", *stepped("--max-passes", "3"),
               "--downtime-limit", NEVER, "--dirty-limit-from-start", "--vcpu-dirty-limit", "2", "--output", "json",
               check=False)  # fmt: skip
    live = json.loads(proc.stdout)["save"]
    assert proc.returncode == 1 and live["stop_reason"] == "max-passes" and live["dirty_limit"] == 2
    sample, passes = live["sample"], live["passes"]
    assert sample["pages_dirtied"] > 0 and sample["run_seconds"] > 0
    assert sample["throttle"] == dirty_limit_throttle(sample["dirty_rate"] * 4096, 2) > 0
    assert passes[0]["throttle"] == sample["throttle"]
    replay = DirtyLimitController(DirtyLimit(vcpu_dirty_limit=2, from_start=True))
    for p, after in itertools.pairwise(passes):
        replay.after_pass(p["pages_dirtied"] * 4096, p["pages_written"] * 4096, p["dirty_rate"] * 4096)
        assert after["throttle"] == replay.pct, (p, after)
    human = run("vm", "save", str(out), "--guest", guest, "--mem", "16", *stepped("--max-passes", "3"),
                "--downtime-limit", ALWAYS, "--dirty-limit-from-start").stdout  # fmt: skip
    assert "dirty-limit 1 MB/s (in service from the start:" in human and "save OK" in human, human


@pytest.mark.parametrize("guest", GUESTS)
def test_demo(tmp_path: Path, guest: str) -> None:
    proc = run("demo", "--guest", guest, "--mem", "32", *stepped("--downtime-limit", ALWAYS),
               "--run-iterations", str(BATCH), "--dir", str(tmp_path), "--output", "json")  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["ok"] and report["failures"] == [] and report["guest"] == guest, report
    assert all(report["source_match"].values()), report["source_match"]
    mapped, legacy = report["mapped_ram"], report["legacy"]
    assert mapped["converged"] and mapped["downtime_met"]
    assert mapped["file_size"] == mapped["planned_size"] == (tmp_path / "guest.mig").stat().st_size
    assert len(legacy["passes"]) == len(mapped["passes"])
    assert [p["throttle"] for p in legacy["passes"]] == [p["throttle"] for p in mapped["passes"]]
    assert legacy["file_size"] == (tmp_path / "guest-legacy.mig").stat().st_size
    modes = [r["restore"]["mode"] for r in report["restores"]]
    lazy = guest == "kvm" and userfaultfd_problem() is None
    assert modes == (list(vmops.RESTORE_MODES) if lazy else ["eager", "map"]), modes
    for r in report["restores"]:
        assert r["ok"] and r["counter_after"] == r["counter"] + BATCH, r
        assert r["seconds_to_first_instruction"] is not None
    for name in ("guest.mig", "guest-legacy.mig"):
        assert run("verify", str(tmp_path / name)).returncode == 0
    human = run("demo", "--guest", guest, "--mem", "16", *stepped("--downtime-limit", ALWAYS),
                "--run-iterations", str(BATCH)).stdout  # fmt: skip
    assert "demo OK" in human and "pass" in human and "legacy" in human and "downtime" in human
    assert "throttle" in human and "dirtied/s of guest run" in human


@pytest.mark.parametrize("guest", GUESTS)
def test_demo_that_misses_its_downtime_fails(tmp_path: Path, guest: str) -> None:
    """A demo whose live save cannot converge says which promise did not hold and exits 1."""
    proc = run("demo", "--guest", guest, "--mem", "16", *stepped("--max-passes", "2", "--downtime-limit", NEVER),
               "--run-iterations", str(BATCH), check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert "demo FAILED: the live save did not converge" in proc.stdout, proc.stdout
    assert "demo OK" not in proc.stdout


@pytest.mark.parametrize("guest", GUESTS)
def test_free_running_guest_saved_live_restores_exactly(tmp_path: Path, guest: str) -> None:
    """The guest runs freely while pass 1 syncs its dirty log as it goes (ops/passone.py),
    from the channels' threads: whatever the timing, the file holds the RAM it stopped with."""
    out = tmp_path / "free.mig"
    r = vmops.vm_save(out, vmops.GuestConfig(kind=guest, mem_mib=64), warmup_iterations=BATCH,
                      live=vmops.VM_LIVE_DEFAULTS.replace(max_passes=3, downtime_limit=0.0),
                      options=mappedram.ops.EngineOptions(channels=4))  # fmt: skip
    first = r.save.passes[0]
    assert 0 <= first.pages_caught <= first.pages_dirtied
    if not r.save.passes[1].stopped:  # (a pass 1 that caught every dirty page leaves nothing for a live pass 2)
        assert r.save.passes[1].pages_sent == first.pages_dirtied - first.pages_caught
    assert r.source_check is not None and r.source_check["ok"], r.source_check
    restored = json.loads(run("vm", "restore", str(out), "--output", "json").stdout)
    assert restored["counter"] == r.counter
    assert restored["at_restore"]["ram"]["mismatches"] == 0, restored["at_restore"]


def test_mapped_ram_bounded_legacy_grows_on_one_workload(tmp_path: Path) -> None:
    """Every pass has work (the guest runs 2 batches of 4096 random page writes over 4064
    data pages before each sync). The mapped-ram file stays at its planned size (only an
    18-byte empty PART section per pass is added); the legacy stream of the same workload
    grows by every pass."""
    sizes = {}
    for fmt in ("mapped-ram", "legacy"):
        for passes in (1, 6):
            r = vmops.vm_save(
                tmp_path / f"{fmt}-{passes}.mig",
                vmops.GuestConfig(kind="software", mem_mib=16),
                format=fmt,
                warmup_iterations=BATCH,
                step_batches=2,
                live=vmops.VM_LIVE_DEFAULTS.replace(max_passes=passes, downtime_limit=0.0),
                options=mappedram.ops.EngineOptions(channels=2),
            )
            assert r.source_check is not None and r.source_check["ok"]
            assert len(r.save.passes) == passes + 1 and r.save.stop_reason == "max-passes" and not r.ok
            sizes[fmt, passes] = r.save.file_size
            if fmt == "mapped-ram":
                assert r.save.file_size == r.save.planned_size
    assert sizes["mapped-ram", 6] - sizes["mapped-ram", 1] == 5 * 18, sizes
    assert sizes["mapped-ram", 6] < (16 << 20) + (2 << 20)  # RAM, its 1 MiB-aligned start, the stream
    assert sizes["legacy", 6] > 2.5 * sizes["legacy", 1] > 2.5 * (8 << 20), sizes


@pytest.mark.parametrize("guest", GUESTS)
def test_restore_rejects_a_damaged_vcpu_section_before_touching_memory(tmp_path: Path, guest: str) -> None:
    out = tmp_path / "guest.mig"
    vmops.vm_save(out, vmops.GuestConfig(kind=guest, mem_mib=16), warmup_iterations=BATCH, step_batches=1,
                  live=vmops.VM_LIVE_DEFAULTS.replace(max_passes=1))  # fmt: skip
    with mappedram.open_file(out) as f:
        (section,) = f.device_sections or []
        at = section.body_offset + section.body_length - 1  # the last byte of the body
    data = bytearray(out.read_bytes())
    cut = tmp_path / "cut.mig"
    cut.write_bytes(bytes(data[: at - 8]))  # cut inside the vCPU section: no trailer
    with pytest.raises(FormatError):
        vmops.vm_restore(cut)
    if guest == "kvm":  # a value no vCPU holds: rflags bit 1 is always set
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
    with vmops.make_guest(guest, vmops.GuestConfig(mem_mib=16, batch=BATCH)) as vm:
        cpu = vm.run_until(BATCH)
        tracker = vm.dirty_tracker()
        shadow = CompareTracker(vm.memory, method="shadow")
        tracker.sync()  # the first KVM read also names pages the guest only read (program, params)
        for _ in range(3):
            later = vm.run_until(cpu.counter + BATCH)
            a, b = tracker.sync(), shadow.sync()
            assert later.counter == cpu.counter + BATCH
            assert a.sum() > 0 and (a == b).all(), f"{(a & ~b).sum()} only in the log, {(b & ~a).sum()} only compared"
            cpu = later


def test_demo_without_kvm_says_so_and_runs_the_software_guest() -> None:
    """Where /dev/kvm cannot be used, `demo` (guest auto) says why and runs the software guest."""
    code = (
        "import sys, mappedram.vm.ops as v, mappedram.cli as c\n"
        "v.kvm_available = lambda: '/dev/kvm: No such file or directory'\n"
        f"sys.exit(c.main(['demo', '--mem', '16', *{stepped('--downtime-limit', ALWAYS)!r},"
        f" '--run-iterations', '{BATCH}']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("note: KVM cannot be used here (/dev/kvm: No such file or directory)"), proc.stdout
    assert "16 MiB software guest" in proc.stdout and "demo OK" in proc.stdout


def test_software_guest_start_then_pause_at_once_never_hangs() -> None:
    """A pause that comes before the guest's thread has even woken for the start must still
    return (a hang guard: 60 s for 200 start/pause pairs), and the guest stays exact."""
    import threading

    from mappedram.vm.softvm import SoftVM

    with SoftVM(16, batch=256) as vm:
        vm.run_until(0)
        done: list[bool] = []

        def flip() -> None:
            for _ in range(200):
                vm.resume()
                vm.pause()
            done.append(True)

        t = threading.Thread(target=flip, daemon=True)
        t.start()
        t.join(60)
        assert done, "a pause right after a start never returned"
        cpu = vm.pause()
        assert vm.check(cpu).ok
        assert vm.run_until(cpu.counter).counter == cpu.counter  # already there: nothing runs


@needs_kvm
def test_kvm_guest_run_until_a_point_already_reached_runs_nothing() -> None:
    with vmops.make_guest("kvm", vmops.GuestConfig(mem_mib=16, batch=BATCH)) as vm:
        assert vm.run_until(0).counter == 0
        cpu = vm.run_until(2 * BATCH)
        assert vm.run_until(BATCH).counter == cpu.counter == 2 * BATCH
        assert vm.run_until(2 * BATCH).counter == 2 * BATCH

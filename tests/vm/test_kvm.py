"""The micro-VM on /dev/kvm: the guest runs, the dirty log is exact, a paused guest is restored exactly.

The KVM tests skip only when /dev/kvm is absent or unusable (the reason is in the skip
message), with CI=true as without. The CpuState codec and the guest's source are tested
everywhere.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil
import time

import numpy as np
import pytest

from mappedram import open_file, ops
from mappedram.errors import FormatError, KvmError, TruncatedError, UsageError
from mappedram.format.encoder import encode_footer, encode_section_full
from mappedram.format.vmstate import split_device_sections
from mappedram.ops import EngineOptions
from mappedram.vm.cpustate import (
    CPUSTATE_IDSTR,
    CPUSTATE_MSRS,
    CPUSTATE_VERSION,
    CpuState,
    DescriptorTable,
    FpuState,
    Segment,
    vmdesc_device,
    vmdesc_fields,
)
from mappedram.vm.guest import (
    ASM_CONSTANTS,
    CODE_ADDR,
    FILL_TAG,
    MAX_BATCH,
    PAGE_SIZE,
    PARAMS_ADDR,
    STATUS_PAGE,
    expected_checksum,
    expected_ram_check,
    guest_pages,
    guest_values,
    pages_written,
    read_params,
    splitmix64,
)
from mappedram.vm.kvm import Kvm, kvm_available
from mappedram.vm.microvm import MicroVM, check_guest
from mappedram.vm.workload import LABELS, WORKLOAD

KVM_REASON = kvm_available()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")


# -- CpuState: the codec (pure) --------------------------------------------------------------


def _state(seed: int = 0) -> CpuState:
    rng = np.random.default_rng(seed)

    def u(bits: int) -> int:
        return int(rng.integers(0, 1 << bits, dtype=np.uint64)) if bits < 64 else int(rng.integers(0, 2**63)) * 2 + 1

    def seg() -> Segment:
        return Segment(base=u(64), limit=u(32), selector=u(16), type=u(4), present=1, dpl=3, db=0, s=1, l=1,
                       g=1, avl=0, unusable=0)  # fmt: skip

    regs = {name: u(64) for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                     "r11", "r12", "r13", "r14", "r15", "rip")}  # fmt: skip
    return CpuState(
        **regs, rflags=0x3046,
        cs=seg(), ds=seg(), es=seg(), fs=seg(), gs=seg(), ss=seg(), tr=seg(), ldt=seg(),
        gdt=DescriptorTable(u(64), u(16)), idt=DescriptorTable(u(64), u(16)),
        cr0=u(64), cr2=u(64), cr3=u(64), cr4=u(64), cr8=u(4), efer=u(64), apic_base=u(64),
        interrupt_bitmap=(u(64), 0, 0, 1 << 63),
        fpu=FpuState(fpr=rng.bytes(128), fcw=u(16), fsw=u(16), ftwx=u(8), last_opcode=u(11), last_ip=u(64),
                     last_dp=u(64), xmm=rng.bytes(256), mxcsr=u(32)),
        msrs=tuple(u(64) for _ in CPUSTATE_MSRS),
    )  # fmt: skip


def test_cpustate_round_trip_and_layout():
    for seed in range(5):
        state = _state(seed)
        body = state.encode()
        assert len(body) == CpuState.SIZE
        assert CpuState.decode(body) == state
        assert CpuState.decode(b"\xaa" * 7 + body + b"trailing", offset=7) == state
    # big-endian, fixed order: rax is the first be64, rflags the 18th
    state = _state(1)
    body = state.encode()
    assert body[:8] == state.rax.to_bytes(8, "big")
    assert body[17 * 8 : 18 * 8] == (0x3046).to_bytes(8, "big")
    assert body[-8:] == state.msrs[-1].to_bytes(8, "big")
    assert state.msr("msr_pat") == state.msrs[[n for n, _ in CPUSTATE_MSRS].index("msr_pat")]


def test_cpustate_vmdesc_fields_qemu_style():
    fields = vmdesc_fields()
    assert sum(f["size"] for f in fields) == CpuState.SIZE
    assert fields[0] == {"name": "rax", "type": "uint64", "size": 8}
    assert {"name": "cs.selector", "type": "uint16", "size": 2} in fields
    assert {"name": "cs.present", "type": "uint8", "size": 1} in fields
    assert {"name": "fpu.xmm", "type": "buffer", "size": 256} in fields
    assert {"name": "fpu.mxcsr", "type": "uint32", "size": 4} in fields
    assert len({f["name"] for f in fields}) == len(fields)  # QEMU makes duplicate names unique; we have none
    assert {f["type"] for f in fields} <= {"uint8", "uint16", "uint32", "uint64", "buffer"}
    device = vmdesc_device()
    assert (device["name"], device["instance_id"], device["vmsd_name"], device["version"]) == (
        CPUSTATE_IDSTR, 0, CPUSTATE_IDSTR, CPUSTATE_VERSION)  # fmt: skip
    assert list(device) == ["name", "instance_id", "vmsd_name", "version", "fields"]  # QEMU's key order


def test_cpustate_as_a_full_device_section():
    """The reader's section splitter finds the body where the vmdesc says, and it decodes."""
    state = _state(3)
    blob = encode_section_full(4, CPUSTATE_IDSTR, 0, CPUSTATE_VERSION) + state.encode() + encode_footer(4) + b"\x00"
    desc = json.loads(json.dumps({"page_size": PAGE_SIZE, "devices": [vmdesc_device()]}))
    (section,) = split_device_sections(blob, 0x1000, desc["devices"])
    assert (section.idstr, section.version_id, section.body_length) == (CPUSTATE_IDSTR, CPUSTATE_VERSION, CpuState.SIZE)
    assert CpuState.decode(blob, offset=section.body_offset - 0x1000) == state


def test_cpustate_decode_truncated_names_field_and_offset():
    body = _state(2).encode()
    fields = vmdesc_fields()
    starts = np.cumsum([0] + [f["size"] for f in fields])
    for cut in [0, 1, 7, 8, 9, 143, 144, 150, CpuState.SIZE - 1, *range(300, CpuState.SIZE, 97)]:
        with pytest.raises(TruncatedError) as info:
            CpuState.decode(b"\x00" * 5 + body[:cut], offset=5)
        index = int(np.searchsorted(starts, cut, side="right")) - 1  # the field the cut falls in
        assert info.value.field == fields[index]["name"], cut
        assert info.value.offset == 5 + int(starts[index])
        assert f"{CpuState.SIZE} bytes" in str(info.value)
    with pytest.raises(TruncatedError, match="cut off"):
        CpuState.decode(body, offset=len(body) + 3)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [("cs.present", 2, "not a boolean"), ("tr.unusable", 0xFF, "not a boolean"), ("ss.type", 16, "4 bits"),
     ("ds.dpl", 4, "privilege"), ("rflags", 0x3044, "rflags"), ("rflags", (1 << 40) | 2, "rflags")],
)  # fmt: skip
def test_cpustate_decode_bad_values(name, value, match):
    fields = vmdesc_fields()
    at = sum(f["size"] for f in fields[: [f["name"] for f in fields].index(name)])
    size = next(f["size"] for f in fields if f["name"] == name)
    body = bytearray(_state(4).encode())
    body[at : at + size] = value.to_bytes(size, "big")
    with pytest.raises(FormatError, match=match) as info:
        CpuState.decode(bytes(16) + bytes(body), offset=16)
    assert (info.value.field, info.value.offset, info.value.actual) == (name, 16 + at, value)


# -- the guest program ----------------------------------------------------------------------


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("objcopy") and shutil.which("nm")),
                    reason="GNU binutils (as, objcopy, nm) are not installed")  # fmt: skip
def test_shipped_guest_bytes_match_the_source():
    from tools.build_guest import SOURCE, assemble

    code, labels = assemble()
    assert code == WORKLOAD, "src/mappedram/vm/workload.py is stale: run tools/build_guest.py"
    assert labels["_start"] == 0
    equs = {m[1]: int(m[2], 0) for m in re.finditer(r"^\s*\.equ\s+(\w+),\s*(\S+)", SOURCE.read_text(), re.M)}
    assert equs == ASM_CONSTANTS


def test_splitmix64_reference_values():
    # Vigna's splitmix64.c seeded with 0 yields these; our z_i is its output with state seed + i.
    z = splitmix64(np.arange(3, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    assert [int(v) for v in z] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_kvm_missing_device_is_a_clear_error(tmp_path):
    with pytest.raises(KvmError, match="does not exist: this host has no KVM") as info:
        Kvm(str(tmp_path / "kvm"))
    assert (info.value.ioctl, info.value.errno) == ("open", errno.ENOENT)
    assert kvm_available(str(tmp_path / "kvm")) is not None


# -- the VM ---------------------------------------------------------------------------------


@needs_kvm
def test_guest_runs_exact_batches_and_the_rate_limit_holds():
    """run_until stops the guest exactly where asked; the rate limiter never lets it run ahead
    of its rate (an upper bound, which holds however fast or slow the machine is)."""
    with MicroVM(16, seed=3, batch=4096) as vm:
        first = vm.run_until(0)
        status = vm.status()
        assert status.phase == "loop" and status.paused and first.r8 == 0 and status.fill_done == vm.fill_pages
        second = vm.run_until(3 * 4096)
        assert second.r8 == 3 * 4096 and vm.status().counter == 3 * 4096
        assert vm.check(second).ok
        third = vm.run_until(second.r8 + 4096)
        assert third.r8 == 4 * 4096 and vm.check(third).ok
    rate, batch = 20_000.0, 500
    with MicroVM(16, seed=3, rate=rate, batch=batch) as slow:
        slow.run_until(0)
        started = time.monotonic()
        end = slow.run_until(10 * batch).r8
        elapsed = time.monotonic() - started
        # the limiter holds the guest back to ``rate`` from its first batch on: never faster
        assert end == 10 * batch
        assert end <= rate * elapsed + 2 * batch, (end, elapsed)


@needs_kvm
def test_throttle_sleeps_its_share_of_the_run_time():
    """At a throttle of pct %, the VMM sleeps pct / (100 - pct) of each batch's run time before
    entering the guest again (not after the batch it stops at): never more than 3x the run
    time at 75 %, and the wall time covers both."""
    with MicroVM(16, seed=4, batch=256) as vm:
        vm.run_until(0)
        assert vm.throttle_seconds() == 0.0
        vm.set_throttle(75)
        ran0, t0 = vm.run_seconds(), time.monotonic()
        cpu = vm.run_until(20 * 256)
        ran, wall, slept = vm.run_seconds() - ran0, time.monotonic() - t0, vm.throttle_seconds()
        assert cpu.r8 == 20 * 256 and vm.check(cpu).ok
        assert 0 < slept <= 3 * ran
        assert wall >= ran + slept
        vm.set_throttle(0)
        vm.run_until(cpu.r8 + 4 * 256)
        assert vm.throttle_seconds() == slept  # no throttle, no sleep
        with pytest.raises(UsageError, match=r"0 \.\. 99"):
            vm.set_throttle(100)


@needs_kvm
def test_dirty_log_is_exactly_what_the_guest_wrote():
    with MicroVM(32, seed=11, batch=1024) as vm:
        first = vm.run_until(2 * 1024)
        # Since the start: the filled pages, the pages the loop wrote so far, the status page,
        # and the params and program pages, which the guest only reads: KVM maps a page
        # writable at the guest's first access to it, read or write, and with dirty logging
        # on it marks the page dirty as it does (make_spte). Once cleared, those stay clean.
        dirty = vm.dirty_pages()
        params = read_params(vm.memory)
        expected = pages_written(vm.memory, 0, first.r8)
        expected[params.data_first : params.data_first + params.fill_pages] = True
        expected[[PARAMS_ADDR // PAGE_SIZE, STATUS_PAGE, CODE_ADDR // PAGE_SIZE]] = True
        assert np.array_equal(dirty, expected), np.flatnonzero(dirty != expected)[:20]
        assert not vm.dirty_pages().any()  # the log was cleared, and nothing runs while paused
        second = vm.run_until(first.r8 + 3 * 1024)
        dirty = vm.dirty_pages()
        assert second.r8 == first.r8 + 3 * 1024
        expected = pages_written(vm.memory, first.r8, second.r8)
        assert not expected[STATUS_PAGE]
        expected[STATUS_PAGE] = True  # the batch reports write it; nothing else is written
        assert np.array_equal(dirty, expected), np.flatnonzero(dirty != expected)[:20]
        # 3072 iterations over 8160 data pages: exactly the distinct pages they drew
        assert dirty.sum() == len(np.unique(guest_pages(params, first.r8, second.r8))) + 1


@needs_kvm
def test_dirty_log_turned_on_later():
    """A VM made without the log fills fast; turned on, the log is exact from then on."""
    with MicroVM(16, seed=2, batch=512, dirty_log=False) as vm:
        first = vm.run_until(512)
        with pytest.raises(UsageError, match="dirty log is off"):
            vm.dirty_pages()
        vm.set_dirty_log(True)
        vm.dirty_pages()
        second = vm.run_until(first.r8 + 4 * 512)
        expected = pages_written(vm.memory, first.r8, second.r8)
        expected[STATUS_PAGE] = True
        dirty = vm.dirty_pages()
        assert np.array_equal(dirty, expected), np.flatnonzero(dirty != expected)[:20]
        vm.set_dirty_log(False)
        with pytest.raises(UsageError):
            vm.dirty_pages()
        assert vm.check(second).ok


@needs_kvm
def test_pause_state_round_trip_and_ram_check():
    with MicroVM(32, seed=7, batch=2048) as vm:
        cpu = vm.run_until(5 * 2048)
        assert CpuState.decode(cpu.encode()) == cpu
        assert cpu.cs.l == 1 and cpu.cs.dpl == 3 and not cpu.rflags & (1 << 9)
        status = vm.status()
        assert status.paused and status.counter == cpu.r8 == 5 * 2048 and status.checksum == cpu.r9
        report = vm.check(cpu)
        assert report.ok, report.to_dict()
        assert report.counter == 5 * 2048 and report.ram.pages_hit > 0
        assert cpu.r9 == expected_checksum(7, cpu.r8)
        # the verifier sees a single wrong qword, anywhere in a page
        copy = np.frombuffer(bytearray(vm.memory), dtype=np.uint64).copy()
        params = read_params(vm.memory)
        hit = int(guest_pages(params, cpu.r8 - 1, cpu.r8)[0])
        zero_page = params.data_first + params.data_pages - 1
        for page, qword in ((hit, 0), (hit, 1), (params.data_first, 300), (zero_page, 511)):
            bad = copy.copy()
            bad[page * 512 + qword] ^= np.uint64(1)
            got = expected_ram_check(bad, cpu.r8)
            assert (got.mismatches, got.first_bad_page) == (1, page), (page, qword, got.to_dict())
        # a counter one off is caught too
        assert not expected_ram_check(copy, cpu.r8 - 1).ok
        assert int(copy[params.data_first * 512 + 5]) == FILL_TAG ^ params.data_first


@needs_kvm
def test_restored_guest_continues_exactly():
    with MicroVM(32, seed=5, batch=1024) as a:
        cpu = a.run_until(4 * 1024)
        assert a.check(cpu).ok
        state = CpuState.decode(cpu.encode())
        with MicroVM.from_state(state, 32, batch=1024) as b:
            with pytest.raises(UsageError):
                b.start()
            b.memory[:] = a.memory
            later = b.run_until(cpu.r8 + 2 * 1024)
            assert later.r8 == cpu.r8 + 2 * 1024
            report = b.check(later)
            assert report.ok, report.to_dict()
            assert report.ram.pages_hit > 0 and report.checksum == expected_checksum(5, later.r8)
            assert b.dirty_pages()[params_data_range(b)].any()  # B's own dirty log sees B's writes
        # A is untouched by B and goes on as well
        assert a.check(a.run_until(cpu.r8 + 1024)).ok


@needs_kvm
def test_pause_kicks_the_guest_mid_batch_and_the_state_checks_there():
    # a batch of 16 M iterations: a pause that waited for the batch's exit would wait for it
    with MicroVM(32, seed=11, batch=MAX_BATCH) as a:
        a.start()
        a.wait_filled(60)
        states = []
        for _ in range(20):
            cpu = a.pause()
            report = a.check(cpu)
            assert report.ok, (hex(cpu.rip), report.to_dict())
            states.append((cpu, report))
            a.resume()
        mid = [(c, r) for c, r in states if r.status_counter != c.r8]
        assert mid, "every pause waited for the end of a batch"
        assert all(r.unreported == c.r8 - r.status_counter for c, r in mid)


@needs_kvm
def test_restored_mid_batch_guest_continues_exactly():
    with MicroVM(32, seed=13, batch=MAX_BATCH) as a:
        a.start()
        a.wait_filled(60)
        cpu = a.pause()
        assert a.check(cpu).ok
        with MicroVM.from_state(CpuState.decode(cpu.encode()), 32) as b:
            b.memory[:] = a.memory
            b.resume()
            later = b.pause()
            report = b.check(later)
            assert report.ok, report.to_dict()
            assert later.r8 >= cpu.r8 and report.unreported == report.counter - report.status_counter


@needs_kvm
def test_restored_sse_state_survives_the_guest_running():
    # KVM_SET_FPU left XSTATE_BV alone, so the next XRSTOR zeroed the XMM registers it had
    # just been given, and KVM_GET_FPU read an MXCSR of 0 from a fresh vCPU (default 0x1f80)
    with MicroVM(32, seed=5, batch=1024) as a:
        cpu = a.run_until(2 * 1024)
        assert cpu.fpu.mxcsr == 0x1F80 and cpu.fpu.fcw == 0x37F  # the reset values (SDM vol. 1, 10.2.3)
        fpu = dataclasses.replace(cpu.fpu, xmm=bytes(range(256)), mxcsr=0x1F80 | 0x6000)  # round toward zero
        state = dataclasses.replace(cpu, fpu=fpu)
        with MicroVM.from_state(CpuState.decode(state.encode()), 32) as b:
            b.memory[:] = a.memory
            later = b.run_until(4 * 1024)  # the guest's own code touches neither
            assert later.r8 > cpu.r8 and b.check(later).ok
            assert later.fpu == fpu


@needs_kvm
def test_check_reads_how_far_the_iteration_got_from_rip():
    labels = {name: CODE_ADDR + LABELS[name] for name in ("stored", "summed", "counted")}
    with MicroVM(32, seed=3, batch=1024) as vm:
        cpu = vm.run_until(3 * 1024)  # after a batch's OUT: r13 = batch, status = r8
        assert check_guest(vm.memory, cpu).ok
        params = read_params(vm.memory)
        i = cpu.r8
        z = int(guest_values(params.seed, i, i + 1)[0])
        page = int(guest_pages(params, i, i + 1)[0])
        ram = bytearray(vm.memory)
        before = bytes(ram)
        words = np.frombuffer(ram, dtype=np.uint64)
        words[page * 512 : page * 512 + 2] = (i, z)  # iteration i's one store
        del words
        mask = (1 << 64) - 1
        stored = dataclasses.replace(cpu, rip=labels["stored"])
        summed = dataclasses.replace(stored, rip=labels["summed"], r9=(cpu.r9 + z) & mask)
        counted = dataclasses.replace(summed, rip=labels["counted"], r8=i + 1)
        for state in (stored, summed, counted):
            assert check_guest(ram, state).ok, state.rip
            assert not check_guest(before, state).ok, state.rip  # the store is not in RAM: caught
        # registers one step behind (or ahead) of rip are caught
        assert not check_guest(ram, dataclasses.replace(summed, r9=cpu.r9)).ok
        assert not check_guest(ram, dataclasses.replace(stored, r9=summed.r9)).ok
        assert not check_guest(ram, dataclasses.replace(counted, r8=i)).ok
        assert not check_guest(ram, dataclasses.replace(counted, r13=cpu.r13 - 1)).ok
        assert not check_guest(ram, cpu).ok  # at the batch's exit, RAM one iteration ahead


def params_data_range(vm: MicroVM) -> slice:
    params = read_params(vm.memory)
    return slice(params.data_first, params.data_first + params.data_pages)


@needs_kvm
def test_restore_mid_fill_and_through_a_file(tmp_path):
    """Pause during the fill, save RAM + CpuState with the mapped-ram writer, restore from the file, resume."""
    with MicroVM(64, seed=9, batch=4096) as a:
        a.start()
        cpu = a.pause()  # at the first exit after the start: during the fill, or just after it
        status = a.status()
        report = a.check(cpu)
        assert report.ok, report.to_dict()
        body = cpu.encode()
        blob = encode_section_full(3, CPUSTATE_IDSTR, 0, CPUSTATE_VERSION) + body + encode_footer(3) + b"\x00"
        vmdesc = json.dumps({"page_size": PAGE_SIZE, "devices": [vmdesc_device()]}).encode()
        ops.save(tmp_path / "guest.mig", {a.ram_idstr: a.memory}, device_state=blob, vmdesc=vmdesc, options=EngineOptions(channels=2))
    with open_file(tmp_path / "guest.mig") as f:
        (section,) = f.device_sections or []
        state = CpuState.decode(f.device_state(), offset=section.body_offset - f.device_state_offset)
        assert state == cpu
        with MicroVM.from_state(state, 64) as b:
            ops.restore(tmp_path / "guest.mig", {b.ram_idstr: b.memory})
            later = b.run_until(cpu.r8 + 4096)
            assert b.status().fill_done == b.fill_pages and later.r8 >= 4096
            assert status.fill_done <= b.fill_pages
            assert b.check(later).ok


@needs_kvm
def test_guest_failure_is_reported():
    """A vCPU whose RAM is not restored faults with no IDT: the error names the exit."""
    with MicroVM(16) as a:
        a.start()
        cpu = a.pause()
    with MicroVM.from_state(cpu, 16) as b:  # RAM left zero: no page tables, no program
        with pytest.raises(KvmError, match="the guest stopped") as info:
            b.run_until(1 << 40, timeout=60)
        assert info.value.exit_reason and info.value.exit_reason.startswith("KVM_EXIT_")


@needs_kvm
def test_kvm_errors_name_the_ioctl():
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0)
        assert (info.value.ioctl, info.value.errno) == ("KVM_CREATE_VCPU", errno.EEXIST)
        with pytest.raises(KvmError, match="MSR 0xdeadbeef"):
            vcpu.set_msrs([0xDEADBEEF], [0])
    with pytest.raises(UsageError):
        MicroVM(16, batch=0)
    with MicroVM(16, dirty_log=False) as vm, pytest.raises(UsageError, match="dirty_log=False"):
        vm.dirty_pages()
    with MicroVM(16) as vm:
        with pytest.raises(UsageError, match="new"):
            vm.pause()
        with pytest.raises(UsageError, match="start"):
            vm.resume()
        vm.start()
        with pytest.raises(UsageError, match="already started"):
            vm.start()
        with pytest.raises(UsageError, match="running"):
            vm.resume()
        vm.pause()
        vm.close()
        vm.close()  # idempotent
        with pytest.raises(UsageError, match="closed"):
            vm.status()

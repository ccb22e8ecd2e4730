"""Incremental snapshots and a real QEMU 10: QEMU refuses a child (its capability
``mappedram-child`` is not one QEMU knows, and it says so), and loads what ``flatten``
writes, its RAM then equal to the file the child was made from, byte for byte; children
of QEMU's own files (the test vectors, and a file QEMU saves here) too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import mappedram
from mappedram import ops
from mappedram.format.constants import CAP_MAPPEDRAM_CHILD
from tests.helpers.qemu_cases import (
    MAPPED_RAM,
    MULTIFD4,
    qemu_destination,
    qemu_load,
    qemu_pattern,
    qemu_save,
    resolved_machine,
    write_src_ram,
)
from tests.helpers.qemu_harness import BACKEND_ID, PAGE_SIZE, QemuError, first_mismatch, kvm_usable, require_qemu

pytestmark = pytest.mark.qemu

QEMU_10 = (10, 0, 0)


def _changed(ram: npt.NDArray[np.uint8], seed: int = 3) -> npt.NDArray[np.uint8]:
    """``ram`` with pages rewritten, made zero, and zero pages made non-zero (the first and the
    last page among them)."""
    pages = ram.reshape(-1, PAGE_SIZE).copy()
    rng = np.random.default_rng(seed)
    nonzero, zero = np.flatnonzero(pages.any(axis=1)), np.flatnonzero(~pages.any(axis=1))
    rewritten = np.unique(np.concatenate([[0, len(pages) - 1], rng.choice(nonzero, 300, replace=False)]))
    pages[rewritten, 8:16] ^= 0xA5
    pages[rng.choice(nonzero, 50, replace=False)] = 0
    pages[rng.choice(zero, 50, replace=False), PAGE_SIZE - 1] = 0x3C
    return pages.reshape(-1)


def _assert_dst_ram(tmp_path: Path, expected: Any, what: str) -> None:
    mismatch = first_mismatch((tmp_path / "dst.ram").read_bytes(), expected)
    assert mismatch is None, f"{what}: destination RAM differs: {mismatch}"


def _assert_refused(vm: Any, child: Path) -> None:
    with pytest.raises(QemuError) as failure:
        qemu_load(vm, child, MAPPED_RAM)
    assert vm.returncode is None, "QEMU exited although exit-on-error is false"
    # QEMU's qemu_loadvm_caps: "Received unknown capability %s", before it reads any RAM
    assert f"Received unknown capability {CAP_MAPPEDRAM_CHILD}" in vm.stderr, (failure.value.message, vm.stderr)
    assert "configuration/capabilities" in failure.value.message


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_qemu_refuses_a_child_and_loads_it_flattened(tmp_path: Path, machine: str) -> None:
    qemu_binary = require_qemu(QEMU_10)
    pattern = qemu_pattern()
    ram_b = _changed(pattern)
    a, b, child, flat = (tmp_path / n for n in ("a.mig", "b.mig", "c.mig", "flat.mig"))
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        machine_type = resolved_machine(vm)
        ops.save(a, {BACKEND_ID: pattern}, machine_type=machine_type)
        ops.save(b, {BACKEND_ID: ram_b}, machine_type=machine_type)
        report = ops.diff(a, b, write_child=child)
        assert report.child is not None and report.child.pages_changed == report.blocks[0].pages_differ > 300
        with mappedram.open_file(child) as mf:
            assert CAP_MAPPEDRAM_CHILD in mf.capabilities and mf.parent is not None
        _assert_refused(vm, child)
    dst = np.fromfile(tmp_path / "dst.ram", dtype=np.uint8)
    assert not dst.any(), "QEMU wrote guest RAM from a child it refused"
    ops.flatten(child, flat)
    assert flat.read_bytes() == b.read_bytes()
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        qemu_load(vm, flat, MULTIFD4)
    _assert_dst_ram(tmp_path, ram_b, f"flatten of a child on {machine}")


def _edited_copy(parent: Path, out: Path, offset: int = 0) -> npt.NDArray[np.uint8]:
    """Every block of ``parent`` with its device state, re-saved with m0's pages changed;
    returns m0 as ``out`` holds it."""
    with mappedram.open_file(parent, offset) as q:
        assert q.machine_type is not None and q.vmdesc is not None
        blocks: list[tuple[str, Any]] = []
        ram_b = None
        for blk in q.blocks:
            data = np.frombuffer(q.read_pages(blk, 0, blk.num_pages), dtype=np.uint8)
            if blk.idstr == BACKEND_ID:
                data = ram_b = _changed(data)
            blocks.append((blk.idstr, data))
        ops.save(out, blocks, machine_type=q.machine_type, device_state=q.device_state(), vmdesc=q.vmdesc.raw,
                 ram_section_id=q.ram_section_id)  # fmt: skip
    assert ram_b is not None
    return ram_b


def _load_child_of(tmp_path: Path, parent: Path, machine: str, qemu_binary: str) -> None:
    """A child of ``parent`` (one of QEMU's files) made from an edited copy: QEMU refuses it
    and loads its flattening, with the edited RAM."""
    edited, child, flat = tmp_path / "edited.mig", tmp_path / "c.mig", tmp_path / "flat.mig"
    ram_b = _edited_copy(parent, edited)
    report = ops.diff(parent, edited, write_child=child)
    assert report.child is not None and report.child.pages_changed > 300
    assert [(d.idstr, d.pages_differ) for d in report.blocks if d.pages_differ] == [(BACKEND_ID,
                                                                                     report.child.pages_changed)]  # fmt: skip
    ops.flatten(child, flat)
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        _assert_refused(vm, child)
    with qemu_destination(qemu_binary, machine, tmp_path) as vm:
        qemu_load(vm, flat, MAPPED_RAM)
    _assert_dst_ram(tmp_path, ram_b, f"flatten of a child of QEMU's {parent.name}")


@pytest.mark.parametrize("name", ["q35-64M-mapped-ram.mig", "pc-64M-mapped-ram.mig"])
def test_a_child_of_a_qemu_vector_flattened_loads(tmp_path: Path, vector: Any, name: str) -> None:
    qemu_binary = require_qemu(QEMU_10)
    if not kvm_usable():
        pytest.skip("the vectors were saved under KVM: their kvmclock section needs a KVM destination")
    path, offset = vector(name)
    assert offset == 0
    _load_child_of(tmp_path, path, "q35" if name.startswith("q35") else "pc", qemu_binary)


def test_a_child_of_a_file_qemu_saved_here_flattened_loads(tmp_path: Path) -> None:
    qemu_binary = require_qemu(QEMU_10)
    qemu_file = tmp_path / "qemu.mig"
    qemu_save(qemu_binary, "q35", write_src_ram(tmp_path), qemu_file, MAPPED_RAM)
    _load_child_of(tmp_path, qemu_file, "q35", qemu_binary)


def test_a_child_between_two_qemu_saves_of_the_same_guest(tmp_path: Path, vector: Any, expected_ram: bytes) -> None:
    """Two of QEMU's vectors of one guest (one channel and four): the child holds no page of
    m0 (the same RAM), B's device state; flattened, QEMU loads it."""
    qemu_binary = require_qemu(QEMU_10)
    if not kvm_usable():
        pytest.skip("the vectors were saved under KVM: their kvmclock section needs a KVM destination")
    a, _ = vector("q35-64M-mapped-ram.mig")
    b, _ = vector("q35-64M-mapped-ram-multifd4.mig")
    child, flat = tmp_path / "c.mig", tmp_path / "flat.mig"
    report = ops.diff(a, b, write_child=child)
    assert report.child is not None
    assert next(d for d in report.blocks if d.idstr == BACKEND_ID).pages_differ == 0
    with mappedram.open_file(child) as mf, mappedram.open_file(b) as mb:
        assert not mf.block(BACKEND_ID).own.any() and mf.device_state() == mb.device_state()
    ops.flatten(child, flat)
    with qemu_destination(qemu_binary, "q35", tmp_path) as vm:
        qemu_load(vm, flat, MAPPED_RAM)
    _assert_dst_ram(tmp_path, expected_ram, "flatten of a child between two QEMU saves")
    assert os.path.exists(a) and os.path.exists(b)

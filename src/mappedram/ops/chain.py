"""Incremental snapshots: write a child of a file, and flatten a chain (format/chain.py).

A child holds the pages changed since its parent, at the slots the same plan gives the
parent's, so the child can start as a reflink clone of the parent (FICLONE, on XFS or
btrfs: the unchanged pages share the parent's blocks, the changed ones are written over
them) or, where the filesystem cannot clone, as a sparse file holding the changed pages
only. Either way its bitmap marks exactly the changed pages (a page that became zero
too: its slot is made to read as zeros), its trailer names the parent by path, size and
RAM digest, and QEMU refuses it (capability ``mappedram-child``): ``flatten`` writes the
whole file QEMU loads. Readers read a chain directly (image.open_file opens the parents;
``ops.seal.check_chain`` checks their digests before a reader's first destination byte).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mappedram.engine.executor import run_tasks
from mappedram.engine.fileio import allocated_bytes, pwrite_full, reflink, truncate
from mappedram.engine.pages import PageSource, PageWriteChannel, WriteTask
from mappedram.errors import UsageError
from mappedram.format.bitmap import Bits, encode_bitmap
from mappedram.format.chain import MAX_CHAIN, ParentRef
from mappedram.format.constants import CAP_MAPPEDRAM_CHILD, CAP_MAPPEDRAM_ZSTD, TARGET_PAGE_SIZE
from mappedram.image import MigrationFile, open_file
from mappedram.layout import StreamSpec, plan_file

from .options import DEFAULTS, EngineOptions
from .protocol import CHUNK_PAGES, Written, commit, refuse_chain_file, refuse_symlink
from .relay import rewrite
from .seal import SealOptions, SealReport, content_digest, sealed_body
from .writer import SaveReport

__all__ = ["ChildReport", "write_child", "child_spec", "parent_ref", "flatten"]


@dataclass(slots=True)
class ChildReport:
    path: str
    parent: str
    parent_digest: str
    mode: str  # "reflink": a clone of the parent with the changed pages written over; "sparse"
    ram_bytes: int
    pages_changed: int
    pages_changed_zero: int  # changed pages that are zero now (marked, their slots read as zeros)
    bytes_written: int
    file_size: int
    allocated_bytes: int  # the child's blocks on disk (a reflink clone's shared blocks count too)
    parent_bytes_read: int  # read to compute the parent's digest
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    seal: SealReport | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def parent_ref(parent: MigrationFile, child_path: str, options: EngineOptions = DEFAULTS) -> tuple[ParentRef, int]:
    """How a child at ``child_path`` names ``parent``: its path relative to the child's
    directory, its size before its trailer and its RAM digest (read now); and the bytes
    read for the digest."""
    if parent.start_offset or parent.libvirt is not None:
        raise UsageError(f"{parent.path}: a parent must be a migration file of its own (not at an offset, not a "
                         "libvirt image): rewrite it first")  # fmt: skip
    digest, read = content_digest(parent, options.replace(progress=None, on_start=None))
    here = os.path.dirname(os.path.abspath(child_path))
    rel = os.path.relpath(os.path.abspath(parent.path), here)
    return ParentRef(rel, stream_bytes(parent), digest), read


def stream_bytes(mf: MigrationFile) -> int:
    """A file's bytes before its vmdesc trailer (all of it without one)."""
    return mf.vmdesc.offset if mf.vmdesc is not None else mf.file_size


def child_spec(base: StreamSpec, ref: ParentRef) -> StreamSpec:
    """``base`` (the child's machine, device state and trailer) as a child's spec."""
    caps = tuple(c for c in base.capabilities if c not in (CAP_MAPPEDRAM_ZSTD, CAP_MAPPEDRAM_CHILD))
    return StreamSpec(
        machine_type=base.machine_type, capabilities=(*caps, CAP_MAPPEDRAM_CHILD),
        ram_section_id=base.ram_section_id, parts=base.parts, switchover_start=base.switchover_start,
        device_state=base.device_state, vmdesc=base.vmdesc, parent=ref,
    )  # fmt: skip


def write_child(
    target: str | os.PathLike[str],
    parent: MigrationFile,
    sources: Sequence[tuple[str, int, PageSource]],
    changed: Sequence[Bits],
    base: StreamSpec,
    *,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
    ref: tuple[ParentRef, int] | None = None,
) -> ChildReport:
    """Write a child of ``parent``: ``changed[i]`` marks the pages of block i to take from
    ``sources[i]`` (the blocks are the parent's, in its order); ``base`` gives the child's
    machine, device state and trailer. ``ref`` is the parent's reference when the caller
    has it already (else it is computed: the parent is read whole)."""
    path = os.fspath(target)
    refuse_symlink(path)
    refuse_chain_file(parent, path, "write a child")
    if len(parent.chain) > MAX_CHAIN:
        raise UsageError(f"{parent.path} is the end of a chain of {len(parent.chain)} files, the most a reader "
                         f"opens ({MAX_CHAIN} children over a whole file): flatten it first")  # fmt: skip
    blocks = [(n, size) for n, size, _ in sources]
    if blocks != [(b.idstr, b.used_length) for b in parent.blocks] or len(changed) != len(blocks):
        raise UsageError(f"{path}: a child holds the parent's RAM blocks, and {parent.path} has others")
    t0 = time.perf_counter()
    pref, read = ref if ref is not None else parent_ref(parent, path, options)
    spec = child_spec(base, pref)
    ps = parent.page_size
    plan = plan_file(blocks, spec, page_size=ps)
    # a clone shares the parent's pages only where the child's plan puts them at the same slots
    # (a parent that is a child too: its 0-bit slots may hold anything, as a clone's may)
    same = parent.start_offset == 0 and all(
        b.layout is not None and b.zstd is None and b.layout.pages_offset == lay.pages_offset
        for lay, b in zip(plan.ram.blocks, parent.blocks)
    )
    notes: list[str] = []
    mode = ["sparse"]
    counts = {"changed": 0, "zero": 0}
    bits = [np.zeros(len(c), dtype=np.bool_) for c in changed]

    def body(fd: int, work: str) -> Written:
        t1 = time.perf_counter()
        if same and reflink(parent.path, fd, work):
            mode[0] = "reflink"
        tasks: list[WriteTask] = []
        for i, (lay, c) in enumerate(zip(plan.ram.blocks, changed)):
            mask = np.asarray(c, dtype=np.bool_)
            for first in range(0, len(mask), CHUNK_PAGES):
                m = mask[first : first + CHUNK_PAGES]
                if m.any():
                    tasks.append(WriteTask(i, first, len(m), lay.pages_offset + first * ps,
                                           bits[i][first : first + len(m)], mask=m, defined=True))  # fmt: skip
        made: list[PageWriteChannel] = []

        def channel(_: int) -> PageWriteChannel:
            ch = PageWriteChannel(work, [s for _, _, s in sources], ps, CHUNK_PAGES)
            made.append(ch)
            return ch

        if tasks:
            run_tasks(tasks, channel, channels=max(1, min(options.channels, len(tasks))), progress=options.progress)
        t2 = time.perf_counter()
        for lay, b in zip(plan.ram.blocks, bits):
            pwrite_full(fd, encode_bitmap(b), lay.bitmap_offset, work)
        pwrite_full(fd, plan.head, plan.start, work)
        for at, data in plan.entries:
            pwrite_full(fd, data, at, work)
        pwrite_full(fd, plan.tail, plan.ram.eos_offset, work)
        truncate(fd, plan.file_size, work)  # a clone is the parent's length
        counts["changed"] = sum(int(np.count_nonzero(b)) for b in bits)
        counts["zero"] = sum(ch.pages_punched for ch in made)
        written = sum(ch.bytes_written for ch in made)
        return Written(pages=sum(len(c) for c in changed), pages_written=counts["changed"], bytes_written=written,
                       channels=options.channels, file_size=plan.file_size, machine_type=spec.machine_type,
                       seconds={"setup": t1 - t0, "pages": t2 - t1, "finalize": time.perf_counter() - t2})  # fmt: skip

    written = commit(path, None, options.durable, notes, sealed_body(body, seal, 0, options))
    if mode[0] == "sparse" and same:
        notes.append("the filesystem cannot clone (FICLONE): the child is a sparse file of the changed pages")
    return ChildReport(
        path=path, parent=parent.path, parent_digest=pref.digest.hex(), mode=mode[0],
        ram_bytes=written.pages * TARGET_PAGE_SIZE, pages_changed=counts["changed"],
        pages_changed_zero=counts["zero"], bytes_written=written.bytes_written, file_size=written.file_size,
        allocated_bytes=allocated_bytes(path), parent_bytes_read=read, seconds=written.seconds, notes=notes,
        seal=written.seal,
    )  # fmt: skip


def flatten(
    child: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """Write a chain's newest file as one whole mapped-ram file QEMU loads (the chain's
    digests are checked first)."""
    with open_file(child) as mf:
        if mf.parent is None:
            raise UsageError(f"{mf.path}: not a child file ({mf.format_name}): nothing to flatten; `rewrite` "
                             "re-lays it")  # fmt: skip
    return rewrite(child, path, options=options, seal=seal)  # which checks the chain first

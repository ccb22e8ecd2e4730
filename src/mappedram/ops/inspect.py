"""Look at files: ``info`` (what a file holds), ``verify`` (is it well formed), ``diff`` (which pages differ).

Nothing here writes: each returns a report, which the CLI renders (``to_dict()`` for JSON).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs
from mappedram.engine.copy import CompareChannel, PageCompare
from mappedram.engine.executor import run_tasks
from mappedram.engine.fileio import allocated_bytes
from mappedram.engine.store import StoreSpec
from mappedram.errors import FormatError, IOEngineError, UsageError
from mappedram.format.libvirt import QemuSaveFormat
from mappedram.format.vmdesc import trailer_mismatches
from mappedram.image import MigrationFile, RamBlock, open_file
from mappedram.layout import plan_mapped_ram

from .chain import ChildReport, parent_ref
from .chain import write_child as write_child_file
from .options import DEFAULTS, EngineOptions
from .protocol import CHUNK_PAGES, refuse_chain_file
from .relay import spec_from
from .seal import SEAL_CHECK, SealCheck, SealInfo, SealOptions, check_chain, content_digest, seal_info, verify_seal

__all__ = [
    "BlockInfo",
    "DeviceInfo",
    "LibvirtInfo",
    "InfoReport",
    "Problem",
    "VerifyReport",
    "info",
    "verify",
    "BlockDiff",
    "DiffReport",
    "diff",
]


@dataclass(frozen=True, slots=True)
class BlockInfo:
    idstr: str
    used_length: int
    num_pages: int
    pages_present: int
    pages_zero: int
    entry_offset: int
    bitmap_offset: int | None = None
    bitmap_size: int | None = None
    pages_offset: int | None = None
    gpa: int | None = None
    page_records: int | None = None  # legacy: records over all passes
    pages_own: int | None = None  # a child: the pages it holds itself (changed since its parent)
    zstd_frames: int | None = None  # a compressed block: its frames of zstd_frame_bytes each
    zstd_frame_bytes: int | None = None
    zstd_region_length: int | None = None  # bytes of the compressed page region


@dataclass(frozen=True, slots=True)
class ChainMember:
    """One file of a chain, newest first: the last is the whole file the chain starts from."""

    path: str
    format: str
    file_size: int
    allocated_bytes: int
    pages_own: int  # pages this file holds (a child: changed since its parent)
    parent: str | None  # as the file names it


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    idstr: str
    instance_id: int
    section_id: int
    version_id: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class LibvirtInfo:
    """The libvirt save image header before the QEMU stream, and the domain its XML describes."""

    header_offset: int
    magic: str
    version: int
    byteorder: str
    data_len: int
    was_running: bool
    format: str  # libvirt's name: raw, sparse, gzip, ...
    format_id: int
    cookie_offset: int
    xml_offset: int
    xml_length: int  # bytes of XML text, without its NUL
    cookie_length: int | None
    stream_offset: int
    name: str | None
    uuid: str | None
    domain_type: str | None
    memory_value: int | None
    memory_unit: str | None
    memory_bytes: int | None
    machine: str | None
    arch: str | None


def _libvirt_info(mf: MigrationFile) -> LibvirtInfo | None:
    lv = mf.libvirt
    if lv is None:
        return None
    h, d = lv.header, lv.domain
    return LibvirtInfo(
        header_offset=lv.header_offset,
        magic=h.magic.decode("ascii"),
        version=h.version,
        byteorder=h.byteorder,
        data_len=h.data_len,
        was_running=bool(h.was_running),
        format=lv.save_format.label,
        format_id=h.format,
        cookie_offset=h.cookie_offset,
        xml_offset=lv.xml_offset,
        xml_length=len(lv.xml.encode("utf-8")),
        cookie_length=None if lv.cookie is None else len(lv.cookie.encode("utf-8")),
        stream_offset=lv.stream_offset,
        name=d.name,
        uuid=d.uuid,
        domain_type=d.domain_type,
        memory_value=d.memory_value,
        memory_unit=d.memory_unit,
        memory_bytes=d.memory_bytes,
        machine=d.machine,
        arch=d.arch,
    )


@dataclass(frozen=True, slots=True)
class InfoReport:
    path: str
    offset: int
    file_size: int
    allocated_bytes: int
    format: str
    machine_type: str | None
    capabilities: list[str]
    page_size: int
    ram_section_id: int
    mem_size: int
    part_sections: int
    switchover_start: bool
    blocks: list[BlockInfo]
    device_state_offset: int
    device_state_length: int
    devices: list[DeviceInfo] | None
    vmdesc_offset: int | None
    vmdesc_length: int | None
    libvirt: LibvirtInfo | None = None
    seal: SealInfo | None = None
    chain: list[ChainMember] | None = None  # a child: it, its parent, ... (newest first)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _block_info(b: RamBlock) -> BlockInfo:
    lay = b.layout
    return BlockInfo(
        idstr=b.idstr,
        used_length=b.used_length,
        num_pages=b.num_pages,
        pages_present=b.pages_present,
        pages_zero=b.pages_zero,
        entry_offset=b.entry_offset,
        bitmap_offset=lay.bitmap_offset if lay else None,
        bitmap_size=lay.bitmap_size if lay else None,
        pages_offset=lay.pages_offset if lay else None,
        gpa=b.gpa,
        page_records=None if b.legacy_sources is None else b.legacy_records,
        pages_own=None if b.parent is None else int(np.count_nonzero(b.own)),
        zstd_frames=None if lay is None or lay.zstd is None else lay.zstd.frames,
        zstd_frame_bytes=None if lay is None or lay.zstd is None else lay.zstd.frame_pages * b.page_size,
        zstd_region_length=None if lay is None or lay.zstd is None else lay.zstd.region_length,
    )


def _chain(mf: MigrationFile) -> list[ChainMember] | None:
    if mf.parent is None:
        return None
    return [
        ChainMember(m.path, m.format_name, m.file_size, allocated_bytes(m.path),
                    sum(int(np.count_nonzero(b.own)) for b in m.blocks),
                    None if m.parent_ref is None else m.parent_ref.path)
        for m in mf.chain
    ]  # fmt: skip


def _info_from(mf: MigrationFile) -> InfoReport:
    devices = None
    if mf.device_sections is not None:
        devices = [
            DeviceInfo(d.idstr, d.instance_id, d.section_id, d.version_id, d.offset, d.end - d.offset)
            for d in mf.device_sections
        ]
    return InfoReport(
        path=mf.path,
        offset=mf.start_offset,
        file_size=mf.file_size,
        allocated_bytes=allocated_bytes(mf.path),
        format=mf.format_name,
        machine_type=mf.machine_type,
        capabilities=list(mf.capabilities),
        page_size=mf.page_size,
        ram_section_id=mf.ram_section_id,
        mem_size=mf.mem_size,
        part_sections=sum(1 for s in mf.sections if s.kind == "PART"),
        switchover_start=any(s.kind == "COMMAND" for s in mf.sections),
        blocks=[_block_info(b) for b in mf.blocks],
        device_state_offset=mf.device_state_offset,
        device_state_length=mf.device_state_length,
        devices=devices,
        vmdesc_offset=mf.vmdesc.offset if mf.vmdesc else None,
        vmdesc_length=len(mf.vmdesc.raw) if mf.vmdesc else None,
        libvirt=_libvirt_info(mf),
        seal=seal_info(mf),
        chain=_chain(mf),
    )


def info(path: str | os.PathLike[str], offset: int = 0, *, options: EngineOptions = DEFAULTS) -> InfoReport:
    """Describe a migration file, in the manner of ``qemu-img info`` (``options.progress``:
    the bytes of the file decoded, for a legacy stream that is read whole)."""
    with _open(path, offset, options) as mf:
        return _info_from(mf)


def _open(path: str | os.PathLike[str], offset: int, options: EngineOptions) -> MigrationFile:
    if options.progress is not None:
        try:
            options.started(max(0, os.path.getsize(path) - offset))
        except OSError:
            pass  # open_file names the problem
    return open_file(path, offset, progress=options.progress)


@dataclass(frozen=True, slots=True)
class Problem:
    message: str
    offset: int | None
    field: str | None = None
    expected: str | None = None
    actual: str | None = None
    block: str | None = None
    error: str = "FormatError"

    @classmethod
    def from_error(cls, exc: FormatError) -> Problem:
        return cls(
            message=exc.message,
            offset=exc.offset,
            field=exc.field,
            expected=None if exc.expected is None else str(exc.expected),
            actual=None if exc.actual is None else str(exc.actual),
            block=exc.block,
            error=type(exc).__name__,
        )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    path: str
    offset: int
    ok: bool
    format: str | None
    checks: list[str]
    problems: list[Problem]
    notes: list[str] = field(default_factory=list)
    error_text: str | None = None
    data: bool = False  # page data checked against the seal was asked for
    seal: SealCheck | None = None  # what was found of the seal (with ``data``: its digests checked)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_STRUCTURE_CHECKS = [
    "stream header: QEVM magic, version 3",
    "configuration section: machine type, capabilities",
    "RAM section: START/PART/END framing, section ids, footers",
    "MEM_SIZE total equals the sum of the block lengths",
    "RAM records: only flags valid for the format; legacy pages inside their block",
    "mapped-ram headers: version 1, page size, page regions page-aligned",
    "regions inside the file and disjoint (headers, bitmaps, page regions)",
    "bitmaps readable, no bit past the end of a block",
    "device state delimited by the vmdesc, ends with QEMU_VM_EOF",
    "vmdesc trailer is valid JSON and ends the file",
    "vmdesc trailer describes the stream as QEMU's analyze-migration.py reads it: page_size, the configuration "
    "entry (every subsection the stream holds, none it lacks), each device's version, fields and subsections",
]

_LIBVIRT_CHECKS = [
    "libvirt header: magic LibvirtQemudSave (not an incomplete save), version, known format, not compressed",
    "libvirt data: data_len inside the file, cookieOffset inside data_len, XML and cookie NUL-terminated UTF-8",
    "libvirt domain XML: parses, a <domain> (name, memory, os/type machine)",
    "libvirt format matches the stream (sparse: mapped-ram; raw: legacy)",
    "libvirt domain XML machine type equals the stream's",
]


def verify(
    path: str | os.PathLike[str], offset: int = 0, *, data: bool = False, seal: SealOptions = SEAL_CHECK,
    options: EngineOptions = DEFAULTS,
) -> VerifyReport:  # fmt: skip
    """Check the whole structure of a file; the report names the first problem found.

    QEMU's format has no checksums of page data; a sealed file's seal is checked to cover
    every block and chunk. With ``data``, every digest of the seal is checked against the
    data (``seal.key``: the key of a keyed seal): the file is OK only if they all match, so
    an unsealed file, or a keyed one without the key, is not OK (the report says why).
    """
    spath = os.fspath(path)
    try:
        # with data, the progress shown is the digests' (one bar: the decode is not shown)
        mf = _open(spath, offset, options.replace(progress=None, on_start=None) if data else options)
    except FormatError as exc:
        return VerifyReport(spath, offset, False, None, [], [Problem.from_error(exc)], error_text=str(exc),
                            data=data)  # fmt: skip
    with mf:
        problems: list[Problem] = []
        notes: list[str] = []
        checks = list(_STRUCTURE_CHECKS)
        if mf.libvirt is not None:
            checks = _LIBVIRT_CHECKS + checks
            _check_libvirt(mf, problems)
            notes.append(
                f"libvirt save image ({mf.libvirt.save_format.label}) of domain {mf.libvirt.domain.name!r}; "
                f"QEMU stream at {mf.libvirt.stream_offset:#x}"
            )
        _check_device_ids(mf, problems)
        _check_trailer(mf, problems)
        if mf.compressed:
            checks = [c.replace("mapped-ram headers: version 1", "mapped-ram headers: version 0x5a000001 (compressed)")
                      for c in checks]  # fmt: skip
            checks.append("compressed page regions: the region header (frame size, one frame per run of pages), "
                          "the zstd seek table (frame count, each frame's sizes against its pages and zstd's "
                          "bound, frames and table filling the region)")  # fmt: skip
        elif mf.mapped_ram:
            _note_layout(mf, notes)
        if mf.parent is not None:
            checks.append(f"chain: {len(mf.chain) - 1} parent(s) found by the paths the children name, each of "
                          "the size recorded and holding the same RAM blocks, no cycle")  # fmt: skip
            if data and not problems:
                _check_chain_data(mf, options, checks, problems)
        if data and mf.compressed and not problems:
            _check_frames(mf, options, checks, problems)
        if not mf.vmdesc:
            notes.append("no vmdesc trailer: device sections not delimited")
        checks.append("device section ids unique and distinct from the RAM section's")
        check = _check_seal(mf, data, seal, options, checks, problems)
        ok = not problems and (not data or check.ok)
        text = None
        if data and check.status == "mismatch":
            text = f"{spath}: {check.message}"  # each mismatch is in problems (and rendered below it)
        elif problems:
            text = _problem_text(spath, problems[0])
        elif not ok:
            text = f"{spath}: {check.message}"
        return VerifyReport(spath, offset, ok, mf.format_name, checks, problems, notes, text, data, check)


def _check_seal(mf: MigrationFile, data: bool, seal: SealOptions, options: EngineOptions, checks: list[str],
                problems: list[Problem]) -> SealCheck:  # fmt: skip
    """The seal's structure (checked by open_file) and, with ``data``, its digests."""
    s = mf.seal
    if s is not None:
        checks.append(f"seal ({s.algorithm}{', keyed' if s.keyed else ''}): version {s.version}, one digest "
                      f"per {s.chunk_bytes >> 10} KiB chunk of every block ({s.chunks} chunks), lengths right")
    if not data:
        if s is None:
            return SealCheck(mf.path, "unsealed", "the file is not sealed: its page data cannot be checked", False)
        return SealCheck(mf.path, "structure", "the seal's structure was checked, not the data (--data)", True,
                         s.algorithm, s.keyed, s.chunk_bytes, s.chunks)  # fmt: skip
    if problems:
        return SealCheck(mf.path, "structure", "the data was not checked: the file's structure is wrong", s is not None)
    check = verify_seal(mf, options, key=seal.key)
    if check.ok:
        checks.append(f"page data: every digest of the seal matches ({check.chunks} chunks, {check.chunks_read} "
                      "read, the others hold no stored page)")  # fmt: skip
    for m in check.mismatches:
        field = "seal " + ("state" if m.kind == "state" else "chunk")
        problems.append(Problem(f"differs from the seal: {m.message}", m.file_offset, field,
                                expected="the digest the seal holds", actual="another digest", block=m.block,
                                error="IntegrityError"))  # fmt: skip
    return check


def _check_chain_data(mf: MigrationFile, options: EngineOptions, checks: list[str], problems: list[Problem]) -> None:
    try:
        read = check_chain(mf, options.replace(progress=None, on_start=None))
    except FormatError as exc:
        problems.append(Problem.from_error(exc))
        return
    except IOEngineError as exc:
        problems.append(Problem(str(exc), exc.offset, "read", error=type(exc).__name__))
        return
    checks.append(f"chain: every parent's RAM digest matches the one its child recorded ({_gib(read)} read)")


def _check_frames(mf: MigrationFile, options: EngineOptions, checks: list[str], problems: list[Problem]) -> None:
    """Decompress every frame that holds data: zstd checks each frame's content checksum."""
    try:
        _, read = content_digest(mf, options.replace(progress=None, on_start=None))
    except FormatError as exc:
        problems.append(Problem.from_error(exc))
        return
    except IOEngineError as exc:
        problems.append(Problem(str(exc), exc.offset, "read", error=type(exc).__name__))
        return
    frames = sum(b.zstd.offsets.size for b in mf.blocks if b.zstd is not None)
    checks.append(f"compressed pages: every zstd frame with data decompresses to its pages, its checksum right "
                  f"({frames} frames, {_gib(read)} of RAM read)")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _problem_text(path: str, p: Problem) -> str:
    exc = FormatError(p.message, offset=p.offset, field=p.field, expected=p.expected, actual=p.actual, path=path)
    return str(exc)


def _check_libvirt(mf: MigrationFile, problems: list[Problem]) -> None:
    """libvirt restores a ``sparse`` image with mapped-ram on and a ``raw`` one with it off:
    QEMU refuses a stream that disagrees. The XML's machine must be the stream's."""
    lv = mf.libvirt
    assert lv is not None
    want = "mapped-ram" if lv.save_format is QemuSaveFormat.SPARSE else "legacy"
    if mf.format_name != want:
        problems.append(
            Problem(
                f"libvirt format {lv.save_format.label!r} needs a {want} stream (libvirt restores it with "
                f"mapped-ram {'on' if want == 'mapped-ram' else 'off'})",
                lv.header_offset + 28,
                "format",
                expected=f"a {want} stream",
                actual=f"a {mf.format_name} stream",
            )
        )
    machine = lv.domain.machine
    if machine is not None and mf.machine_type is not None and machine != mf.machine_type:
        problems.append(
            Problem(
                "libvirt domain XML names another machine type than the stream",
                lv.xml_offset + len(lv.xml[: max(0, lv.xml.find("machine="))].encode("utf-8")),
                "os/type@machine",
                expected=mf.machine_type,
                actual=machine,
            )
        )


def _check_device_ids(mf: MigrationFile, problems: list[Problem]) -> None:
    seen: dict[int, str] = {mf.ram_section_id: "ram"}
    for d in mf.device_sections or []:
        if d.section_id in seen:
            problems.append(
                Problem(
                    "section id used twice",
                    d.offset + 1,
                    "section_id",
                    expected=f"an id not used by {seen[d.section_id]!r}",
                    actual=str(d.section_id),
                    block=None,
                )
            )
            return
        seen[d.section_id] = d.idstr


def _check_trailer(mf: MigrationFile, problems: list[Problem]) -> None:
    """The trailer describes the stream as QEMU's tools read it (format/vmdesc.py)."""
    if mf.vmdesc is None:
        return
    found = trailer_mismatches(
        mf.vmdesc,
        mf.configuration,
        mf.configuration_bytes(),
        mf.device_sections or [],
        mf.device_state(),
        mf.device_state_offset,
        mf.page_size,
    )
    problems.extend(Problem.from_error(exc) for exc in found)


def _note_layout(mf: MigrationFile, notes: list[str]) -> None:
    """Say where a file departs from the layout QEMU's writer produces (legal, but unusual)."""
    laid = [b for b in mf.blocks if b.layout is not None]
    if not laid or any(b.skipped for b in mf.blocks):
        return
    plan = plan_mapped_ram(
        [(b.idstr, b.used_length) for b in laid],
        entries_offset=laid[0].entry_offset,
        page_size=mf.page_size,
        with_gpa=mf.configuration.ignore_shared,
    )
    for want, b in zip(plan.blocks, laid):
        assert b.layout is not None
        if want != b.layout:
            notes.append(
                f"block {b.idstr!r}: layout differs from QEMU's writer "
                f"(bitmap {b.layout.bitmap_offset:#x}, pages {b.layout.pages_offset:#x}; "
                f"QEMU would use {want.bitmap_offset:#x}, {want.pages_offset:#x})"
            )


@dataclass(frozen=True, slots=True)
class BlockDiff:
    idstr: str
    size_a: int
    size_b: int
    pages_compared: int  # pages present in either file (the others are zero in both)
    pages_differ: int
    ranges: list[tuple[int, int]]  # (first page, pages) of each run of differing pages


@dataclass(frozen=True, slots=True)
class DiffReport:
    a: str
    b: str
    blocks: list[BlockDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    seconds: float
    child: ChildReport | None = None  # --write-child: the child of A holding B's changes

    @property
    def identical(self) -> bool:
        return (
            not self.only_in_a
            and not self.only_in_b
            and all(d.pages_differ == 0 and d.size_a == d.size_b for d in self.blocks)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["identical"] = self.identical
        return d


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    offset_a: int = 0,
    offset_b: int = 0,
    options: EngineOptions = DEFAULTS,
    write_child: str | os.PathLike[str] | None = None,
    seal: SealOptions | None = None,
) -> DiffReport:
    """Pages that differ between two files' RAM blocks (matched by idstr), as counts and ranges.

    Bitmaps (or the legacy page index) first: pages absent from both files are zero in
    both and never read; the others are read in large extents and compared. A chain's
    parents are checked first (ops.seal.check_chain). ``write_child`` writes a child of
    ``a`` holding the pages of ``b`` that differ, and ``b``'s device state and trailer
    (ops/chain.py; ``seal`` seals it): ``a`` and ``b`` must hold the same blocks.
    """
    start = time.perf_counter()
    with open_file(a, offset_a) as fa, open_file(b, offset_b) as fb:
        quiet = options.replace(progress=None, on_start=None)
        check_chain(fa, quiet)
        check_chain(fb, quiet)
        same_blocks = [(x.idstr, x.used_length) for x in fa.blocks] == [(x.idstr, x.used_length) for x in fb.blocks]
        if write_child is not None and not same_blocks:
            raise UsageError(f"{fb.path}: holds other RAM blocks than {fa.path}: a child holds its parent's blocks")
        if write_child is not None:
            refuse_chain_file(fb, write_child, "write a child")
        ref = parent_ref(fa, os.fspath(write_child), options) if write_child is not None else None
        names_b = {blk.idstr for blk in fb.blocks}
        names_a = {blk.idstr for blk in fa.blocks}
        out = []
        common = [(ba, fb.block(ba.idstr)) for ba in fa.blocks if ba.idstr in names_b]
        options.started(sum(min(ba.num_pages, bb.num_pages) * ba.page_size for ba, bb in common))
        for ba, _ in common:
            bb = fb.block(ba.idstr)
            n = min(ba.num_pages, bb.num_pages)
            differ = np.zeros(max(ba.num_pages, bb.num_pages), dtype=np.bool_)
            differ[n:] = True  # pages only one side has
            candidates = ba.present[:n] | bb.present[:n]
            tasks = []
            for first in range(0, n, CHUNK_PAGES):
                count = min(CHUNK_PAGES, n - first)
                if candidates[first : first + count].any():
                    tasks.append(PageCompare(ba.sources(first, count), bb.sources(first, count),
                                             differ[first : first + count]))  # fmt: skip
            if tasks:
                make = functools.partial(_compare_channel, fa.store, fb.store, ba.page_size)
                run_tasks(
                    tasks,
                    make,
                    channels=max(1, min(options.channels, len(tasks))),
                    progress=options.progress,
                )
            starts, lengths = bit_runs(differ)
            out.append(
                BlockDiff(ba.idstr, ba.used_length, bb.used_length, int(candidates.sum()), int(differ.sum()),
                          list(zip(starts.tolist(), lengths.tolist())))
            )  # fmt: skip
        child = None
        if write_child is not None:
            changed = [_differ_bits(d, blk.num_pages) for d, blk in zip(out, fa.blocks)]
            child = write_child_file(write_child, fa, [(x.idstr, x.used_length, fb.file_pages(x)) for x in fb.blocks],
                                     changed, spec_from(fb), options=options.replace(progress=None, on_start=None),
                                     seal=seal, ref=ref)  # fmt: skip
        return DiffReport(
            fa.path, fb.path, out, sorted(names_a - names_b), sorted(names_b - names_a), time.perf_counter() - start,
            child,
        )


def _differ_bits(d: BlockDiff, n: int) -> npt.NDArray[np.bool_]:
    bits = np.zeros(n, dtype=np.bool_)
    for s, k in d.ranges:
        bits[s : s + k] = True
    return bits


def _compare_channel(a: str | StoreSpec, b: str | StoreSpec, page_size: int, _: int) -> CompareChannel:
    return CompareChannel(a, b, page_size, CHUNK_PAGES)

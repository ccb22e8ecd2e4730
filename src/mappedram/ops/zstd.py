"""Seekable compression: ``compress`` and ``decompress``.

``compress`` writes any file mappedram reads as a compressed file (format/zstdseek.py):
QEMU's header, configuration (plus the ``mappedram-zstd`` capability), block list,
bitmaps, device state and trailer stay as they are; each block's page run becomes one
zstd frame per ``frame_bytes`` of RAM and a seek table, so every reader still reaches
any page by decompressing one frame. QEMU refuses the file (it names the capability);
``decompress`` (a rewrite as mapped-ram) gives back a file QEMU loads, RAM bit-exact.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mappedram.engine.fileio import pwrite_full
from mappedram.engine.zstdio import compress_frames
from mappedram.errors import UsageError
from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import CAP_MAPPEDRAM_ZSTD, TARGET_PAGE_SIZE
from mappedram.format.structs import ZstdRegionHeader
from mappedram.format.zstdseek import MAX_FRAME_BYTES, MAX_FRAME_PAGES, encode_seek_table, frame_lengths
from mappedram.image import MigrationFile, open_file
from mappedram.layout import FilePlan, StreamSpec, plan_file

from .options import DEFAULTS, EngineOptions
from .protocol import Written, commit, refuse_chain_file, refuse_same_file, refuse_symlink
from .relay import rewrite, spec_from
from .seal import SealOptions, SealReport, check_chain, sealed_body
from .writer import SaveReport

__all__ = ["CompressOptions", "CompressReport", "compress", "decompress", "DEFAULT_FRAME_BYTES", "DEFAULT_LEVEL"]

#: 2 MiB frames: a random read decompresses 2 MiB at most (what E2B and BuildBuddy settled on).
DEFAULT_FRAME_BYTES = 2 << 20
DEFAULT_LEVEL = 3
#: zstd's levels: 1..22, and the negative "fast" levels down to ZSTD_minCLevel.
MIN_LEVEL, MAX_LEVEL = -(1 << 17), 22


@dataclass(frozen=True, slots=True)
class CompressOptions:
    """``level``: zstd's level (1..19, negative for faster); ``frame_bytes``: RAM per frame,
    a power of two of at least one page and at most 64 MiB."""

    level: int = DEFAULT_LEVEL
    frame_bytes: int = DEFAULT_FRAME_BYTES


@dataclass(slots=True)
class CompressReport:
    path: str
    source: str
    source_format: str
    source_file_bytes: int
    file_size: int
    ram_bytes: int
    stored_bytes: int  # bytes of the pages that hold data (what a restore reads as data)
    frames: int
    zero_frames: int  # frames without a page of data (never read; a few bytes each)
    level: int
    frame_bytes: int
    channels: int
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    seal: SealReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_seconds": self.total_seconds, "gbps": self.gbps, "ratio": self.ratio,
                "data_ratio": self.data_ratio}  # fmt: skip

    @property
    def ratio(self) -> float:
        """Source file bytes per compressed file byte."""
        return self.source_file_bytes / self.file_size if self.file_size else 0.0

    @property
    def data_ratio(self) -> float:
        """Bytes of page data per compressed file byte."""
        return self.stored_bytes / self.file_size if self.file_size else 0.0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def gbps(self) -> float:
        """RAM bytes per second, over the whole compression."""
        return self.ram_bytes / self.total_seconds / 1e9 if self.total_seconds > 0 else 0.0


def compress(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    source_offset: int = 0,
    compression: CompressOptions = CompressOptions(),
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> CompressReport:
    """Write ``source`` (any file mappedram reads) compressed to ``path``."""
    target = os.fspath(path)
    refuse_symlink(target)
    refuse_same_file(source, target, "compress")
    fb = compression.frame_bytes
    with open_file(source, source_offset) as mf:
        refuse_chain_file(mf, target, "compress")
        check_chain(mf, options.replace(progress=None, on_start=None))
        ps = mf.page_size
        fp = fb // ps
        most = min(MAX_FRAME_PAGES * ps, MAX_FRAME_BYTES)
        if fb % ps or not 1 <= fp <= MAX_FRAME_PAGES or fp & (fp - 1) or fb > most:
            raise UsageError(f"frame size {fb} is not a power of two from {ps} to {most} bytes")
        if not MIN_LEVEL <= compression.level <= MAX_LEVEL:
            raise UsageError(f"zstd level {compression.level} is not within {MIN_LEVEL}..{MAX_LEVEL}")
        base = spec_from(mf)
        spec = StreamSpec(
            machine_type=base.machine_type, capabilities=(*base.capabilities, CAP_MAPPEDRAM_ZSTD),
            ram_section_id=base.ram_section_id, parts=base.parts, switchover_start=base.switchover_start,
            device_state=base.device_state, vmdesc=base.vmdesc,
        )  # fmt: skip
        notes: list[str] = []
        stats: dict[str, int] = {"frames": 0, "zero": 0}

        def body(fd: int, work: str) -> Written:
            t0 = time.perf_counter()
            options.started(sum(b.used_length for b in mf.blocks))
            plan = _write_regions(mf, spec, fp, compression.level, options, fd, work, stats)
            t1 = time.perf_counter()
            pwrite_full(fd, plan.head, plan.start, work)
            for at, data in plan.entries:
                pwrite_full(fd, data, at, work)
            for lay, b in zip(plan.ram.blocks, mf.blocks):
                pwrite_full(fd, encode_bitmap(b.present), lay.bitmap_offset, work)
            pwrite_full(fd, plan.tail, plan.ram.eos_offset, work)
            stored = sum(b.pages_present for b in mf.blocks) * ps
            return Written(pages=sum(b.num_pages for b in mf.blocks), pages_written=stored // ps,
                           bytes_written=stats["read"], channels=options.channels, file_size=plan.file_size,
                           seconds={"frames": t1 - t0, "finalize": time.perf_counter() - t1},
                           machine_type=spec.machine_type)  # fmt: skip

        if mf.libvirt is not None:
            notes.append(f"{mf.path} is a libvirt save image: {target} holds its QEMU stream alone, without "
                         "libvirt's header and domain XML")  # fmt: skip
        written = commit(target, None, options.durable, notes, sealed_body(body, seal, 0, options))
        return CompressReport(
            path=target, source=mf.path, source_format=mf.format_name,
            source_file_bytes=mf.file_size - mf.start_offset, file_size=written.file_size,
            ram_bytes=written.pages * TARGET_PAGE_SIZE, stored_bytes=written.pages_written * ps,
            frames=stats["frames"], zero_frames=stats["zero"], level=compression.level, frame_bytes=fb,
            channels=options.channels, seconds=written.seconds, notes=notes,
            seal=None if written.seal is None else written.seal,
        )  # fmt: skip


def _write_regions(
    mf: MigrationFile, spec: StreamSpec, fp: int, level: int, options: EngineOptions, fd: int, work: str,
    stats: dict[str, int],
) -> FilePlan:  # fmt: skip
    """Compress every block's page run to its region; the plan of the whole file, once
    every region's length is known (a block's pages_offset depends on the ones before)."""
    ps = mf.page_size
    blocks = [(b.idstr, b.used_length) for b in mf.blocks]
    headers = [ZstdRegionHeader(0, fp, -(-b.num_pages // fp)) for b in mf.blocks]
    stats.setdefault("read", 0)
    for k, b in enumerate(mf.blocks):
        lay = plan_file(blocks, spec, page_size=ps, zstd=headers).ram.blocks[k]
        n = b.num_pages
        tasks = [b.sources(f * fp, min(fp, n - f * fp)) for f in range(headers[k].frames)]
        got = compress_frames(mf.store, tasks, page_size=ps, level=level, threads=options.channels, fd=fd,
                              path=work, at=lay.pages_offset, progress=options.progress)  # fmt: skip
        table = encode_seek_table(got.sizes, frame_lengths(n, fp, ps))
        pwrite_full(fd, table, lay.pages_offset + int(got.sizes.sum()), work)
        headers[k] = ZstdRegionHeader(int(got.sizes.sum()) + len(table), fp, headers[k].frames)
        stats["frames"] += headers[k].frames
        stats["zero"] += got.zero_frames
        stats["read"] += got.bytes_read
    return plan_file(blocks, spec, page_size=ps, zstd=headers)


def decompress(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    source_offset: int = 0,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions | None = None,
) -> SaveReport:
    """A compressed file (or any file mappedram reads) as a mapped-ram file QEMU loads: the
    same machine, device state and trailer, every page bit-exact."""
    with open_file(source, source_offset) as mf:
        if not mf.compressed:
            raise UsageError(f"{mf.path}: not a compressed file ({mf.format_name}); `rewrite` re-lays it")
    return rewrite(source, path, source_offset=source_offset, options=options, seal=seal)

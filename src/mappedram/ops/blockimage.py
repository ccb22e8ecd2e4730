"""Write RAM blocks out as raw images, sparse where pages are zero.

References:
    QEMU migration/ram.c (read_ramblock_mapped_ram: which pages a bitmap names).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from mappedram.engine.copy import PageCopy, sparse_copy, write_sparse_file
from mappedram.engine.fileio import make_private_dir
from mappedram.errors import UsageError
from mappedram.image import MigrationFile, RamBlock, open_file

from .options import DEFAULTS, EngineOptions
from .protocol import CHUNK_PAGES, refuse_chain_file, refuse_symlink
from .seal import SEAL_CHECK, SealCheck, SealOptions, checked

__all__ = ["ExtractedBlock", "ExtractReport", "extract", "safe_filename"]


@dataclass(frozen=True, slots=True)
class ExtractedBlock:
    idstr: str
    path: str
    used_length: int
    bytes_written: int
    pages_written: int


@dataclass(frozen=True, slots=True)
class ExtractReport:
    source: str
    blocks: list[ExtractedBlock]
    bytes_read_logical: int
    seconds: float
    channels: int
    seal: SealCheck | None = None  # checked before the first output byte (None: not checked)

    @property
    def gbps(self) -> float:
        return self.bytes_read_logical / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


def safe_filename(idstr: str, taken: set[str] | None = None) -> str:
    """A file name for a block's raw image: no '/', no leading dot, no '..', unique in ``taken``."""
    name = _UNSAFE.sub("_", idstr).strip("._") or "block"
    name = name.replace("..", "_")
    base = f"{name}.raw"
    out = base
    n = 1
    while taken is not None and out in taken:
        n += 1
        out = f"{name}-{n}.raw"
    if taken is not None:
        taken.add(out)
    return out


def extract(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    block: str | None = None,
    all_blocks: bool = False,
    offset: int = 0,
    options: EngineOptions = DEFAULTS,
    seal: SealOptions = SEAL_CHECK,
) -> ExtractReport:
    """Write raw images of RAM blocks: ``block`` to the file ``output``, or every block into the
    directory ``output``. Zero pages (and pages whose bit is 0) stay holes. A sealed file's
    digests are checked before an output is created (``seal``: the key, or no check).
    """
    if (block is None) == (not all_blocks):
        raise UsageError("give exactly one of a block name or all blocks")
    out = os.fspath(output)
    with open_file(path, offset) as mf:
        if block is not None:
            mf.block(block)
        check = checked(mf, seal, options)
        if all_blocks:
            refuse_symlink(out)
            make_private_dir(out)
            taken: set[str] = set()
            targets = [(b, os.path.join(out, safe_filename(b.idstr, taken))) for b in mf.blocks]
        else:
            assert block is not None
            targets = [(mf.block(block), out)]
        for _, dest in targets:
            refuse_symlink(dest)
            refuse_chain_file(mf, dest, "extract")
        total = sum(b.used_length for b, _ in targets)
        options.started(total)
        start = time.perf_counter()
        done = [_extract_block(mf, b, dest, options) for b, dest in targets]
        seconds = time.perf_counter() - start
    return ExtractReport(mf.path, done, total, seconds, options.channels, check)


def _extract_block(mf: MigrationFile, b: RamBlock, dest: str, options: EngineOptions) -> ExtractedBlock:
    write_sparse_file(dest, b.used_length)
    tasks = [
        PageCopy(first * b.page_size, b.sources(first, min(CHUNK_PAGES, b.num_pages - first)))
        for first in range(0, b.num_pages, CHUNK_PAGES)
    ]
    written = sparse_copy(mf.store, dest, tasks, page_size=b.page_size, max_pages=CHUNK_PAGES,
                          channels=options.channels, progress=options.progress)  # fmt: skip
    return ExtractedBlock(b.idstr, dest, b.used_length, written, written // b.page_size)

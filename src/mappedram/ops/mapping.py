"""Whether a mapped-ram file's page region is a correct memory image, as it stands.

A block's pages lie at ``pages_offset + page * page_size`` (one contiguous, page-aligned
run), so the run can be mapped as the guest's RAM, or served page by page, without being
copied. That is right only where every slot whose bitmap bit is 0 reads as zeros: QEMU
writes a dirtied page at its slot in every iteration, and a page that became zero later
only clears its bit (ram.c, save_zero_page with mapped-ram), so its slot keeps the stale
bytes. Files this project writes record that they hold none (the trailer's
``mappedram/clean-zero-slots``); for any other file the 0-bit slots that store data are
found with SEEK_DATA/SEEK_HOLE (one call pair per data extent), and only those are read,
to tell stale bytes from written zeros.

References:
    QEMU migration/ram.c (save_zero_page, ram_save_file_bmap, mapped_ram_setup_ramblock).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs
from mappedram.errors import UsageError
from mappedram.image import MigrationFile, RamBlock

__all__ = ["StaleSlots", "stale_slots"]

_CHUNK_PAGES = 2048  # slots read at a time when telling stale bytes from zeros


@dataclass(frozen=True, slots=True)
class StaleSlots:
    """The pages of a block whose bit is 0 and whose slot stores bytes that may not be zero."""

    block: str
    pages: npt.NDArray[np.bool_]
    trusted: bool  # the file says it has none (not looked at)

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.pages))

    def first(self) -> int | None:
        hits = np.flatnonzero(self.pages)
        return int(hits[0]) if len(hits) else None

    def runs(self) -> list[tuple[int, int]]:
        starts, lengths = bit_runs(self.pages)
        return list(zip(starts.tolist(), lengths.tolist()))


def stale_slots(mf: MigrationFile, block: RamBlock | str) -> StaleSlots:
    """The 0-bit slots of ``block`` that store data (a mapped-ram block only)."""
    b = mf.block(block) if isinstance(block, str) else block
    lay = b.layout
    if lay is None:
        raise UsageError(f"{mf.path}: block {b.idstr!r} is not laid out as mapped-ram: it has no page region")
    if not b.slots:
        raise UsageError(f"{mf.path}: block {b.idstr!r} has no plain page slots ({mf.format_name}): it cannot be "
                         "mapped")  # fmt: skip
    n = b.num_pages
    if mf.clean_zero_slots:
        return StaleSlots(b.idstr, np.zeros(n, dtype=np.bool_), True)
    ps = lay.page_size
    stored = np.zeros(n + 1, dtype=np.int32)
    for start, end in mf.data_extents(lay.pages_offset, lay.pages_offset + n * ps):
        first = (start - lay.pages_offset) // ps
        last = -(-(end - lay.pages_offset) // ps)
        stored[first] += 1
        stored[last] -= 1
    suspect = (np.cumsum(stored[:n]) > 0) & ~np.asarray(b.present, dtype=np.bool_)
    stale = np.zeros(n, dtype=np.bool_)
    starts, lengths = bit_runs(suspect)
    for s, count in zip(starts.tolist(), lengths.tolist()):
        for first in range(s, s + count, _CHUNK_PAGES):
            k = min(_CHUNK_PAGES, s + count - first)
            raw = mf.read_at(lay.pages_offset + first * ps, k * ps).ljust(k * ps, b"\0")
            stale[first : first + k] = np.frombuffer(raw, dtype=np.uint8).reshape(k, ps).any(axis=1)
    return StaleSlots(b.idstr, stale, False)

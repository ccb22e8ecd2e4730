"""How a live pass of dirty pages is written, and how long the final pass will take.

With O_DIRECT, a pass of dirty pages can go two ways (engine/pages.py, PageWriteChannel):

* ``runs``: one page-cache write per run of dirty pages, by one writer (buffered writers of
  one file only contend for its lock); the page cache takes them at memory speed and the
  save's closing fsync writes them to the disk;
* ``extents``: the runs merged across clean gaps of up to ``gap`` pages into O_DIRECT
  extents, by every channel, the clean pages between them rewritten.

Each way's speed is measured as the save goes: the bytes it wrote per second, the slower of
its last two passes (one pass's speed varies with what else the machine does). Pass 1,
every page in file order by O_DIRECT extents, is the first measure of ``extents``; until a
pass has gone by ``runs``, :data:`RUNS_PRIOR` stands for its speed. A pass goes the way
expected to take less: ``extents`` cost the bytes the extents cover at their speed, ``runs``
the dirty bytes at theirs, plus, for a live pass, writing those bytes back later at the
``extents`` speed (the dirty page cache reaches the disk during the later passes or at
the fsync, on the same disk). The final pass is judged by its own time alone: the guest
is stopped only until its last byte is written, not until the fsync.

QEMU's rule (migration_iteration_run: pending_size <= bandwidth * downtime_limit) becomes:
the final pass's expected time, the way it would go, fits the downtime budget. Without
O_DIRECT there is one way, ``runs``, measured by the live passes of dirty pages only (pass 1
writes every page in order, far faster than scattered pages go), and the rule is QEMU's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs
from mappedram.engine.pages import merge_runs

__all__ = ["RUNS", "EXTENTS", "RUNS_PRIOR", "DENSE_GAP", "PassShape", "PassCosts", "pass_shape"]

RUNS = "runs"
EXTENTS = "extents"
#: Clean pages between two dirty runs that an extent rewrites, at most.
DENSE_GAP = 64
#: Bytes per second taken for ``runs`` before a pass has measured them (one writer of
#: scattered pages through the page cache: 0.35 to 0.9 GB/s measured on two 2-core VMs).
RUNS_PRIOR = 400e6


@dataclass(frozen=True, slots=True)
class PassShape:
    """What a pass of these dirty pages would write each way."""

    dirty_bytes: int  # ``runs``: the dirty pages
    covered_bytes: int  # ``extents``: the dirty pages and the clean gaps merged between them


def pass_shape(dirty: Sequence[npt.NDArray[np.bool_]], page_size: int, gap: int = DENSE_GAP) -> PassShape:
    dirty_pages = covered = 0
    for d in dirty:
        starts, lengths = bit_runs(d)
        dirty_pages += int(lengths.sum())
        covered += int(merge_runs(starts, lengths, gap)[1].sum())
    return PassShape(dirty_pages * page_size, covered * page_size)


class PassCosts:
    """The measured speed of each way a pass can go; which way a pass goes; what the final pass will take."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct
        self.rates: dict[str, list[float]] = {RUNS: [], EXTENTS: []}

    def record(self, way: str, nbytes: int, seconds: float, *, first: bool = False) -> None:
        """A pass went ``way`` and wrote ``nbytes`` in ``seconds`` (``first``: pass 1, every page)."""
        if seconds <= 0 or nbytes <= 0 or (first and way == RUNS):
            return  # pass 1 through the page cache says nothing of scattered pages
        self.rates[way].append(nbytes / seconds)

    def rate(self, way: str) -> float | None:
        """Bytes per second ``way`` went: the slower of its last two passes (None: not measured)."""
        measured = self.rates[way][-2:]
        return min(measured) if measured else None

    def _cost(self, way: str, shape: PassShape, *, final: bool, prior: bool) -> float | None:
        rate = self.rate(way)
        if rate is None:
            if not prior or way != RUNS:
                return None
            rate = RUNS_PRIOR
        if way == EXTENTS:
            return shape.covered_bytes / rate
        seconds = shape.dirty_bytes / rate
        extents = self.rate(EXTENTS)
        if not final and extents is not None:
            seconds += shape.dirty_bytes / extents  # written back to the disk later
        return seconds

    def ways(self) -> tuple[str, ...]:
        return (RUNS, EXTENTS) if self.direct else (RUNS,)

    def choose(self, shape: PassShape, *, final: bool) -> str:
        """The way expected to take less (the final pass: by measured speeds, as :meth:`expected` judged it)."""
        for prior in (False, True) if final else (True,):
            costs = {w: self._cost(w, shape, final=final, prior=prior) for w in self.ways()}
            known = {w: c for w, c in costs.items() if c is not None}
            if known:
                return min(known, key=lambda w: known[w])
        return RUNS

    def expected(self, shape: PassShape) -> float | None:
        """Seconds the final pass of these dirty pages is expected to take, by measured speeds only."""
        costs = [self._cost(w, shape, final=True, prior=False) for w in self.ways()]
        known = [c for c in costs if c is not None]
        return min(known) if known else None

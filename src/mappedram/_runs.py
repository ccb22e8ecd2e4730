"""Run finding on boolean page masks, shared by the codec and the engine (pure numpy)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bit_runs", "assign_last"]


def bit_runs(bits: npt.ArrayLike, value: bool = True) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Return ``(starts, lengths)`` of the maximal runs of ``value`` in ``bits``, vectorised."""
    b = np.asarray(bits, dtype=np.bool_)
    if not value:
        b = ~b
    padded = np.concatenate(([False], b, [False])).view(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts = edges[0::2].astype(np.int64)
    lengths = (edges[1::2] - edges[0::2]).astype(np.int64)
    return starts, lengths


def assign_last(out: npt.NDArray[np.int64], index: npt.NDArray[np.int64], values: npt.NDArray[np.int64]) -> None:
    """``out[index[i]] = values[i]`` in order of ``i``: an index given twice keeps its last value
    (numpy's fancy assignment does not promise which one it keeps)."""
    if len(index) > 1 and not bool(np.all(index[1:] > index[:-1])):
        rev = index[::-1]
        _, first = np.unique(rev, return_index=True)
        keep = len(index) - 1 - first
        index, values = index[keep], values[keep]
    out[index] = values

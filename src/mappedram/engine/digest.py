"""Digest a file's pages in fixed pieces, on N channels, in large reads.

A task names the file offset of each page of a run of pieces (-1: the page reads as
zeros) and how many pages one piece holds. A channel reads the whole run at once into
its own buffer (:func:`~mappedram.engine.copy.gather_pages`: one ``preadv`` per extent of
stored pages, zeros for the rest) and hands each piece's bytes to ``digest``, which the
caller supplies: the engine knows no format and no hash. Hash functions that release
the interpreter lock (BLAKE3, hashlib) then run on every channel at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .executor import run_tasks
from .store import Store, StoreSpec

__all__ = ["DigestTask", "DigestChannel", "PieceDigest", "digest_pieces"]

#: ``digest(piece, data) -> bytes``: the digest of piece number ``piece``, whose bytes are ``data``.
PieceDigest = Callable[[int, memoryview], bytes]


@dataclass(frozen=True, slots=True)
class DigestTask:
    """Pieces ``first``, ``first + 1``, ... whose pages, back to back, are at ``src_offsets``."""

    first: int
    src_offsets: npt.NDArray[np.int64]
    piece_pages: int

    @property
    def pieces(self) -> int:
        return -(-len(self.src_offsets) // self.piece_pages)


class DigestChannel:
    """One channel: its descriptor and a buffer of ``max_pages`` pages."""

    def __init__(
        self, path: str | StoreSpec, page_size: int, max_pages: int, digest: PieceDigest, out: list[bytes]
    ) -> None:
        self.page_size, self.digest, self.out = page_size, digest, out
        self.store = Store(path)
        self.buf = bytearray(max_pages * page_size)
        self.bytes_read = 0

    def run(self, task: DigestTask) -> int:
        ps, pp = self.page_size, task.piece_pages
        n = len(task.src_offsets)
        view = memoryview(self.buf)[: n * ps]
        present = self.store.gather(task.src_offsets, ps, view)
        self.bytes_read += int(np.count_nonzero(present)) * ps
        for k in range(task.pieces):
            piece = view[k * pp * ps : min(n, (k + 1) * pp) * ps]
            self.out[task.first + k] = self.digest(task.first + k, piece)
        return n * ps

    def close(self) -> None:
        self.store.close()


def digest_pieces(
    path: str | StoreSpec,
    tasks: Sequence[DigestTask],
    pieces: int,
    *,
    page_size: int,
    digest: PieceDigest,
    channels: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[bytes], int]:
    """Run ``tasks`` over ``channels`` channels; return every piece's digest (``b""`` for a
    piece no task covers) and the bytes read from the file."""
    out = [b""] * pieces
    max_pages = max((len(t.src_offsets) for t in tasks), default=0)
    made: list[DigestChannel] = []

    def make_channel(_: int) -> DigestChannel:
        ch = DigestChannel(path, page_size, max_pages, digest, out)
        made.append(ch)
        return ch

    if tasks:
        run_tasks(tasks, make_channel, channels=max(1, min(channels, len(tasks))), progress=progress)
    return out, sum(ch.bytes_read for ch in made)

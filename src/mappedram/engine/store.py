"""Where page bytes come from when they are not all plain slots of one file.

A reader names each page's bytes by a 64-bit *source offset*, -1 for a page that reads as
zeros. For an ordinary file that is the page's file offset. A :class:`StoreSpec` lists
several sources: plain files (a snapshot chain's members) and zstd-compressed page runs
(:class:`ZstdFrames`); a source offset then carries the source's index in its high bits
(``index << SOURCE_SHIFT | local``), where ``local`` is a file offset for a plain file and
``page * page_size`` within the run for a compressed one.

:class:`Store` is one thread's reader of a spec: :meth:`Store.gather` fills a buffer from
any mix of sources, in large reads for plain files (:func:`~mappedram.engine.copy.gather_pages`)
and one decompression per zstd frame, the last few frames kept. Every channel of an
operation opens its own store, so frames decompress on every channel at once (zstd
releases the interpreter lock). A frame is decompressed into exactly the bytes its pages
take, never more: a frame that claims more, less, or does not decompress is a
:class:`~mappedram.errors.FormatError` naming the file and the frame's offset.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zstandard

from mappedram.errors import FormatError, IOEngineError

from .copy import gather_pages
from .fileio import close_fd, close_quiet, open_read, pread_upto

__all__ = [
    "SOURCE_SHIFT",
    "LOCAL_MASK",
    "MAX_SOURCES",
    "ZstdFrames",
    "StoreSpec",
    "Store",
    "open_store",
    "spec_path",
]

SOURCE_SHIFT = 52
LOCAL_MASK = (1 << SOURCE_SHIFT) - 1
#: Sources one spec can name (the index must stay positive in an int64 source offset).
MAX_SOURCES = (1 << (63 - SOURCE_SHIFT)) - 1
#: Decompressed frames one store keeps (a fault, a prefetch and a scan share their neighbours).
CACHED_FRAMES = 4
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True, slots=True, eq=False)
class ZstdFrames:
    """A page run held as zstd frames in ``path``: frame ``i`` holds pages
    ``i * frame_pages`` on, ``lengths[i]`` bytes once decompressed, stored as ``sizes[i]``
    bytes at file offset ``offsets[i]``. ``label`` names the run in errors (the block)."""

    path: str
    label: str
    page_size: int
    frame_pages: int
    offsets: npt.NDArray[np.int64]
    sizes: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]


Source = str | ZstdFrames


@dataclass(frozen=True, slots=True, eq=False)
class StoreSpec:
    """The sources a reader takes pages from; index 0 is the file itself."""

    sources: tuple[Source, ...]
    path: str = field(default="")  # the file named in errors
    # (path, st_dev, st_ino) of each file as it was opened and checked: a store that opens
    # one by its path refuses another file put there since
    identities: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.path:
            first = self.sources[0]
            object.__setattr__(self, "path", first if isinstance(first, str) else first.path)


def spec_path(spec: str | StoreSpec) -> str:
    """The file a spec reads (for messages and identity checks)."""
    return spec if isinstance(spec, str) else spec.path


class Store:
    """One thread's reader of a spec: descriptors opened on first use, a few frames cached."""

    def __init__(self, spec: str | StoreSpec) -> None:
        self.spec = spec
        self.sources: tuple[Source, ...] = (spec,) if isinstance(spec, str) else spec.sources
        self.identities = {} if isinstance(spec, str) else {p: (dev, ino) for p, dev, ino in spec.identities}
        self.fds: dict[str, int] = {}
        self.frames: OrderedDict[tuple[int, int], npt.NDArray[np.uint8]] = OrderedDict()
        self.dctx: zstandard.ZstdDecompressor | None = None
        self.bytes_read = 0  # compressed bytes read from files, and plain pages' bytes
        self.frames_decompressed = 0

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = open_read(path)
            want = self.identities.get(path)
            if want is not None:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != want:
                    close_quiet(fd)
                    raise IOEngineError("was replaced since it was opened and checked: not reading another file",
                                        path=path)  # fmt: skip
            self.fds[path] = fd
        return fd

    def gather(self, src: npt.NDArray[np.int64], page_size: int, out: memoryview) -> npt.NDArray[np.bool_]:
        """Fill ``out`` (``len(src)`` pages) from the sources; -1 pages become zeros.
        Returns the mask of pages that came from a source."""
        first = self.sources[0]
        present = src >= 0
        if isinstance(first, str) and (not present.any() or int(src.max()) <= LOCAL_MASK):
            got = gather_pages(self.fd(first), first, src, page_size, out)
            self.bytes_read += int(np.count_nonzero(got)) * page_size
            return got
        n = len(src)
        pages = np.frombuffer(out, dtype=np.uint8, count=n * page_size).reshape(n, page_size)
        pages[~present] = 0
        kind = np.where(present, src >> SOURCE_SHIFT, -1)
        for k in np.unique(kind[present]).tolist():
            rows = np.flatnonzero(kind == k)
            local = src[rows] & LOCAL_MASK
            source = self.sources[k]
            if isinstance(source, str):
                if len(rows) == n:
                    gather_pages(self.fd(source), source, local, page_size, out)
                else:
                    tmp = bytearray(len(rows) * page_size)
                    gather_pages(self.fd(source), source, local, page_size, memoryview(tmp))
                    pages[rows] = np.frombuffer(tmp, dtype=np.uint8).reshape(len(rows), page_size)
                self.bytes_read += len(rows) * page_size
            else:
                self._gather_zstd(k, source, local // page_size, rows, pages)
        return present

    def _gather_zstd(
        self,
        k: int,
        frames: ZstdFrames,
        page: npt.NDArray[np.int64],
        rows: npt.NDArray[np.intp],
        pages: npt.NDArray[np.uint8],
    ) -> None:
        fp = frames.frame_pages
        which = page // fp
        for f in np.unique(which).tolist():
            sel = which == f
            data = self._frame(k, frames, f)
            pages[rows[sel]] = data[page[sel] - f * fp]

    def _frame(self, k: int, frames: ZstdFrames, f: int) -> npt.NDArray[np.uint8]:
        key = (k, f)
        hit = self.frames.get(key)
        if hit is not None:
            self.frames.move_to_end(key)
            return hit
        if not 0 <= f < len(frames.offsets):
            raise FormatError(f"page of {frames.label!r} outside its zstd frames", path=frames.path,
                              field="frame", expected=f"< {len(frames.offsets)}", actual=f)  # fmt: skip
        at, size, length = int(frames.offsets[f]), int(frames.sizes[f]), int(frames.lengths[f])
        raw = pread_upto(self.fd(frames.path), size, at, frames.path)
        self.bytes_read += len(raw)
        if len(raw) != size:
            raise IOEngineError(f"file ended early: read {len(raw)} of {size} bytes of a zstd frame",
                                path=frames.path, offset=at + len(raw), errno=errno.EIO)  # fmt: skip
        where = f"zstd frame {f} of block {frames.label!r}"
        if raw[:4] != _ZSTD_MAGIC:
            raise FormatError(f"{where} does not start with the zstd magic number", path=frames.path, offset=at,
                              field="Magic_Number", expected="28 b5 2f fd", actual=raw[:4].hex(" "))  # fmt: skip
        try:
            claimed = zstandard.frame_content_size(raw)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: bad frame header ({exc})", path=frames.path, offset=at,
                              field="Frame_Header") from None  # fmt: skip
        if claimed != length:
            raise FormatError(f"{where} claims another content size than its pages", path=frames.path, offset=at,
                              field="Frame_Content_Size", expected=length, actual=claimed)  # fmt: skip
        if self.dctx is None:
            self.dctx = zstandard.ZstdDecompressor()
        try:
            data = self.dctx.decompress(raw, max_output_size=length, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where} does not decompress: {exc}", path=frames.path, offset=at,
                              field="zstd frame") from None  # fmt: skip
        if len(data) != length:
            raise FormatError(f"{where} decompresses to another size than it claims", path=frames.path, offset=at,
                              field="zstd frame", expected=length, actual=len(data))  # fmt: skip
        self.frames_decompressed += 1
        arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, frames.page_size)
        self.frames[key] = arr
        while len(self.frames) > CACHED_FRAMES:
            self.frames.popitem(last=False)
        return arr

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for path, fd in fds.items():
            try:
                close_fd(fd, path)
            except IOEngineError:
                pass  # a reader's close loses nothing
        self.frames.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(spec: str | StoreSpec) -> Store:
    """A reader of ``spec``; its files open on first use (a missing one raises then)."""
    return Store(spec)

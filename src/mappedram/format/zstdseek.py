"""The page region of a compressed block: zstd frames and the zstd seekable format's seek table.

mappedram's compressed files (``mappedram compress``) keep QEMU's mapped-ram structure,
its bitmaps and its device state, and hold each block's page run as ``frames`` zstd
frames, frame ``i`` holding pages ``i * frame_pages`` .. ``(i + 1) * frame_pages`` exactly
as a restore reads them (a page whose bit is 0 as zeros). A seek table follows the last
frame, so the region is a stream in the zstd seekable format (zstd's
contrib/seekable_format/zstd_seekable_compression_format.md)::

    frame 0 | frame 1 | ... | 0x184D2A5E le32 size | { le32 compressed le32 decompressed } * n
                              | le32 n | u8 descriptor (0) | le32 0x8F92EAB1

``zstd -d`` of the region gives the block's raw RAM; any seekable-format reader (pyzstd's
``SeekableZstdFile``) reads it at random. The region's length and the frame size are in
the block's :class:`~mappedram.format.structs.ZstdRegionHeader`; readers take a frame's
place from the seek table and never trust a size they could not check against the region
and the bitmap's page count.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from mappedram.errors import FormatError, LayoutError

__all__ = [
    "SKIPPABLE_MAGIC",
    "SEEKABLE_MAGIC",
    "ZSTD_FRAME_MAGIC",
    "MAX_FRAME_PAGES",
    "MAX_FRAME_BYTES",
    "MIN_FRAME_SIZE",
    "compress_bound",
    "frame_lengths",
    "seek_table_size",
    "encode_seek_table",
    "decode_seek_table",
]

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
ZSTD_FRAME_MAGIC = 0xFD2FB528
#: 64 MiB frames of 4 KiB pages at most: a frame is decompressed whole into memory.
MAX_FRAME_PAGES = 16384
#: ... and 64 MiB whatever the page size (a target may have pages of up to 1 MiB).
MAX_FRAME_BYTES = 64 << 20
#: The smallest zstd frame: magic, a 2-byte frame header, one empty block's 3-byte header.
MIN_FRAME_SIZE = 9
_FOOTER = struct.Struct("<IBI")
_HEAD = struct.Struct("<II")


def compress_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND: the most a frame of ``size`` bytes can take, headers included."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < (128 << 10) else 0)


def frame_lengths(num_pages: int, frame_pages: int, page_size: int) -> npt.NDArray[np.int64]:
    """The decompressed size of each frame of a block (the last one may be short)."""
    frames = -(-num_pages // frame_pages)
    out = np.full(frames, frame_pages * page_size, dtype=np.int64)
    if frames:
        out[-1] = (num_pages - (frames - 1) * frame_pages) * page_size
    return out


def seek_table_size(frames: int) -> int:
    """Bytes of the seek table of ``frames`` frames (no checksums): the skippable frame."""
    return _HEAD.size + 8 * frames + _FOOTER.size


def encode_seek_table(compressed: npt.NDArray[np.int64], decompressed: npt.NDArray[np.int64]) -> bytes:
    """The seek table of frames of these compressed and decompressed sizes."""
    n = len(compressed)
    if len(decompressed) != n:
        raise ValueError("one decompressed size per frame")
    entries = np.empty((n, 2), dtype="<u4")
    entries[:, 0] = compressed
    entries[:, 1] = decompressed
    body = entries.tobytes() + _FOOTER.pack(n, 0, SEEKABLE_MAGIC)
    return _HEAD.pack(SKIPPABLE_MAGIC, len(body)) + body


def decode_seek_table(
    raw: bytes | memoryview,
    *,
    frames: int,
    decompressed: npt.NDArray[np.int64],
    region_length: int,
    offset: int,
    block: str,
) -> npt.NDArray[np.int64]:
    """Check the seek table that ends a region of ``region_length`` bytes and return each
    frame's compressed size. ``raw`` is the table as the region's last
    ``seek_table_size(frames)`` bytes; ``offset`` is where it starts in the file.

    Every size is checked before use: the frame count against the region header, each
    decompressed size against the block (so a frame can never claim more memory than its
    pages), each compressed size against zstd's bound, and their sum against the region.
    """
    size = seek_table_size(frames)
    if len(raw) != size:
        raise LayoutError(
            "zstd seek table is cut short", offset=offset, field="seek table",
            expected=f"{size} bytes", actual=f"{len(raw)} bytes", block=block,
        )  # fmt: skip
    magic, length = _HEAD.unpack_from(raw, 0)
    n, descriptor, seekable = _FOOTER.unpack_from(raw, size - _FOOTER.size)
    foot = offset + size - _FOOTER.size
    if seekable != SEEKABLE_MAGIC:
        raise FormatError(
            "no zstd seek table ends the compressed page region", offset=foot + 5, field="Seekable_Magic_Number",
            expected=f"{SEEKABLE_MAGIC:#010x}", actual=f"{seekable:#010x}", block=block,
        )  # fmt: skip
    if magic != SKIPPABLE_MAGIC or length != size - _HEAD.size:
        raise FormatError(
            "the zstd seek table's skippable frame header is wrong", offset=offset, field="Skippable_Magic_Number",
            expected=f"{SKIPPABLE_MAGIC:#010x} with size {size - _HEAD.size}",
            actual=f"{magic:#010x} with size {length}", block=block,
        )  # fmt: skip
    if n != frames:
        raise LayoutError(
            "the zstd seek table lists another number of frames than the block holds", offset=foot,
            field="Number_Of_Frames", expected=frames, actual=n, block=block,
        )  # fmt: skip
    if descriptor != 0:
        raise FormatError(
            "zstd seek table descriptor: checksums or reserved bits set", offset=foot + 4,
            field="Seek_Table_Descriptor", expected="0", actual=f"{descriptor:#04x}", block=block,
        )  # fmt: skip
    entries = np.frombuffer(raw, dtype="<u4", count=2 * frames, offset=_HEAD.size).reshape(frames, 2).astype(np.int64)
    comp, decomp = entries[:, 0], entries[:, 1]
    bad = np.flatnonzero(decomp != decompressed)
    if bad.size:
        i = int(bad[0])
        raise LayoutError(
            f"zstd frame {i} claims another decompressed size than its pages", offset=offset + _HEAD.size + 8 * i + 4,
            field="Decompressed_Size", expected=int(decompressed[i]), actual=int(decomp[i]), block=block,
        )  # fmt: skip
    bound = np.array([compress_bound(int(d)) for d in np.unique(decompressed)], dtype=np.int64)
    limit = bound[np.searchsorted(np.unique(decompressed), decompressed)]
    bad = np.flatnonzero((comp < MIN_FRAME_SIZE) | (comp > limit))
    if bad.size:
        i = int(bad[0])
        raise LayoutError(
            f"zstd frame {i} has an impossible compressed size", offset=offset + _HEAD.size + 8 * i,
            field="Compressed_Size", expected=f"{MIN_FRAME_SIZE}..{int(limit[i])}", actual=int(comp[i]), block=block,
        )  # fmt: skip
    total = int(comp.sum())
    if total + size != region_length:
        raise LayoutError(
            "the zstd frames and seek table do not fill the compressed page region", offset=offset,
            field="region_length", expected=f"{total + size} (frames {total} + seek table {size})",
            actual=region_length, block=block,
        )  # fmt: skip
    return comp

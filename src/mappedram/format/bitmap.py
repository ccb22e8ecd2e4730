"""Page bitmaps in QEMU's on-disk layout.

QEMU pwrites its in-memory ``unsigned long file_bmap[]`` raw, so the word size and
byte order are those of the saving host. On every 64-bit little-endian host (x86_64,
aarch64) that is: bit i is bit (i % 8), LSB first, of byte i // 8, and the size is
rounded up to whole 8-byte words. Both are explicit parameters here.

In memory a bitmap is a numpy ``bool`` array of ``num_pages`` entries.

References:
    QEMU migration/ram.c (mapped_ram_setup_ramblock: bitmap_size =
    BITS_TO_LONGS(num_pages) * sizeof(unsigned long); mapped_ram_read_header,
    read_ramblock_mapped_ram), include/qemu/bitmap.h.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from mappedram._runs import bit_runs

__all__ = [
    "HOST_WORD_SIZE",
    "HOST_BYTE_ORDER",
    "bitmap_size",
    "decode_bitmap",
    "encode_bitmap",
    "padding_bits_set",
    "bit_runs",
    "Bits",
]

Bits = npt.NDArray[np.bool_]
ByteOrder = Literal["little", "big"]

#: The saving host's ``sizeof(unsigned long)`` and byte order QEMU files assume by default.
HOST_WORD_SIZE = 8
HOST_BYTE_ORDER: ByteOrder = "little"


def bitmap_size(num_pages: int, word_size: int = HOST_WORD_SIZE) -> int:
    """Bytes of the on-disk bitmap: BITS_TO_LONGS(num_pages) * sizeof(unsigned long)."""
    bits = word_size * 8
    return (num_pages + bits - 1) // bits * word_size


def _to_lsb_bytes(raw: bytes | memoryview, word_size: int, byteorder: ByteOrder) -> npt.NDArray[np.uint8]:
    data = np.frombuffer(raw, dtype=np.uint8)
    if byteorder == "big":
        # A big-endian word stores its least significant byte last: reverse each word.
        data = data.reshape(-1, word_size)[:, ::-1].reshape(-1)
    return data


def decode_bitmap(
    raw: bytes | memoryview,
    num_pages: int,
    *,
    word_size: int = HOST_WORD_SIZE,
    byteorder: ByteOrder = HOST_BYTE_ORDER,
) -> Bits:
    """Return the ``num_pages`` bits of an on-disk bitmap (bits past num_pages are dropped).

    ``raw`` must be exactly ``bitmap_size(num_pages, word_size)`` bytes.
    """
    if len(raw) != bitmap_size(num_pages, word_size):
        raise ValueError(f"bitmap of {num_pages} pages needs {bitmap_size(num_pages, word_size)} bytes, got {len(raw)}")
    data = _to_lsb_bytes(raw, word_size, byteorder)
    return np.unpackbits(data, bitorder="little", count=num_pages).astype(np.bool_)


def padding_bits_set(
    raw: bytes | memoryview,
    num_pages: int,
    *,
    word_size: int = HOST_WORD_SIZE,
    byteorder: ByteOrder = HOST_BYTE_ORDER,
) -> int:
    """Index of the first set bit at or past ``num_pages`` (a page outside the block), or -1."""
    data = _to_lsb_bytes(raw, word_size, byteorder)
    tail = np.unpackbits(data, bitorder="little")[num_pages:]
    hits = np.flatnonzero(tail)
    return int(num_pages + hits[0]) if hits.size else -1


def encode_bitmap(
    bits: Bits,
    *,
    word_size: int = HOST_WORD_SIZE,
    byteorder: ByteOrder = HOST_BYTE_ORDER,
) -> bytes:
    """Return the on-disk bytes of ``bits``, padded with 0 bits to whole words."""
    num_pages = int(bits.shape[0])
    size = bitmap_size(num_pages, word_size)
    packed = np.zeros(size, dtype=np.uint8)
    packed[: (num_pages + 7) // 8] = np.packbits(bits.astype(np.bool_), bitorder="little")
    if byteorder == "big":
        packed = packed.reshape(-1, word_size)[:, ::-1].reshape(-1)
    return packed.tobytes()

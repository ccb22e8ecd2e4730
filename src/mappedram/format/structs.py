"""Fixed-size on-disk records, each declared once with an explicit byte order.

References:
    QEMU migration/ram.c (struct MappedRamHeader, mapped_ram_setup_ramblock,
    mapped_ram_read_header), migration/savevm.c (save_section_header,
    save_section_footer, qemu_savevm_command_send).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from mappedram.errors import TruncatedError

__all__ = ["MappedRamHeader", "ZstdRegionHeader", "pack_idstr", "be64", "be32", "be16", "BE16", "BE32", "BE64"]

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


def be16(value: int) -> bytes:
    return BE16.pack(value)


def be32(value: int) -> bytes:
    return BE32.pack(value)


def be64(value: int) -> bytes:
    return BE64.pack(value)


def pack_idstr(idstr: str) -> bytes:
    """u8 length + bytes, as qemu_put_counted_string()."""
    raw = idstr.encode("utf-8")
    if not 0 < len(raw) <= 255:
        raise ValueError(f"idstr must be 1..255 bytes, got {len(raw)}")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True, slots=True)
class MappedRamHeader:
    """struct MappedRamHeader (packed, big-endian, 28 bytes), written after each block entry.

    Offsets are absolute file offsets, including any ``file:...,offset=`` start.
    """

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">IQQQ")
    SIZE: ClassVar[int] = STRUCT.size

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> MappedRamHeader:
        """Decode; ``offset`` is the absolute file offset, used only in errors."""
        if len(buf) < cls.SIZE:
            raise TruncatedError(
                "mapped-ram header is truncated",
                offset=offset,
                field="MappedRamHeader",
                expected=f"{cls.SIZE} bytes",
                actual=f"{len(buf)} bytes",
            )
        return cls(*cls.STRUCT.unpack_from(buf, 0))


@dataclass(frozen=True, slots=True)
class ZstdRegionHeader:
    """mappedram's compressed files: 16 bytes (big-endian) right after a block's
    MappedRamHeader (whose version is MAPPEDRAM_ZSTD_HDR_VERSION). The page region at
    ``pages_offset`` is ``region_length`` bytes: one zstd frame per ``frame_pages`` pages,
    ``frames`` of them, then the zstd seekable format's seek table (format/zstdseek.py)."""

    region_length: int
    frame_pages: int
    frames: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QII")
    SIZE: ClassVar[int] = STRUCT.size

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.region_length, self.frame_pages, self.frames)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> ZstdRegionHeader:
        if len(buf) < cls.SIZE:
            raise TruncatedError(
                "zstd region header is truncated",
                offset=offset,
                field="ZstdRegionHeader",
                expected=f"{cls.SIZE} bytes",
                actual=f"{len(buf)} bytes",
            )
        return cls(*cls.STRUCT.unpack_from(buf, 0))

"""The events of QEMU's migration stream, as the decoder (:mod:`.decoder`) returns them.

Each event is an immutable record of one piece of the stream with its absolute file
offset; :data:`NEED_DATA` is the sentinel for "feed more bytes" (h11's contract).

References:
    QEMU migration/savevm.c (qemu_loadvm_state_main, vmstate_configuration),
    migration/ram.c (ram_load_precopy, parse_ramblock, parse_ramblock_mapped_ram).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from .constants import (
    CAP_MAPPED_RAM,
    CAP_MAPPEDRAM_CHILD,
    CAP_MAPPEDRAM_ZSTD,
    CAP_X_IGNORE_SHARED,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    TARGET_PAGE_BITS,
)
from .structs import MappedRamHeader, ZstdRegionHeader

__all__ = [
    "NEED_DATA",
    "Event",
    "Configuration",
    "SectionHeader",
    "MemSize",
    "RamBlockEntry",
    "RamPage",
    "RamPageRun",
    "RamEos",
    "SectionFooterEvent",
    "Command",
    "DeviceStateStart",
    "SectionType",
]


class NEED_DATA:
    """Returned by :meth:`Decoder.next_event` when more bytes must be fed."""


class SectionType(int, Enum):
    START = QEMU_VM_SECTION_START
    PART = QEMU_VM_SECTION_PART
    END = QEMU_VM_SECTION_END
    FULL = QEMU_VM_SECTION_FULL


@dataclass(frozen=True, slots=True)
class Configuration:
    """The QEMU_VM_CONFIGURATION section (vmstate_configuration in savevm.c)."""

    offset: int
    machine_type: str | None
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: bytes | None = None
    subsections: tuple[str, ...] = ()
    end_offset: int = 0

    @property
    def page_size(self) -> int:
        return 1 << (self.target_page_bits if self.target_page_bits is not None else TARGET_PAGE_BITS)

    @property
    def mapped_ram(self) -> bool:
        return CAP_MAPPED_RAM in self.capabilities

    @property
    def ignore_shared(self) -> bool:
        return CAP_X_IGNORE_SHARED in self.capabilities

    @property
    def child(self) -> bool:
        """An incremental snapshot: the pages its bitmap does not mark are its parent's."""
        return CAP_MAPPEDRAM_CHILD in self.capabilities

    @property
    def zstd(self) -> bool:
        """Page regions are zstd frames (mappedram's compressed files)."""
        return CAP_MAPPEDRAM_ZSTD in self.capabilities


@dataclass(frozen=True, slots=True)
class SectionHeader:
    offset: int
    section_type: SectionType
    section_id: int
    idstr: str
    instance_id: int | None = None
    version_id: int | None = None


@dataclass(frozen=True, slots=True)
class MemSize:
    """be64 (total | RAM_SAVE_FLAG_MEM_SIZE): the sum of every block's used_length."""

    offset: int
    total: int


@dataclass(frozen=True, slots=True)
class RamBlockEntry:
    """One RAMBlock in the MEM_SIZE list (parse_ramblock)."""

    offset: int
    idstr: str
    used_length: int
    gpa: int | None = None
    header: MappedRamHeader | None = None
    header_offset: int | None = None
    end_offset: int = 0
    zstd: ZstdRegionHeader | None = None  # a compressed file's region header, after the MappedRamHeader

    @property
    def skipped(self) -> bool:
        """An x-ignore-shared block whose mapped-ram header has both offsets 0 (QEMU >= 11.0)."""
        return self.header is not None and self.header.bitmap_offset == 0 and self.header.pages_offset == 0


@dataclass(frozen=True, slots=True)
class RamPage:
    """A legacy page record: PAGE (data at ``data_offset``) or ZERO (``data_offset`` is None)."""

    offset: int
    idstr: str
    addr: int
    flags: int
    data_offset: int | None


@dataclass(frozen=True, slots=True)
class RamPageRun:
    """Consecutive legacy page records of block ``idstr`` (``batch_pages`` mode), in stream order:
    ``addrs[i]`` is a page's address in the block, ``data_offsets[i]`` the file offset of its bytes
    (PAGE) or -1 (ZERO). ``offset`` is the first record's."""

    offset: int
    idstr: str
    addrs: npt.NDArray[np.int64]
    data_offsets: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RamEos:
    offset: int


@dataclass(frozen=True, slots=True)
class SectionFooterEvent:
    offset: int
    section_id: int


@dataclass(frozen=True, slots=True)
class Command:
    offset: int
    cmd: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeviceStateStart:
    """The first byte after the RAM section's END: device sections, then QEMU_VM_EOF.

    Decoding stops here; the caller delimits the rest with the vmdesc trailer.
    """

    offset: int


Event = (
    Configuration
    | SectionHeader
    | MemSize
    | RamBlockEntry
    | RamPage
    | RamPageRun
    | RamEos
    | SectionFooterEvent
    | Command
    | DeviceStateStart
)


"""ELF64 core files as QEMU's ``dump-guest-memory`` writes them (x86, little-endian).

Theory of operation: a core file is planned once, from the guest-physical blocks
(address and size of each run of guest RAM, in address order) and the encoded notes;
the plan gives every byte of metadata and the file offset of every block's data, so the
writer only copies page data to ``CoreSegment.file_offset`` and writes the metadata.

QEMU's layout (dump_begin, prepare_elf_headers, prepare_elf_section_hdrs)::

    0x00          Elf64_Ehdr
    0x40          Elf64_Shdr[0] (all zero), Elf64_Shdr[1] (".shstrtab")
    0xc0          Elf64_Phdr: PT_NOTE, then one PT_LOAD per guest-physical block
    note_offset   the notes: NT_PRSTATUS per CPU, then one "QEMU" note per CPU
    memory_offset block data, in address order, back to back
    strtab_offset "\\0.shstrtab\\0", ending the file

QEMU's memory_offset is the end of the notes, so no page of data is aligned to the
file's blocks; ``data_alignment`` (the writer passes the page size by default) rounds it
up, so that each guest page fills whole file blocks and a zero page is an exact hole.
With ``data_alignment=1`` every field is QEMU's, with one exception: QEMU 7.2 to 10.x
store ``e_ehsize = 8`` (``sizeof`` of a pointer in prepare_elf64_header); this module
writes 64, the size of Elf64_Ehdr, as the ELF specification requires.

References:
    QEMU dump/dump.c (prepare_elf64_header, write_elf64_load, get_offset_range,
    write_elf_phdr_note, prepare_elf_section_hdr_string), include/elf.h,
    system/memory_mapping.c (qemu_get_guest_simple_memory_mapping: virt_addr 0,
    so p_vaddr is p_paddr).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from mappedram.errors import FormatError, TruncatedError

__all__ = [
    "ELFCLASS64",
    "ELFDATA2LSB",
    "EV_CURRENT",
    "ET_CORE",
    "EM_386",
    "EM_X86_64",
    "PT_LOAD",
    "PT_NOTE",
    "NT_PRSTATUS",
    "SHT_STRTAB",
    "PN_XNUM",
    "ELF64_EHDR",
    "ELF64_PHDR",
    "ELF64_SHDR",
    "ELF64_NHDR",
    "Elf64Ehdr",
    "Elf64Phdr",
    "Elf64Shdr",
    "CoreSegment",
    "CorePlan",
    "elf_note",
    "plan_core",
    "SHSTRTAB",
]

ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
NT_PRSTATUS = 1
SHT_STRTAB = 3
PN_XNUM = 0xFFFF

ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
ELF64_NHDR = struct.Struct("<III")

#: The section-name string table QEMU appends to the file: a NUL, then ".shstrtab".
SHSTRTAB = b"\0.shstrtab\0"


@dataclass(frozen=True, slots=True)
class Elf64Ehdr:
    """Elf64_Ehdr (64 bytes, little-endian)."""

    e_machine: int
    e_phoff: int
    e_shoff: int
    e_phnum: int
    e_shnum: int
    e_shstrndx: int
    e_type: int = ET_CORE
    e_entry: int = 0
    e_flags: int = 0
    e_ehsize: int = ELF64_EHDR.size

    def pack(self) -> bytes:
        ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
        return ELF64_EHDR.pack(
            ident, self.e_type, self.e_machine, EV_CURRENT, self.e_entry, self.e_phoff, self.e_shoff,
            self.e_flags, self.e_ehsize, ELF64_PHDR.size, self.e_phnum, ELF64_SHDR.size, self.e_shnum,
            self.e_shstrndx,
        )  # fmt: skip

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Elf64Ehdr:
        if len(buf) < ELF64_EHDR.size:
            raise TruncatedError("ELF header is cut off", offset=0, field="Elf64_Ehdr",
                                 expected=f"{ELF64_EHDR.size} bytes", actual=f"{len(buf)} bytes")  # fmt: skip
        (ident, e_type, e_machine, _version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, _phentsize,
         e_phnum, _shentsize, e_shnum, e_shstrndx) = ELF64_EHDR.unpack_from(buf)  # fmt: skip
        if ident[:4] != b"\x7fELF" or ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
            raise FormatError("not a little-endian ELF64 file", offset=0, field="e_ident",
                              expected="7f 45 4c 46 02 01", actual=bytes(ident[:6]))  # fmt: skip
        return cls(e_machine, e_phoff, e_shoff, e_phnum, e_shnum, e_shstrndx, e_type, e_entry, e_flags, e_ehsize)


@dataclass(frozen=True, slots=True)
class Elf64Phdr:
    """Elf64_Phdr (56 bytes)."""

    p_type: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_flags: int = 0
    p_align: int = 0

    def pack(self) -> bytes:
        return ELF64_PHDR.pack(self.p_type, self.p_flags, self.p_offset, self.p_vaddr, self.p_paddr,
                               self.p_filesz, self.p_memsz, self.p_align)  # fmt: skip

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> Elf64Phdr:
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = ELF64_PHDR.unpack_from(buf, offset)
        return cls(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align)


@dataclass(frozen=True, slots=True)
class Elf64Shdr:
    """Elf64_Shdr (64 bytes)."""

    sh_name: int = 0
    sh_type: int = 0
    sh_offset: int = 0
    sh_size: int = 0
    sh_info: int = 0

    def pack(self) -> bytes:
        return ELF64_SHDR.pack(self.sh_name, self.sh_type, 0, 0, self.sh_offset, self.sh_size, 0, self.sh_info, 0, 0)


def elf_note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """One note: Elf64_Nhdr, the name with its NUL, the descriptor, each padded to 4 bytes.

    ``name`` is given without the NUL (``b"CORE"``); n_namesz counts it, as QEMU does.
    """
    # reference: x86_64_write_elf64_note (note_size = DIV_ROUND_UP(...) * 4)
    namesz = len(name) + 1
    head = ELF64_NHDR.pack(namesz, len(desc), n_type)
    return head + _pad4(name + b"\0") + _pad4(desc)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


@dataclass(frozen=True, slots=True)
class CoreSegment:
    """One PT_LOAD: ``size`` bytes of guest-physical memory at ``paddr``, stored at ``file_offset``."""

    paddr: int
    size: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class CorePlan:
    """Everything of a core file but the page data: ``head`` goes at offset 0, ``tail`` at ``tail_offset``."""

    head: bytes
    segments: tuple[CoreSegment, ...]
    note_offset: int
    note_size: int
    memory_offset: int
    tail_offset: int
    tail: bytes

    @property
    def file_size(self) -> int:
        return self.tail_offset + len(self.tail)


# reference: dump_init, prepare_elf_headers, write_elf_loads, get_offset_range
def plan_core(
    blocks: Sequence[tuple[int, int]], notes: bytes, e_machine: int, *, data_alignment: int = 1
) -> CorePlan:
    """Lay out a core file of the guest-physical ``blocks`` (paddr, size) and the encoded ``notes``.

    Blocks must be in ascending address order and must not overlap, as QEMU's
    guest_phys_blocks are. The block data starts at the end of the notes rounded up to
    ``data_alignment`` (1: exactly where dump-guest-memory puts it).
    """
    if data_alignment < 1:
        raise ValueError(f"data_alignment must be >= 1, got {data_alignment}")
    end = -1
    for paddr, size in blocks:
        if size <= 0 or paddr < end:
            raise ValueError(f"guest-physical blocks must ascend without overlap: {paddr:#x}+{size:#x}")
        end = paddr + size
    phnum = 1 + len(blocks)
    if phnum >= PN_XNUM:
        raise ValueError(f"{phnum} program headers: more than an ELF header can count")
    shnum = 2
    shoff = ELF64_EHDR.size
    phoff = shoff + shnum * ELF64_SHDR.size
    note_offset = phoff + phnum * ELF64_PHDR.size
    memory_offset = -(-(note_offset + len(notes)) // data_alignment) * data_alignment
    segments = []
    at = memory_offset
    for paddr, size in blocks:
        segments.append(CoreSegment(paddr, size, at))
        at += size
    tail_offset = at
    ehdr = Elf64Ehdr(e_machine=e_machine, e_phoff=phoff, e_shoff=shoff, e_phnum=phnum, e_shnum=shnum, e_shstrndx=1)
    shdrs = Elf64Shdr().pack() + Elf64Shdr(sh_name=1, sh_type=SHT_STRTAB, sh_offset=tail_offset,
                                           sh_size=len(SHSTRTAB)).pack()  # fmt: skip
    phdrs = [Elf64Phdr(PT_NOTE, note_offset, 0, 0, len(notes), len(notes)).pack()]
    # reference: write_elf64_load (p_vaddr = virt_addr ?: p_paddr; virt_addr is 0 with paging off)
    phdrs += [Elf64Phdr(PT_LOAD, s.file_offset, s.paddr, s.paddr, s.size, s.size).pack() for s in segments]
    head = ehdr.pack() + shdrs + b"".join(phdrs) + notes
    head += bytes(memory_offset - len(head))
    return CorePlan(head, tuple(segments), note_offset, len(notes), memory_offset, tail_offset, SHSTRTAB)

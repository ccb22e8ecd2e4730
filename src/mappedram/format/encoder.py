"""Record encoders of QEMU's migration stream: records to bytes, the writer's half of the codec.

Each function writes one record exactly as QEMU's saving side does (the function it
mirrors is named above it); :func:`encode_page_records_into` encodes many legacy page
records straight into a caller's buffer, vectorised.

References:
    QEMU migration/savevm.c (save_section_header, save_section_footer,
    qemu_savevm_command_send, vmstate_configuration), migration/ram.c (ram_save_setup,
    save_page_header, ram_save_target_page_legacy), migration/qemu-file.c.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from .constants import (
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    STREAM_CAPABILITIES,
)
from .structs import MappedRamHeader, be16, be32, be64, pack_idstr

__all__ = [
    "encode_file_header",
    "encode_configuration",
    "encode_section_start",
    "encode_section_part",
    "encode_section_end",
    "encode_section_full",
    "encode_footer",
    "encode_command",
    "encode_mem_size",
    "encode_ram_block_entry",
    "encode_eos",
    "encode_page_record",
    "encode_page_records",
    "encode_page_records_into",
    "encode_page_headers_into",
    "page_headers_size",
    "page_records_size",
    "encode_vmdesc",
]


def encode_file_header() -> bytes:
    return be32(QEMU_VM_FILE_MAGIC) + be32(QEMU_VM_FILE_VERSION)


# reference: vmstate_configuration, configuration_pre_save, capabilities_pre_save
def encode_configuration(
    machine_type: str,
    capabilities: tuple[str, ...] = (),
    *,
    target_page_bits: int | None = None,
    uuid: bytes | None = None,
) -> bytes:
    name = machine_type.encode("ascii")
    out = bytearray([QEMU_VM_CONFIGURATION]) + be32(len(name)) + name
    if target_page_bits is not None:
        out += bytes([QEMU_VM_SUBSECTION]) + pack_idstr("configuration/target-page-bits") + be32(1)
        out += be32(target_page_bits)
    caps = [c for c in STREAM_CAPABILITIES if c in capabilities]
    if caps:
        out += bytes([QEMU_VM_SUBSECTION]) + pack_idstr("configuration/capabilities") + be32(1)
        out += be32(len(caps)) + b"".join(pack_idstr(c) for c in caps)
    if uuid is not None:
        out += bytes([QEMU_VM_SUBSECTION]) + pack_idstr("configuration/uuid") + be32(1) + uuid
    return bytes(out)


# reference: save_section_header
def encode_section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_START]) + be32(section_id) + pack_idstr(idstr) + be32(instance_id) + be32(version_id)


def encode_section_full(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_FULL]) + be32(section_id) + pack_idstr(idstr) + be32(instance_id) + be32(version_id)


def encode_section_part(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_PART]) + be32(section_id)


def encode_section_end(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_END]) + be32(section_id)


# reference: save_section_footer
def encode_footer(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_FOOTER]) + be32(section_id)


# reference: qemu_savevm_command_send
def encode_command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([QEMU_VM_COMMAND]) + be16(cmd) + be16(len(data)) + data


# reference: ram_save_setup
def encode_mem_size(total: int) -> bytes:
    return be64(total | RAM_SAVE_FLAG_MEM_SIZE)


def encode_ram_block_entry(
    idstr: str, used_length: int, *, gpa: int | None = None, header: MappedRamHeader | None = None
) -> bytes:
    out = pack_idstr(idstr) + be64(used_length)
    if gpa is not None:
        out += be64(gpa)
    if header is not None:
        out += header.pack()
    return out


def encode_eos() -> bytes:
    return be64(RAM_SAVE_FLAG_EOS)


# reference: save_page_header, save_normal_page, save_zero_page
def encode_page_record(idstr: str | None, addr: int, data: bytes | None) -> bytes:
    """A legacy page record; ``idstr`` None sets RAM_SAVE_FLAG_CONTINUE; ``data`` None is a ZERO page."""
    flags = RAM_SAVE_FLAG_PAGE if data is not None else RAM_SAVE_FLAG_ZERO
    if idstr is None:
        flags |= RAM_SAVE_FLAG_CONTINUE
    out = be64(addr | flags)
    if idstr is not None:
        out += pack_idstr(idstr)
    return out + (data if data is not None else b"\x00")


def encode_vmdesc(json_text: bytes) -> bytes:
    return bytes([QEMU_VM_VMDESCRIPTION]) + be32(len(json_text)) + json_text


def page_records_size(idstr: str | None, nonzero: npt.NDArray[np.bool_], page_size: int) -> int:
    """Bytes of the legacy records :func:`encode_page_records_into` writes for these pages."""
    n = len(nonzero)
    k = int(np.count_nonzero(nonzero))
    name = len(pack_idstr(idstr)) if idstr is not None and n else 0
    return n * 8 + k * page_size + (n - k) + name


# reference: ram_save_target_page_legacy, save_zero_page, save_normal_page (one pass, no XBZRLE)
def encode_page_records_into(
    idstr: str | None,
    first_addr: int | npt.NDArray[np.uint64],
    pages: npt.NDArray[np.uint8],
    nonzero: npt.NDArray[np.bool_],
    out: npt.NDArray[np.uint8],
) -> int:
    """Write the legacy records of consecutive pages (``pages`` is (n, page_size)) into ``out``;
    return their size (:func:`page_records_size`). Vectorised: no loop over pages or runs.
    ``first_addr`` may instead be each page's offset in the block (pages in any order).

    Zero pages become ZERO records (be64 addr|flags, u8 0), the others PAGE records. The
    first record names the block when ``idstr`` is given; every other one has CONTINUE.
    """
    n, page_size = pages.shape
    if n == 0:
        return 0
    name = pack_idstr(idstr) if idstr is not None else b""
    sizes = np.where(nonzero, 8 + page_size, 9).astype(np.int64)
    sizes[0] += len(name)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    total = int(ends[-1])
    if len(out) < total:
        raise ValueError(f"output holds {len(out)} bytes; the records need {total}")
    o = out[:total]
    addrs = (
        np.uint64(first_addr) + np.arange(n, dtype=np.uint64) * np.uint64(page_size)
        if isinstance(first_addr, int)
        else np.asarray(first_addr, dtype=np.uint64)
    )
    flags = np.where(nonzero, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO).astype(np.uint64) | np.uint64(
        RAM_SAVE_FLAG_CONTINUE
    )
    if name:
        flags[0] &= ~np.uint64(RAM_SAVE_FLAG_CONTINUE)
    words = (addrs | flags).astype(">u8").view(np.uint8).reshape(n, 8)
    o[starts[:, None] + np.arange(8)] = words
    body = starts + 8
    if name:
        o[8 : 8 + len(name)] = np.frombuffer(name, dtype=np.uint8)
        body[0] += len(name)
    o[body[~nonzero]] = 0
    data = np.flatnonzero(nonzero)
    if data.size == n:
        # every page has data: the records are (8 + page_size)-byte rows after the first
        rows = as_strided(o[body[0] :], shape=(n, page_size), strides=(8 + page_size, 1))
        rows[:] = pages
    elif data.size:
        # every page-sized window of the output, as rows (a view): each data page lands in its own
        windows = as_strided(o, shape=(total - page_size + 1, page_size), strides=(1, 1))
        windows[body[data]] = pages[data]
    return total


def encode_page_records(
    idstr: str | None, first_addr: int, pages: npt.NDArray[np.uint8], nonzero: npt.NDArray[np.bool_]
) -> list[bytes]:
    """Legacy records for consecutive pages, as bytes (see :func:`encode_page_records_into`)."""
    out = np.empty(page_records_size(idstr, nonzero, pages.shape[1]), dtype=np.uint8)
    n = encode_page_records_into(idstr, first_addr, pages, nonzero, out)
    return [out[:n].tobytes()]


def page_headers_size(idstr: str, n: int, page_size: int, name_every: int) -> int:
    """Bytes of the records :func:`encode_page_headers_into` lays out for ``n`` pages."""
    named = -(-n // max(name_every, 1)) if n else 0
    return n * (8 + page_size) + named * len(pack_idstr(idstr))


# reference: save_page_header, save_normal_page (the records' bytes around the pages)
def encode_page_headers_into(
    idstr: str, addrs: npt.NDArray[np.uint64], page_size: int, out: npt.NDArray[np.uint8], *, name_every: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Lay out PAGE records for pages at block offsets ``addrs`` in ``out`` and write all
    but the pages' bytes: each be64 address|flags, and the block's name in records 0,
    ``name_every``, 2 * ``name_every``, ... (the others have CONTINUE), so each run of
    ``name_every`` records can be sent on its own. The caller puts the pages' bytes in
    place (read straight from a file into ``out``). Returns each record's start (n + 1
    entries: the last is the total size) and each page's data offset. Vectorised.
    """
    n = len(addrs)
    name = pack_idstr(idstr)
    every = max(name_every, 1)
    named = np.arange(n) % every == 0
    sizes = np.where(named, 8 + len(name) + page_size, 8 + page_size).astype(np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    if len(out) < starts[-1]:
        raise ValueError(f"output holds {len(out)} bytes; the records need {int(starts[-1])}")
    flags = np.where(named, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE).astype(np.uint64)
    words = (np.asarray(addrs, dtype=np.uint64) | flags).astype(">u8").view(np.uint8).reshape(n, 8)
    out[starts[:-1, None] + np.arange(8)] = words
    at = starts[:-1][named] + 8
    out[at[:, None] + np.arange(len(name))] = np.frombuffer(name, dtype=np.uint8)
    data = starts[:-1] + 8 + np.where(named, len(name), 0)
    return starts, data

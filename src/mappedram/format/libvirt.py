"""libvirt's QEMU save images: the header and domain XML that libvirt writes before a QEMU stream.

Theory of operation. ``virsh save``, managed save and the memory state of external
snapshots (libvirt's ``qemuSaveImageCreate``) lay a file out as::

    virQEMUSaveHeader          92 bytes, host byte order (below)
    data_len bytes             the domain XML and its NUL; at cookieOffset (when not 0)
                               the save cookie XML and its NUL; then zero padding
                               (libvirt adds 64 KiB, so the XML can be edited in place)
    the QEMU migration stream  at header offset + 92 + data_len, to the end of the file

The stream is what QEMU wrote to the descriptor libvirt gave it: for format ``raw`` a
streamed (legacy) migration; for ``sparse`` a mapped-ram migration, QEMU told
``file:...,offset=<that position>`` (its offsets are absolute in the file, and QEMU
aligns the page regions itself); for ``gzip``, ``bzip2``, ``xz``, ``lzop`` and ``zstd``
the stream piped through that compressor. libvirt writes the header with the magic
``LibvirtQemudPart`` first and rewrites it with ``LibvirtQemudSave`` only once QEMU has
finished (``virQEMUSaveDataFinish``): a partial magic marks a save that never completed.

The header struct is written raw, in the byte order of the host that saved; a reader
that finds ``version > QEMU_SAVE_VERSION`` swaps the integers and tries again
(``qemuSaveImageBswapHeader``). This module decodes little-endian first, as x86_64 and
aarch64 hosts write, and big-endian second, and records which one matched.

Bytes in, records out: the caller reads the 92 header bytes, then ``data_len`` bytes.

References:
    libvirt src/qemu/qemu_saveimage.h (virQEMUSaveHeader, QEMU_SAVE_MAGIC,
    QEMU_SAVE_PARTIAL, QEMU_SAVE_VERSION), src/qemu/qemu_saveimage_format.h
    (virQEMUSaveFormat), src/qemu/qemu_saveimage.c (virQEMUSaveDataWrite,
    virQEMUSaveDataFinish, qemuSaveImageReadHeader, qemuSaveImageBswapHeader),
    docs/formatdomain.rst (memory units), src/util/virutil.c (virScaleInteger).
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from mappedram.errors import BadMagicError, FormatError, LayoutError, TruncatedError, UnsupportedError

__all__ = [
    "QEMU_SAVE_MAGIC",
    "QEMU_SAVE_PARTIAL",
    "QEMU_SAVE_VERSION",
    "MAX_DATA_LEN",
    "QemuSaveFormat",
    "VirQEMUSaveHeader",
    "DomainSummary",
    "LibvirtSaveImage",
    "is_libvirt_save",
    "decode_save_data",
    "parse_domain_xml",
    "memory_bytes",
]

# libvirt src/qemu/qemu_saveimage.h ("this magic string is ABI, so it can't be changed")
QEMU_SAVE_MAGIC = b"LibvirtQemudSave"
QEMU_SAVE_PARTIAL = b"LibvirtQemudPart"
QEMU_SAVE_VERSION = 2

#: Domain XML, cookie and padding are read into memory; a larger data_len is refused.
MAX_DATA_LEN = 64 << 20


class QemuSaveFormat(IntEnum):
    """virQEMUSaveFormat: the on-disk ``format`` field (values are ABI, never reused)."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3  # 3 was LZMA, deprecated by xz before any release used it
    LZOP = 4
    ZSTD = 5
    SPARSE = 6

    @property
    def label(self) -> str:
        """libvirt's name for the format (qemuSaveFormat), as ``--image-format`` takes it."""
        return self.name.lower()

    @property
    def compressed(self) -> bool:
        return self not in (QemuSaveFormat.RAW, QemuSaveFormat.SPARSE)


@dataclass(frozen=True, slots=True)
class VirQEMUSaveHeader:
    """struct _virQEMUSaveHeader: char magic[16]; uint32_t version, data_len, was_running,
    format, cookieOffset; uint32_t unused[14] (92 bytes, no padding, host byte order).

    ``cookie_offset`` is libvirt's ``cookieOffset``: where the cookie starts inside the
    data, 0 when there is none; the domain XML then fills ``data_len``.
    """

    magic: bytes
    version: int
    data_len: int
    was_running: int
    format: int
    cookie_offset: int
    unused: bytes = bytes(56)
    byteorder: str = "little"

    STRUCT_LE: ClassVar[struct.Struct] = struct.Struct("<16s5I56s")
    STRUCT_BE: ClassVar[struct.Struct] = struct.Struct(">16s5I56s")
    SIZE: ClassVar[int] = STRUCT_LE.size

    @property
    def save_format(self) -> QemuSaveFormat:
        # reference: qemuSaveImageDecompressionStart (images before version 2 are never compressed)
        return QemuSaveFormat(self.format) if self.version == QEMU_SAVE_VERSION else QemuSaveFormat.RAW

    @property
    def xml_len(self) -> int:
        """Bytes of the data holding the domain XML (with its NUL and, without a cookie, the padding)."""
        return self.cookie_offset or self.data_len

    def stream_offset(self, header_offset: int) -> int:
        """Where the QEMU stream starts, for a header at ``header_offset``."""
        return header_offset + self.SIZE + self.data_len

    def pack(self) -> bytes:
        st = self.STRUCT_LE if self.byteorder == "little" else self.STRUCT_BE
        return st.pack(
            self.magic, self.version, self.data_len, self.was_running, self.format, self.cookie_offset, self.unused
        )

    # reference: qemuSaveImageReadHeader
    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> VirQEMUSaveHeader:
        """Decode and check a header; ``offset`` is its absolute file offset (for errors)."""
        if len(buf) < cls.SIZE:
            raise TruncatedError(
                "libvirt save image header is truncated (failed to read qemu header)",
                offset=offset,
                field="virQEMUSaveHeader",
                expected=f"{cls.SIZE} bytes",
                actual=f"{len(buf)} bytes",
            )
        magic = bytes(buf[:16])
        if magic == QEMU_SAVE_PARTIAL:
            raise TruncatedError(
                "libvirt save image is incomplete: the save never finished (libvirt marks a save "
                "complete only after QEMU has written the whole stream)",
                offset=offset,
                field="magic",
                expected=QEMU_SAVE_MAGIC.decode(),
                actual=QEMU_SAVE_PARTIAL.decode(),
            )
        if magic != QEMU_SAVE_MAGIC:
            raise BadMagicError(
                "not a libvirt save image (image magic is incorrect)",
                offset=offset,
                field="magic",
                expected=QEMU_SAVE_MAGIC.decode(),
                actual=magic,
            )
        fields = cls.STRUCT_LE.unpack_from(buf, 0)
        byteorder = "little"
        if fields[1] > QEMU_SAVE_VERSION:
            # reference: qemuSaveImageBswapHeader ("convert endianness and try again")
            swapped = cls.STRUCT_BE.unpack_from(buf, 0)
            if swapped[1] <= QEMU_SAVE_VERSION:
                fields, byteorder = swapped, "big"
        _, version, data_len, was_running, fmt, cookie_offset, unused = fields
        if not 0 < version <= QEMU_SAVE_VERSION:
            raise UnsupportedError(
                "libvirt save image version is not supported",
                offset=offset + 16,
                field="version",
                expected=f"1..{QEMU_SAVE_VERSION}",
                actual=version,
            )
        if version == QEMU_SAVE_VERSION and fmt not in QemuSaveFormat._value2member_map_:
            raise UnsupportedError(
                "unsupported libvirt save image format",
                offset=offset + 28,
                field="format",
                expected=", ".join(f"{f.value} ({f.label})" for f in QemuSaveFormat),
                actual=fmt,
            )
        if data_len == 0:
            raise LayoutError(
                "invalid libvirt header data length",
                offset=offset + 20,
                field="data_len",
                expected="> 0 (domain XML, cookie and padding)",
                actual=0,
            )
        if data_len > MAX_DATA_LEN:
            raise UnsupportedError(
                "libvirt header data (domain XML, cookie, padding) is too large",
                offset=offset + 20,
                field="data_len",
                expected=f"<= {MAX_DATA_LEN:#x} bytes",
                actual=data_len,
            )
        if cookie_offset > data_len:
            raise LayoutError(
                "libvirt cookie starts past the end of the header data",
                offset=offset + 32,
                field="cookieOffset",
                expected=f"<= data_len {data_len}",
                actual=cookie_offset,
            )
        return cls(magic, version, data_len, was_running, fmt, cookie_offset, unused, byteorder)


def is_libvirt_save(buf: bytes | memoryview) -> bool:
    """True if ``buf`` starts with libvirt's save magic, complete or partial."""
    return bytes(buf[:16]) in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL)


@dataclass(frozen=True, slots=True)
class DomainSummary:
    """What ``info`` shows of the domain XML: ``<name>``, ``<uuid>``, ``<memory unit=...>`` and
    ``<os><type arch=... machine=...>`` (None where the XML has no such element)."""

    name: str | None
    uuid: str | None
    domain_type: str | None  # <domain type='kvm'|'qemu'>
    memory_value: int | None
    memory_unit: str | None  # as written (libvirt's default is KiB)
    memory_bytes: int | None
    machine: str | None
    arch: str | None


@dataclass(frozen=True, slots=True)
class LibvirtSaveImage:
    """A decoded libvirt save image header: where each piece is, and the domain it holds."""

    header_offset: int
    header: VirQEMUSaveHeader
    xml: str
    cookie: str | None
    domain: DomainSummary

    @property
    def xml_offset(self) -> int:
        return self.header_offset + VirQEMUSaveHeader.SIZE

    @property
    def cookie_file_offset(self) -> int | None:
        return self.xml_offset + self.header.cookie_offset if self.header.cookie_offset else None

    @property
    def stream_offset(self) -> int:
        return self.header.stream_offset(self.header_offset)

    @property
    def save_format(self) -> QemuSaveFormat:
        return self.header.save_format


def decode_save_data(header: VirQEMUSaveHeader, data: bytes | memoryview, header_offset: int = 0) -> LibvirtSaveImage:
    """Decode the ``data_len`` bytes that follow ``header``: the domain XML and the cookie.

    ``header_offset`` is the header's absolute file offset; errors name absolute offsets.
    """
    start = header_offset + VirQEMUSaveHeader.SIZE
    if len(data) < header.data_len:
        raise TruncatedError(
            "libvirt save image ends inside its domain XML (failed to read domain XML)",
            offset=start + len(data),
            field="data_len",
            expected=f"{header.data_len} bytes of XML, cookie and padding",
            actual=f"{len(data)} bytes",
        )
    raw = bytes(data[: header.data_len])
    xml = _c_string(raw[: header.xml_len], start, "domain XML")
    cookie = None
    if header.cookie_offset:
        cookie = _c_string(raw[header.xml_len :], start + header.xml_len, "cookie")
    domain = parse_domain_xml(xml, start)
    return LibvirtSaveImage(header_offset, header, xml, cookie, domain)


def _c_string(raw: bytes, offset: int, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise LayoutError(
            f"libvirt {what} is not NUL-terminated inside its space",
            offset=offset + len(raw),
            field=what,
            expected=f"a NUL within {len(raw)} bytes",
            actual="no NUL",
        )
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"libvirt {what} is not UTF-8",
            offset=offset + exc.start,
            field=what,
            expected="UTF-8 text",
            actual=raw[exc.start : exc.start + 8],
        ) from None


# reference: virScaleInteger (libvirt's units: b/bytes, k/KiB = 1024, KB = 1000, ..., E/EiB)
_POWERS = "kmgtpe"


def memory_bytes(value: int, unit: str | None) -> int | None:
    """``value`` in ``unit`` as libvirt scales it (default KiB), or None for a unit it does not know."""
    u = (unit or "KiB").lower()
    if u in ("b", "bytes"):
        return value
    if len(u) >= 1 and u[0] in _POWERS and u[1:] in ("", "ib", "b"):
        base = 1000 if u[1:] == "b" else 1024
        scale: int = base ** (_POWERS.index(u[0]) + 1)
        return value * scale
    return None


def parse_domain_xml(xml: str, offset: int = 0) -> DomainSummary:
    """The name, memory and machine type of a libvirt ``<domain>`` (``offset``: where the XML
    starts in the file, for errors)."""
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        # libvirt never writes a DTD; refusing one keeps entity expansion away from the parser
        raise FormatError(
            "libvirt domain XML has a DTD",
            offset=offset + xml.find("<!"),
            field="domain XML",
            expected="a <domain> element without DOCTYPE or ENTITY",
            actual="<!DOCTYPE",
        )
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        line, col = exc.position
        raise FormatError(
            "libvirt domain XML does not parse",
            offset=offset + _char_offset(xml, line, col),
            field="domain XML",
            expected="well-formed XML",
            actual=str(exc),
        ) from None
    if root.tag != "domain":
        raise FormatError(
            "libvirt save image XML is not a domain",
            offset=offset,
            field="domain XML",
            expected="<domain>",
            actual=f"<{root.tag}>",
        )
    mem = root.find("memory")
    value: int | None = None
    unit: str | None = None
    scaled: int | None = None
    if mem is not None:
        text = (mem.text or "").strip()
        if not text.isdigit():
            raise FormatError(
                "libvirt domain XML: <memory> is not a number",
                offset=offset + max(0, xml.find("<memory")),
                field="memory",
                expected="a non-negative integer",
                actual=text,
            )
        value = int(text)
        unit = mem.get("unit", "KiB")
        scaled = memory_bytes(value, unit)
    os_type = root.find("os/type")
    return DomainSummary(
        name=_text(root.find("name")),
        uuid=_text(root.find("uuid")),
        domain_type=root.get("type"),
        memory_value=value,
        memory_unit=unit,
        memory_bytes=scaled,
        machine=None if os_type is None else os_type.get("machine"),
        arch=None if os_type is None else os_type.get("arch"),
    )


def _text(el: ET.Element | None) -> str | None:
    return None if el is None or el.text is None else el.text.strip()


def _char_offset(xml: str, line: int, col: int) -> int:
    """Byte offset (UTF-8) of expat's (line, column) position in ``xml``."""
    lines = xml.split("\n")
    head = "\n".join(lines[: max(0, line - 1)])
    prefix = head + ("\n" if line > 1 else "") + (lines[line - 1][:col] if 0 < line <= len(lines) else "")
    return len(prefix.encode("utf-8"))

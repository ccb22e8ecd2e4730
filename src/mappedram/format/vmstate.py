"""Device state after the RAM section: the vmdesc trailer and the FULL device sections.

Device sections are vmstate-encoded; their lengths are not in the stream. QEMU writes
one vmdesc JSON entry per FULL section, in stream order (vmstate_save in savevm.c),
so the sections are delimited by walking the entries: each section must start with
``0x04 be32 section_id u8 len idstr be32 instance_id be32 version_id`` naming the
entry, and end with the footer ``0x7e be32 section_id`` right before the next
entry's header (or the QEMU_VM_EOF byte that ends the device state).

References:
    QEMU migration/savevm.c (vmstate_save, qemu_savevm_state_complete_precopy_non_iterable,
    qemu_savevm_state_end_precopy: the vmdesc trailer), scripts/analyze-migration.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from mappedram.errors import FormatError

from .constants import QEMU_VM_EOF, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL, QEMU_VM_VMDESCRIPTION
from .structs import be32, pack_idstr

__all__ = [
    "DeviceRecord",
    "DeviceSection",
    "VmDesc",
    "encode_device_state",
    "encode_vmdesc_json",
    "FieldSpan",
    "field_spans",
    "find_field",
    "find_vmdesc",
    "parse_vmdesc",
    "split_device_sections",
]


@dataclass(frozen=True, slots=True)
class VmDesc:
    """The QEMU_VM_VMDESCRIPTION trailer: ``0x06 be32 len json``, ending the file."""

    offset: int
    json_offset: int
    raw: bytes
    data: dict[str, Any]

    @property
    def devices(self) -> list[dict[str, Any]]:
        devices = self.data.get("devices", [])
        return devices if isinstance(devices, list) else []


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """One FULL device section; ``offset`` is its type byte, ``end`` is past its footer."""

    offset: int
    end: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    body_offset: int
    body_length: int


def find_vmdesc(tail: bytes | memoryview, base: int) -> VmDesc | None:
    """Find the trailer in ``tail`` (the file's last bytes; ``tail[0]`` is at offset ``base``).

    The trailer is the position ``p`` with ``tail[p] == 0x06`` and
    ``be32(tail[p+1:p+5]) == len(tail) - (p + 5)``. JSON text has no 0x06 byte, so the
    first such position found scanning backwards is the trailer. Returns None if absent.
    """
    data = bytes(tail)
    size = len(data)
    p = data.rfind(bytes([QEMU_VM_VMDESCRIPTION]))
    while p >= 0:
        if p + 5 <= size and struct.unpack_from(">I", data, p + 1)[0] == size - (p + 5):
            return parse_vmdesc(data[p + 5 :], offset=base + p)
        p = data.rfind(bytes([QEMU_VM_VMDESCRIPTION]), 0, p)
    return None


def parse_vmdesc(raw: bytes, *, offset: int) -> VmDesc:
    """Decode the trailer's JSON text (``raw``), whose 0x06 byte is at ``offset``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(
            "vmdesc trailer is not valid JSON",
            offset=offset + 5,
            field="vmdesc",
            expected="a JSON object",
            actual=str(exc),
        ) from None
    if not isinstance(data, dict):
        raise FormatError("vmdesc trailer is not a JSON object", offset=offset + 5, field="vmdesc")
    return VmDesc(offset=offset, json_offset=offset + 5, raw=raw, data=data)


def _section_header(blob: bytes, pos: int) -> tuple[int, str, int, int, int] | None:
    """Decode a FULL section header at ``pos``: (section_id, idstr, instance_id, version_id, end)."""
    if pos + 6 > len(blob) or blob[pos] != QEMU_VM_SECTION_FULL:
        return None
    section_id = struct.unpack_from(">I", blob, pos + 1)[0]
    n = blob[pos + 5]
    end = pos + 6 + n + 8
    if n == 0 or end > len(blob):
        return None
    try:
        idstr = blob[pos + 6 : pos + 6 + n].decode("utf-8")
    except UnicodeDecodeError:
        return None
    instance_id, version_id = struct.unpack_from(">II", blob, pos + 6 + n)
    return section_id, idstr, instance_id, version_id, end


def split_device_sections(blob: bytes, base: int, devices: list[dict[str, Any]]) -> list[DeviceSection]:
    """Delimit the FULL sections of ``blob`` (device state ending in QEMU_VM_EOF) with ``devices``.

    ``blob[0]`` sits at absolute offset ``base``. Raises FormatError where the stream and
    the vmdesc disagree.
    """
    if not blob or blob[-1] != QEMU_VM_EOF:
        raise FormatError(
            "device state does not end with QEMU_VM_EOF",
            offset=base + max(len(blob) - 1, 0),
            field="QEMU_VM_EOF",
            expected=0,
            actual=blob[-1] if blob else "end of file",
        )
    sections: list[DeviceSection] = []
    pos = 0
    last = len(blob) - 1  # index of the EOF byte
    trailer = base + len(blob)  # the trailer follows the device state
    for index, device in enumerate(devices):
        name = device.get("name") if isinstance(device, dict) else None
        instance = device.get("instance_id") if isinstance(device, dict) else None
        header = _section_header(blob, pos)
        if header is None or header[1] != name or header[2] != instance:
            found = f"section {header[1]!r} instance {header[2]}" if header else _what_is(blob, pos, last)
            raise FormatError(
                f"the vmdesc trailer (at {trailer:#x}) describes device section {index} as {name!r} "
                f"instance {instance}; the stream holds {found} there",
                offset=base + pos,
                field="section header",
                expected=f"FULL section {name!r} instance {instance}",
                actual=found,
            )
        section_id, idstr, instance_id, version_id, body = header
        footer = bytes([QEMU_VM_SECTION_FOOTER]) + struct.pack(">I", section_id)
        nxt = devices[index + 1] if index + 1 < len(devices) else None
        end = _find_section_end(blob, body, footer, nxt, last)
        if end is None:
            raise FormatError(
                f"cannot find the end of device section {idstr!r}",
                offset=base + pos,
                field="QEMU_VM_SECTION_FOOTER",
                expected=(f"footer, then section {nxt.get('name')!r}" if isinstance(nxt, dict) else "footer, then EOF"),
                actual="no such footer",
            )
        sections.append(
            DeviceSection(
                offset=base + pos,
                end=base + end,
                section_id=section_id,
                idstr=idstr,
                instance_id=instance_id,
                version_id=version_id,
                body_offset=base + body,
                body_length=end - len(footer) - body,
            )
        )
        pos = end
    if pos != last:
        found = _what_is(blob, pos, last)
        raise FormatError(
            f"the stream holds {found} after the {len(devices)} device sections the vmdesc trailer "
            f"(at {trailer:#x}) describes",
            offset=base + pos,
            field="QEMU_VM_EOF",
            expected=f"QEMU_VM_EOF after {len(devices)} sections",
            actual=found,
        )
    return sections


def _what_is(blob: bytes, pos: int, last: int) -> str:
    header = _section_header(blob, pos)
    if header is not None:
        return f"section {header[1]!r} instance {header[2]}"
    return "QEMU_VM_EOF" if pos == last else f"bytes {blob[pos : pos + 8].hex(' ')}"


def _find_section_end(blob: bytes, body: int, footer: bytes, nxt: Any, last: int) -> int | None:
    """Past the footer that ends the section: the one followed by the next described
    section, or for the last one by QEMU_VM_EOF; failing that, the first followed by any
    section or by QEMU_VM_EOF, where the stream and the trailer part (the caller reports it)."""
    undescribed = None
    at = blob.find(footer, body)
    while at >= 0:
        end = at + len(footer)
        header = _section_header(blob, end)
        if nxt is None and end == last:
            return end
        named = None if header is None else (header[1], header[2])
        if nxt is not None and named == (nxt.get("name"), nxt.get("instance_id")):
            return end
        if undescribed is None and (header is not None or end == last):
            undescribed = end
        at = blob.find(footer, at + 1)
    return undescribed


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device's state, to be written as a FULL section with its vmdesc entry.

    ``body`` is the vmstate-encoded fields; ``fields`` describes them as QEMU's vmdesc does
    (``{"name", "type", "size"}`` each), so analyze-migration.py style readers can walk it.
    """

    idstr: str
    instance_id: int
    version_id: int
    body: bytes
    fields: tuple[dict[str, Any], ...] = ()
    vmsd_name: str | None = None


# reference: qemu_savevm_state_complete_precopy_non_iterable, save_section_header, vmstate_save
def encode_device_state(records: list[DeviceRecord], *, first_section_id: int) -> tuple[bytes, list[dict[str, Any]]]:
    """The device state of a stream (FULL sections, then QEMU_VM_EOF) and its vmdesc entries.

    Sections are numbered from ``first_section_id`` in the order given.
    """
    out = bytearray()
    devices: list[dict[str, Any]] = []
    for k, rec in enumerate(records):
        sid = first_section_id + k
        out += bytes([QEMU_VM_SECTION_FULL]) + be32(sid) + pack_idstr(rec.idstr)
        out += be32(rec.instance_id) + be32(rec.version_id) + rec.body
        out += bytes([QEMU_VM_SECTION_FOOTER]) + be32(sid)
        devices.append(
            {
                "name": rec.idstr,
                "instance_id": rec.instance_id,
                "vmsd_name": rec.vmsd_name or rec.idstr,
                "version": rec.version_id,
                "fields": list(rec.fields),
            }
        )
    out.append(QEMU_VM_EOF)
    return bytes(out), devices


# reference: qemu_savevm_state_end_precopy (json_writer: "page_size", "devices")
def encode_vmdesc_json(devices: list[dict[str, Any]], *, page_size: int) -> bytes:
    """The vmdesc trailer's JSON text, in QEMU's style (``": "`` and ``", "`` separators)."""
    return json.dumps({"page_size": page_size, "devices": devices}).encode("utf-8")


@dataclass(frozen=True, slots=True)
class FieldSpan:
    """Where one vmdesc field lies in a section body: ``count`` elements of ``size`` bytes from ``offset``."""

    name: str
    offset: int
    size: int
    count: int
    struct_fields: tuple[object, ...] | None  # the fields of a struct element, when the field is one


def field_spans(fields: object, base: int = 0) -> list[FieldSpan]:
    """The byte spans of vmdesc ``fields`` (a JSON list), laid end to end from ``base``.

    QEMU writes one vmdesc entry per field it sends, in order, with ``size`` the bytes one
    element took and ``array_len`` the element count of a compressed array
    (vmsd_desc_field_start, vmsd_desc_field_end in migration/vmstate.c). The spans cover
    the fields only: subsections follow them in the stream.
    """
    if not isinstance(fields, list):
        raise FormatError("vmdesc fields are not a list", field="vmdesc", expected="a JSON list",
                          actual=type(fields).__name__)  # fmt: skip
    spans = []
    at = base
    for entry in fields:
        name = entry.get("name") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        count = entry.get("array_len", 1) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _count(size) or not _count(count):
            raise FormatError("vmdesc field has no name, size or element count", field="vmdesc",
                              expected="name, size >= 0, array_len >= 0", actual=str(entry)[:80])  # fmt: skip
        assert isinstance(size, int) and isinstance(count, int) and isinstance(entry, dict)
        inner = entry.get("struct")
        sub = inner.get("fields") if isinstance(inner, dict) else None
        spans.append(FieldSpan(name, at, size, count, tuple(sub) if isinstance(sub, list) else None))
        at += size * count
    return spans


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def find_field(fields: object, path: tuple[str, ...], base: int = 0) -> FieldSpan | None:
    """The span of the field named by ``path`` (struct members descend: ``("parent_obj", "config[0]")``)."""
    for span in field_spans(fields, base):
        if span.name != path[0]:
            continue
        if len(path) == 1:
            return span
        if span.struct_fields is None:
            return None
        return find_field(list(span.struct_fields), path[1:], span.offset)
    return None

"""The vmdesc trailer as a description of the stream: what QEMU writes, and whether it fits.

QEMU's loader skips the trailer, but its tools (scripts/analyze-migration.py) read every
non-iterable section with it: the configuration section with the ``"configuration"``
entry, each FULL device section with its ``"devices"`` entry, field by field and then
subsection by subsection. A trailer that describes a subsection the stream lacks, or
lacks one the stream holds, breaks them ("Unknown section type: 5", "Subsection ... not
found"). This module builds the configuration entry QEMU writes for a configuration
section, puts it into a trailer, and walks a section body with its entry the way those
tools do, reporting where the two disagree.

References:
    QEMU migration/savevm.c (vmstate_configuration, vmstate_target_page_bits,
    vmstate_capabilites, vmstate_uuid, qemu_savevm_state_header: the "configuration" entry
    opens the trailer's object), migration/vmstate.c (vmstate_save_state_v,
    vmsd_desc_field_start, vmsd_desc_field_end, vmstate_subsection_save: the JSON of one
    description), scripts/analyze-migration.py (VMSDFieldStruct.read, ConfigurationSection).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mappedram.errors import FormatError

from .constants import QEMU_VM_SUBSECTION, STREAM_CAPABILITIES
from .events import Configuration
from .vmstate import DeviceSection, VmDesc

__all__ = [
    "EXTENSION_KEY",
    "CLEAN_ZERO_SLOTS",
    "SEAL",
    "PARENT",
    "set_extension",
    "extension",
    "CONFIGURATION_SUBSECTIONS",
    "configuration_entry",
    "configuration_entry_of",
    "describe_configuration",
    "trailer_mismatches",
]

#: The configuration section's subsections, in the order QEMU sends them (vmstate_configuration).
CONFIGURATION_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities", "configuration/uuid")

#: The trailer key under which this project records what QEMU's format cannot say. QEMU's
#: loader never parses the trailer and analyze-migration.py reads only "configuration",
#: "page_size" and "devices", so both ignore it.
EXTENSION_KEY = "mappedram"
#: Every page slot whose bitmap bit is 0 reads as zeros (a hole, or zeros written): the page
#: regions are a correct memory image as they stand (QEMU never clears a slot it leaves).
CLEAN_ZERO_SLOTS = "clean-zero-slots"
#: The integrity manifest (format/seal.py): digests of the RAM as a restore reads it, and of the rest.
SEAL = "seal"
#: An incremental snapshot's parent (format/chain.py): its path, size and content digest.
PARENT = "parent"

#: Nesting allowed in a description (QEMU's deepest are a few levels).
_MAX_DEPTH = 32


def _field(name: str, type_: str, size: int, array_len: int | None = None) -> dict[str, Any]:
    # key order of vmsd_desc_field_start / vmsd_desc_field_end: name, array_len, type, size
    entry: dict[str, Any] = {"name": name}
    if array_len is not None:
        entry["array_len"] = array_len
    entry["type"] = type_
    entry["size"] = size
    return entry


def _subsection(name: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"vmsd_name": name, "version": 1, "fields": fields}


# reference: vmstate_configuration and its subsections, as vmstate_save_state_v describes them
def configuration_entry(
    machine_type: str,
    capabilities: Sequence[str] = (),
    *,
    target_page_bits: int | None = None,
    uuid: bytes | None = None,
    order: Sequence[str] = CONFIGURATION_SUBSECTIONS,
) -> dict[str, Any]:
    """The ``"configuration"`` entry QEMU writes for this configuration section.

    ``capabilities`` are the validated ones in the order the stream lists them (QEMU's
    order, as :func:`~mappedram.format.encoder.encode_configuration` sends them, for a
    file this project writes); ``order`` is the order of the subsections in the stream.
    """
    name = machine_type.encode("ascii")
    caps = [c for c in capabilities if c in STREAM_CAPABILITIES]
    subs: dict[str, dict[str, Any]] = {}
    if target_page_bits is not None:
        subs["configuration/target-page-bits"] = _subsection(
            "configuration/target-page-bits", [_field("target_page_bits", "uint32", 4)]
        )
    if caps:
        # a VARRAY of capabilities compresses to one entry: array_len when more than one,
        # size is what the first element took (its length byte and name)
        first = 1 + len(caps[0].encode("ascii"))
        subs["configuration/capabilities"] = _subsection(
            "configuration/capabilities",
            [
                _field("caps_count", "uint32", 4),
                _field("capabilities", "capability", first, len(caps) if len(caps) > 1 else None),
            ],
        )
    if uuid is not None:
        subs["configuration/uuid"] = _subsection("configuration/uuid", [_field("uuid.data", "uint8", 1, 16)])
    entry: dict[str, Any] = {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [_field("len", "uint32", 4), _field("name", "buffer", len(name))],
    }
    ordered = [subs[s] for s in order if s in subs] + [v for k, v in subs.items() if k not in order]
    if ordered:
        entry["subsections"] = ordered
    return entry


def configuration_entry_of(config: Configuration) -> dict[str, Any] | None:
    """The entry QEMU writes for a decoded configuration section (None: the stream has none)."""
    if config.machine_type is None:
        return None
    return configuration_entry(
        config.machine_type,
        config.capabilities,
        target_page_bits=config.target_page_bits,
        uuid=config.uuid,
        order=config.subsections,
    )


def describe_configuration(json_text: bytes, entry: dict[str, Any] | None) -> bytes:
    """``json_text`` (a trailer's JSON) with its ``"configuration"`` entry set to ``entry``.

    The entry comes first, as qemu_savevm_state_header opens it; ``None`` removes it. A
    trailer that already holds the entry is returned unchanged, byte for byte; otherwise it
    is written again in QEMU's JSON style (``", "`` and ``": "``, ASCII), which reproduces
    QEMU's own text for everything else.
    """
    data = json.loads(json_text.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("a vmdesc trailer is a JSON object")
    keys = list(data)
    if entry is None:
        if "configuration" not in data:
            return json_text
        data.pop("configuration")
        return json.dumps(data).encode("utf-8")
    if keys and keys[0] == "configuration" and data["configuration"] == entry:
        return json_text
    rest = {k: v for k, v in data.items() if k != "configuration"}
    return json.dumps({"configuration": entry, **rest}).encode("utf-8")


def set_extension(json_text: bytes, name: str, value: Any) -> bytes:
    """``json_text`` with ``trailer["mappedram"][name] = value`` (the key goes last);
    ``value`` None removes ``name`` (and the "mappedram" key once it is empty)."""
    data = json.loads(json_text.decode("utf-8"))
    ext = data.get(EXTENSION_KEY)
    ext = dict(ext) if isinstance(ext, dict) else {}
    unchanged = name not in ext if value is None else (name in ext and ext[name] == value)
    if unchanged:
        return json_text
    ext.pop(name, None)
    if value is not None:
        ext[name] = value
    data.pop(EXTENSION_KEY, None)
    if ext:
        data[EXTENSION_KEY] = ext
    return json.dumps(data).encode("utf-8")


def extension(data: dict[str, Any], name: str) -> Any:
    """The value of ``name`` under the trailer's "mappedram" key (None when absent)."""
    ext = data.get(EXTENSION_KEY)
    return ext.get(name) if isinstance(ext, dict) else None


# -- the walk of analyze-migration.py ---------------------------------------------------


class _Mismatch(Exception):
    def __init__(self, message: str, at: int, expected: str, actual: str) -> None:
        super().__init__(message)
        self.message, self.at, self.expected, self.actual = message, at, expected, actual


def _count(value: object, default: int = 1) -> int | None:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _walk(desc: object, blob: bytes, pos: int, end: int, depth: int) -> int:
    if depth > _MAX_DEPTH:
        raise _Mismatch("the description nests too deeply", pos, f"<= {_MAX_DEPTH} levels", "more")
    fields = desc.get("fields") if isinstance(desc, dict) else None
    if not isinstance(fields, list):
        raise _Mismatch("a description has no fields", pos, "a 'fields' list", str(desc)[:60])
    for f in fields:
        name = f.get("name") if isinstance(f, dict) else None
        n = _count(f.get("array_len")) if isinstance(f, dict) else None
        size = _count(f.get("size"), -1) if isinstance(f, dict) else None
        if not isinstance(f, dict) or not isinstance(name, str) or n is None or size is None or size < 0:
            raise _Mismatch("a field entry has no name, size or element count", pos,
                            "name, size >= 0, array_len >= 0", str(f)[:60])  # fmt: skip
        kind = f.get("type")
        if kind == "struct":
            for _ in range(n):
                nxt = _walk(f.get("struct"), blob, pos, end, depth + 1)
                if nxt == pos:  # an empty struct: every element is
                    break
                pos = nxt
        elif kind == "capability":
            for _ in range(n):
                if pos >= end:
                    break
                pos += 1 + blob[pos]
        else:
            pos += size * n
        if pos > end:
            raise _Mismatch(f"field {name!r} runs past the end of the section", end,
                            f"{pos - end} more bytes for {name!r}", "the section's end")  # fmt: skip
    subsections = desc.get("subsections", []) if isinstance(desc, dict) else []
    for sub in subsections if isinstance(subsections, list) else []:
        want = sub.get("vmsd_name") if isinstance(sub, dict) else None
        if pos >= end or blob[pos] != QEMU_VM_SUBSECTION:
            found = "the section's end" if pos >= end else f"byte {blob[pos]:#04x}"
            raise _Mismatch(f"subsection {want!r} is described but not in the stream", pos,
                            f"QEMU_VM_SUBSECTION {want!r}", found)  # fmt: skip
        name_len = blob[pos + 1] if pos + 1 < end else 0
        name = blob[pos + 2 : pos + 2 + name_len].decode("utf-8", "replace")
        if name != want or pos + 6 + name_len > end:
            raise _Mismatch("the stream holds another subsection than described", pos,
                            f"subsection {want!r}", f"subsection {name!r}")  # fmt: skip
        pos = _walk(sub, blob, pos + 6 + name_len, end, depth + 1)
    return pos


def _fit(desc: object, blob: bytes, base: int, start: int, end: int, what: str, trailer: int) -> FormatError | None:
    """None if ``desc`` reads ``blob[start:end]`` exactly; else the mismatch.

    The error's offset is the trailer's (``trailer``): that is what is wrong; the message
    says where in the stream the description stops fitting (``base`` is ``blob[0]``'s offset).
    """
    try:
        stop = _walk(desc, blob, start, end, 0)
    except _Mismatch as m:
        return FormatError(f"vmdesc trailer does not fit {what}: {m.message} (stream offset {base + m.at:#x})",
                           offset=trailer, field="vmdesc", expected=m.expected, actual=m.actual)  # fmt: skip
    if stop == end:
        return None
    if blob[stop] == QEMU_VM_SUBSECTION:
        n = blob[stop + 1] if stop + 1 < end else 0
        name = blob[stop + 2 : stop + 2 + n].decode("utf-8", "replace")
        return FormatError(f"vmdesc trailer does not describe subsection {name!r} of {what} "
                           f"(stream offset {base + stop:#x})", offset=trailer, field="vmdesc",
                           expected=f"subsection {name!r} described", actual="no such description")  # fmt: skip
    return FormatError(f"vmdesc trailer describes {stop - start} of the {end - start} bytes of {what}",
                       offset=trailer, field="vmdesc", expected=f"fields covering {end - start} bytes",
                       actual=f"{stop - start} bytes described")  # fmt: skip


# reference: analyze-migration.py MigrationDump.read (what it needs of the trailer)
def trailer_mismatches(
    vmdesc: VmDesc,
    configuration: Configuration,
    config_bytes: bytes,
    sections: Sequence[DeviceSection],
    device_blob: bytes,
    device_base: int,
    page_size: int,
) -> list[FormatError]:
    """Where the trailer fails to describe the stream (empty: QEMU's tools read it whole).

    ``config_bytes`` is the configuration section after its type byte (at
    ``configuration.offset + 1``); ``device_blob`` the device state at ``device_base``.
    Checked: ``page_size``; the ``"configuration"`` entry reads the configuration section
    exactly (every subsection the stream holds described, none it lacks); no entry for a
    stream without one; each device entry's version is its section's and its fields and
    subsections read the section body exactly.
    """
    found: list[FormatError] = []
    at = vmdesc.json_offset
    desc = vmdesc.data.get("configuration")
    where = f"the configuration section at {configuration.offset:#x}"
    if configuration.machine_type is None:
        if desc is not None:
            found.append(FormatError("vmdesc trailer describes a configuration section the stream does not have",
                                     offset=at, field="vmdesc configuration", expected="no configuration entry",
                                     actual="a configuration entry"))  # fmt: skip
    elif desc is None:
        if configuration.subsections:
            found.append(FormatError(f"vmdesc trailer has no configuration entry for {where}", offset=at,
                                     field="vmdesc configuration",
                                     expected="an entry describing " + ", ".join(configuration.subsections),
                                     actual="none"))  # fmt: skip
    else:
        problem = _fit(desc, config_bytes, configuration.offset + 1, 0, len(config_bytes), where, at)
        if problem is not None:
            found.append(problem)
    if vmdesc.data.get("page_size") != page_size:
        found.append(FormatError("vmdesc page_size differs from the stream's", offset=at, field="vmdesc page_size",
                                 expected=str(page_size), actual=str(vmdesc.data.get("page_size"))))  # fmt: skip
    for index, (section, device) in enumerate(zip(sections, vmdesc.devices)):
        what = f"device section {section.idstr!r} instance {section.instance_id} at {section.offset:#x}"
        if device.get("version") != section.version_id:
            found.append(FormatError(f"vmdesc devices[{index}] has another version than {what}",
                                     offset=at, field="vmdesc version",
                                     expected=str(section.version_id), actual=str(device.get("version"))))  # fmt: skip
            continue
        start = section.body_offset - device_base
        problem = _fit(device, device_blob, device_base, start, start + section.body_length, what, at)
        if problem is not None:
            found.append(problem)
    return found


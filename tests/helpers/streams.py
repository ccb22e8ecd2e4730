"""Build small migration streams in memory from the codec's encoders (for golden and hostile tests).

Device state is a tiny made-up FULL section with a matching vmdesc, as QEMU lays it out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from mappedram.format.bitmap import encode_bitmap
from mappedram.format.constants import MIG_CMD_SWITCHOVER_START
from mappedram.format.encoder import (
    encode_command,
    encode_configuration,
    encode_eos,
    encode_file_header,
    encode_footer,
    encode_mem_size,
    encode_page_record,
    encode_ram_block_entry,
    encode_section_end,
    encode_section_full,
    encode_section_part,
    encode_section_start,
    encode_vmdesc,
)
from mappedram.layout import plan_mapped_ram

PAGE = 4096
RAM_ID = 2
MACHINE = "pc-q35-10.0"


def device_state() -> tuple[bytes, bytes]:
    """(device sections + EOF, vmdesc trailer) for one made-up 'timer' device, section id 0."""
    body = bytes(range(16))
    blob = encode_section_full(0, "timer", 0, 2) + body + encode_footer(0) + b"\x00"
    desc = {
        "page_size": PAGE,
        "devices": [
            {
                "name": "timer",
                "instance_id": 0,
                "vmsd_name": "timer",
                "version": 2,
                "fields": [{"name": "data", "type": "buffer", "size": 16}],
            }
        ],
    }
    text = json.dumps(desc, separators=(", ", ": ")).encode()
    return blob, encode_vmdesc(text)


def mapped_ram_stream(
    blocks: Sequence[tuple[str, bytes]],
    *,
    start: int = 0,
    alignment: int = PAGE,
    parts: int = 1,
    stale: bool = True,
    machine: str = MACHINE,
    ram_id: int = RAM_ID,
    device: tuple[bytes, bytes] | None = None,
) -> bytes:
    """A mapped-ram file (bytes from offset 0, stream at ``start``): zero pages have bit 0 and,
    with ``stale``, their slots hold 0xEE garbage that a reader must never return. ``device``
    is (device sections + EOF, vmdesc trailer), by default one made-up section."""
    head = bytearray(start) + encode_file_header() + encode_configuration(machine, ("mapped-ram",))
    head += encode_section_start(ram_id, "ram", 0, 4)
    head += encode_mem_size(sum(len(d) for _, d in blocks))
    plan = plan_mapped_ram([(n, len(d)) for n, d in blocks], entries_offset=len(head), alignment=alignment)
    out = bytearray(plan.eos_offset)
    out[: len(head)] = head
    for lay, (name, data) in zip(plan.blocks, blocks):
        entry = encode_ram_block_entry(name, len(data), header=lay.header())
        out[lay.entry_offset : lay.entry_offset + len(entry)] = entry
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
        bits = pages.any(axis=1)
        region = np.frombuffer(data, dtype=np.uint8).copy().reshape(-1, PAGE)
        if stale:
            region[~bits] = 0xEE
        else:
            region[~bits] = 0
        out[lay.pages_offset : lay.end] = region.tobytes()
        bm = encode_bitmap(bits)
        out[lay.bitmap_offset : lay.bitmap_offset + len(bm)] = bm
    out += encode_eos() + encode_footer(ram_id)
    for _ in range(parts):
        out += encode_section_part(ram_id) + encode_eos() + encode_footer(ram_id)
    out += encode_command(MIG_CMD_SWITCHOVER_START)
    out += encode_section_end(ram_id) + encode_eos() + encode_footer(ram_id)
    blob, trailer = device if device is not None else device_state()
    return bytes(out + blob + trailer)


def legacy_stream(
    blocks: Sequence[tuple[str, bytes]],
    passes: Sequence[Sequence[tuple[str, int, bytes | None]]] = (),
) -> bytes:
    """A legacy stream: pass 1 sends every page of every block (ZERO for zero pages); each later
    pass sends the given (block, page index, data or None for ZERO) records."""
    out = bytearray(encode_file_header() + encode_configuration(MACHINE))
    out += encode_section_start(RAM_ID, "ram", 0, 4) + encode_mem_size(sum(len(d) for _, d in blocks))
    for name, data in blocks:
        out += encode_ram_block_entry(name, len(data))
    out += encode_eos() + encode_footer(RAM_ID)
    first: list[tuple[str, int, bytes | None]] = []
    for name, data in blocks:
        for i in range(len(data) // PAGE):
            page = data[i * PAGE : (i + 1) * PAGE]
            first.append((name, i, page if page.count(0) != PAGE else None))
    for records in [first, *passes]:
        out += encode_section_part(RAM_ID)
        last = None
        for name, index, page in records:
            out += encode_page_record(None if name == last else name, index * PAGE, page)
            last = name
        out += encode_eos() + encode_footer(RAM_ID)
    out += encode_command(MIG_CMD_SWITCHOVER_START)
    out += encode_section_end(RAM_ID) + encode_eos() + encode_footer(RAM_ID)
    blob, trailer = device_state()
    return bytes(out + blob + trailer)


def as_qemu_writes_it(data: bytes) -> bytes:
    """``data`` (a whole file) with its trailer as QEMU would write it: without this
    project's "mappedram" key (QEMU's tools ignore it; QEMU never writes it)."""
    import json

    from mappedram.format.encoder import encode_vmdesc
    from mappedram.format.vmdesc import EXTENSION_KEY
    from mappedram.format.vmstate import find_vmdesc

    tail_at = max(0, len(data) - (16 << 20))
    vmdesc = find_vmdesc(data[tail_at:], tail_at)
    if vmdesc is None or EXTENSION_KEY not in vmdesc.data:
        return data
    trailer = json.loads(vmdesc.raw)
    del trailer[EXTENSION_KEY]
    return data[: vmdesc.offset] + encode_vmdesc(json.dumps(trailer).encode())

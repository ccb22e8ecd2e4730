#!/usr/bin/env python3
"""Mutation fuzzer for the reader: mutated migration files may only raise FormatError.

Seeds are small, valid files: mapped-ram and legacy streams, and one carrying the
device state and vmdesc of a real QEMU 10 file, each also sealed (ops/seal.py), and each
also compressed (ops/zstd.py: frames of two pages, so the seeds stay small), sealed or not. Each
input is a seed with random mutations (bit flips, byte sets, interesting integers in
big-endian fields, cuts, insertions, deletions, duplicated chunks); a sealed seed's
trailer is also rewritten with a mutated seal (keys dropped or added, versions,
algorithms, chunk sizes and lengths that lie, digests cut, padded, swapped or not hex,
blocks missing, extra or reordered), framed right so the reader gets to the seal. An
incremental snapshot (a child of a parent file the worker keeps beside its input, format/
chain.py) is a seed too: its trailer's parent entry is mutated (keys dropped or added, types
and values that lie, sizes and digests off by one, the child itself or system files as
the parent: cycles, devices, directories), and then the chain is read through.
A compressed seed's input may instead lie in its structure (:func:`mutate_zstd`): a seek
table's sizes, counts, descriptor or magic numbers, a region header's length, frame size
or frame count, or its frames swapped, cut, dropped, duplicated, padded, or replaced by
hostile ones (content sizes that lie, zstd "bombs" of RLE blocks, unknown window sizes),
the file re-laid around the new frames so that the reader gets to decompress them. Each is
written to a file in /dev/shm, opened, every page of every block read, and verified (also
with --data: every digest); a compressed input is sometimes also decompressed and
compressed again (the engine's threaded readers). Anything but FormatError (or
IOEngineError, an I/O failure: counted apart, saved as "io-*") is a crash; an
input that takes more than --timeout seconds is a hang; workers run under a memory
limit (--max-mem-mib), so a blow-up shows as a crash. Crashing inputs are saved.

usage: python tools/fuzz.py [--inputs 1000000] [--workers N] [--seed S] [--out fuzz-crashes]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.helpers builds the seeds


import numpy as np  # noqa: E402

import mappedram  # noqa: E402
from mappedram import ops  # noqa: E402
from mappedram.errors import IOEngineError  # noqa: E402
from mappedram.format.encoder import encode_vmdesc  # noqa: E402
from mappedram.format.structs import MappedRamHeader, ZstdRegionHeader  # noqa: E402
from mappedram.format.vmstate import find_vmdesc  # noqa: E402
from mappedram.format.zstdseek import encode_seek_table  # noqa: E402

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x1000, 0xFFF, 0x100000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 64) - 1]


class Hang(Exception):
    pass


def seeds() -> list[bytes]:
    from tests.helpers.patterns import random_pages
    from tests.helpers.streams import legacy_stream, mapped_ram_stream

    a = random_pages(6, 0.5, 1).tobytes()
    b = random_pages(2, 0.0, 2).tobytes()
    out = [
        mapped_ram_stream([("pc.ram", a), ("pc.bios", b)], parts=2),
        legacy_stream(
            [("pc.ram", a), ("/rom@etc/acpi/tables", b)], [[("pc.ram", 1, None), ("pc.ram", 2, b"\x01" * 4096)]]
        ),
    ]
    vector = ROOT / "tests" / "data" / "qemu" / "q35-64M-mapped-ram.mig.zst"
    try:
        import zstandard

        with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
            with vector.open("rb") as fin:
                zstandard.ZstdDecompressor().copy_stream(fin, tmp)
            tmp.flush()
            with mappedram.open_file(tmp.name) as f:
                assert f.vmdesc is not None
                device = (f.device_state(), encode_vmdesc(f.vmdesc.raw))
                out.append(mapped_ram_stream([("m0", a), ("pc.bios", b)], machine=f.machine_type or "pc-q35-10.0",
                                             ram_id=f.ram_section_id, device=device))  # fmt: skip
    except (ImportError, OSError):
        pass
    plain = out + [_sealed(seed) for seed in out]
    return plain + [_compressed(seed, sealed) for seed in out for sealed in (False, True)]


#: Two pages per frame: every seed block has several frames (or one short one).
FUZZ_FRAME_BYTES = 8192


def _compressed(data: bytes, sealed: bool) -> bytes:
    """``data`` compressed in frames of FUZZ_FRAME_BYTES (sealed anew with ``sealed``)."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as src, tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        src.write(data)
        src.flush()
        out = os.path.join(tmp, "z.mig")
        ops.compress(src.name, out, compression=ops.CompressOptions(level=1, frame_bytes=FUZZ_FRAME_BYTES),
                     options=ops.EngineOptions(channels=1, durable=False),
                     seal=ops.SealOptions() if sealed else None)  # fmt: skip
        return Path(out).read_bytes()


def _sealed(data: bytes) -> bytes:
    """``data`` sealed in place (through a file in /dev/shm)."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
        tmp.write(data)
        tmp.flush()
        ops.seal_file(tmp.name, options=ops.EngineOptions(channels=1, durable=False))
        return Path(tmp.name).read_bytes()


SEAL_VALUES: list[Any] = [None, True, 0, 1, 2, -1, 4095, 4096, 1 << 20, (1 << 20) + 1, 1 << 31, 1 << 64, "blake3",
                          "sha256", "md5", "", "00" * 32, "AB" * 32, [], {}, ["x"], 1.5]


def mutate_seal(data: bytes, rng: random.Random) -> bytes | None:
    """``data`` with its trailer's seal mutated (the trailer framed right); None without a seal."""
    tail_at = max(0, len(data) - (8 << 20))
    vmdesc = find_vmdesc(data[tail_at:], tail_at)
    seal = vmdesc.data.get("mappedram", {}).get("seal") if vmdesc is not None else None
    if vmdesc is None or not isinstance(seal, dict):
        return None
    desc = json.loads(json.dumps(vmdesc.data))
    seal = desc["mappedram"]["seal"]
    blocks = seal.get("blocks") if isinstance(seal.get("blocks"), list) else []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(9)
        if op == 0 and seal:
            seal.pop(rng.choice(sorted(seal)))
        elif op == 1:
            seal[rng.choice(["version", "algorithm", "keyed", "chunk_bytes", "state", "blocks", "extra"])] = rng.choice(
                SEAL_VALUES)
        elif op == 2 and blocks:
            b = rng.choice(blocks)
            if isinstance(b, dict) and isinstance(b.get("digests"), str):
                d = b["digests"]
                k = rng.randrange(1, 130)
                b["digests"] = rng.choice([d[:-k], d + "0" * k, d[:k] + rng.choice("Gg A-") + d[k + 1 :], d.upper()])
        elif op == 3 and blocks:
            edit = rng.randrange(3)
            if edit == 0:
                blocks.pop(rng.randrange(len(blocks)))
            elif edit == 1:
                blocks.insert(rng.randrange(len(blocks) + 1), dict(rng.choice(blocks)))
            else:
                blocks.reverse()
        elif op == 4 and blocks:
            b = rng.choice(blocks)
            if isinstance(b, dict):
                b[rng.choice(["idstr", "used_length", "digests", "x"])] = rng.choice(SEAL_VALUES)
        elif op == 5:
            desc["mappedram"]["seal"] = rng.choice(SEAL_VALUES)
            break
        elif op == 6 and blocks:  # a digest that lies: well formed, wrong (verify --data finds it)
            b = rng.choice(blocks)
            if isinstance(b, dict) and isinstance(b.get("digests"), str) and b["digests"]:
                d, k = b["digests"], rng.randrange(len(b["digests"]))
                b["digests"] = d[:k] + ("1" if d[k] == "0" else "0") + d[k + 1 :]
        elif op == 7 and isinstance(seal.get("state"), str):
            seal["state"] = "".join(rng.choice("0123456789abcdef") for _ in range(64))
        elif op == 8:
            seal["chunk_bytes"] = rng.choice([4096, 8192, 1 << 21, 1 << 30, 3 << 20])
    return data[: vmdesc.offset] + encode_vmdesc(json.dumps(desc).encode("utf-8"))


@dataclass(frozen=True)
class ZBlock:
    """A compressed block of a seed, as mutate_zstd takes it apart."""

    header: int  # the MappedRamHeader's offset (the ZstdRegionHeader follows it)
    pages: int  # pages_offset
    region: int  # region_length
    frame_pages: int
    page_size: int
    frames: tuple[bytes, ...]
    lengths: tuple[int, ...]

    @property
    def table(self) -> int:
        """Where the seek table starts."""
        return self.pages + sum(len(f) for f in self.frames)


def zstd_blocks(data: bytes) -> list[ZBlock] | None:
    """The compressed blocks of a (valid) compressed file, or None: not compressed, or
    :func:`relay` does not give the file back byte for byte."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
        tmp.write(data)
        tmp.flush()
        with mappedram.open_file(tmp.name) as mf:
            if not mf.compressed:
                return None
            out = []
            for b in mf.blocks:
                if b.layout is None or b.layout.zstd is None or b.zstd is None:
                    return None
                frames = tuple(data[o : o + n] for o, n in zip(b.zstd.offsets.tolist(), b.zstd.sizes.tolist()))
                out.append(ZBlock(b.layout.header_offset, b.layout.pages_offset, b.layout.zstd.region_length,
                                  b.zstd.frame_pages, b.page_size, frames, tuple(b.zstd.lengths.tolist())))  # fmt: skip
    if relay(data, out, {}) != data:
        return None
    return out


def relay(data: bytes, blocks: list[ZBlock], new: dict[int, tuple[list[bytes], list[int]]]) -> bytes:
    """``data`` with block ``k``'s frames replaced by ``new[k]`` (frames, decompressed sizes):
    each such region gets a seek table and region header that agree with its frames, and
    every later byte moves with it (later blocks' headers re-pointed, their page regions kept
    page-aligned by padding before them), so the reader gets as far as the frames."""
    out = bytearray()
    pos = shift = 0
    for k, b in enumerate(blocks):
        pad = (-(b.pages + shift)) % b.page_size
        out += data[pos : b.header + 4 + 8]  # the entry, version and page size
        (bitmap,) = struct.unpack_from(">Q", data, b.header + 12)
        head_end = b.header + MappedRamHeader.SIZE + ZstdRegionHeader.SIZE
        if k in new:
            frames, lengths = new[k]
            region = b"".join(frames) + encode_seek_table(np.array([len(f) for f in frames], dtype=np.int64),
                                                          np.array(lengths, dtype=np.int64))  # fmt: skip
            zhdr = ZstdRegionHeader(len(region), b.frame_pages, len(frames)).pack()
        else:
            region = data[b.pages : b.pages + b.region]
            zhdr = data[b.header + MappedRamHeader.SIZE : head_end]
        out += struct.pack(">QQ", bitmap + shift, b.pages + shift + pad) + zhdr
        out += data[head_end : b.pages] + bytes(pad) + region
        shift += pad + len(region) - b.region
        pos = b.pages + b.region
    return bytes(out + data[pos:])


ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
ZSTD_INTERESTING = [0, 1, 8, 9, 10, 0x7F, 0xFF, 0x1000, 0x2000, 0x2001, 0x1FFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def _block(last: bool, kind: int, size: int) -> bytes:
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")


def hostile_frame(frame: bytes, length: int, rng: random.Random) -> bytes:
    """A frame that lies, in one of many ways, in place of ``frame`` (``length`` bytes of pages)."""
    fcs2 = (length - 256).to_bytes(2, "little") if 256 <= length < 65792 else None
    choice = rng.randrange(12)
    if choice == 0 and fcs2 is not None:  # a bomb: RLE blocks of 128 KiB under a header that claims the pages' size
        return ZSTD_MAGIC + b"\x60" + fcs2 + (_block(False, 1, 128 << 10) + b"A") * rng.choice([2, 64, 2000]) + (
            _block(True, 1, 128 << 10) + b"A")
    if choice == 1:  # a huge content size
        return ZSTD_MAGIC + b"\xc4\x58" + struct.pack("<Q", rng.choice([1 << 32, 1 << 40, (1 << 64) - 1])) + (
            _block(True, 0, 16) + bytes(16) + bytes(4))
    if choice == 2:  # no content size
        return ZSTD_MAGIC + b"\x04\x58" + _block(True, 1, length) + b"\x00" + bytes(4)
    if choice == 3:  # twice the data, the header claiming the pages' size
        import zstandard

        big = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(bytes(2 * length))
        return big[:5] + fcs2 + big[7:] if fcs2 is not None and big[4] == 0x64 else big
    if choice == 4:  # a window far past any limit
        return ZSTD_MAGIC + b"\x80" + bytes([rng.choice([0xF8, 0xC0, 0x90])]) + struct.pack("<I", length) + (
            _block(True, 1, min(length, 128 << 10)) + b"\x00")
    if choice == 5:  # a reserved block type, or a block larger than the window
        head = _block(True, rng.choice([3, 0, 2]), rng.randrange(1 << 21))
        return ZSTD_MAGIC + b"\x60" + (fcs2 or b"\0\0") + head + bytes(rng.randrange(4, 64))
    if choice == 6:  # a dictionary id
        return ZSTD_MAGIC + b"\x61\x07" + (fcs2 or b"\0\0") + _block(True, 1, length) + b"\x00"
    if choice == 7:  # the frame and more in its slot
        return frame + rng.choice([bytes(rng.randrange(1, 32)), frame, ZSTD_MAGIC + bytes(5)])
    if choice == 8:  # its checksum, or its end, cut
        return frame[: max(9, len(frame) - rng.choice([1, 4, 5, len(frame) // 2]))]
    if choice == 9:  # a skippable frame
        return struct.pack("<II", 0x184D2A50 + rng.randrange(16), len(frame) - 8) + frame[8:]
    if choice == 10 and len(frame) > 7 and frame[4] & 0xC0 == 0x40:  # the content size a little off
        (fcs,) = struct.unpack_from("<H", frame, 5)
        return frame[:5] + struct.pack("<H", (fcs + rng.choice([-1, 1, -4096, 4096])) & 0xFFFF) + frame[7:]
    at = rng.randrange(len(frame))  # a flipped byte anywhere
    return frame[:at] + bytes([frame[at] ^ (1 << rng.randrange(8))]) + frame[at + 1 :]


def mutate_zstd(data: bytes, blocks: list[ZBlock], rng: random.Random) -> bytes:
    """``data`` (a compressed file taken apart as ``blocks``) lying about its frames."""
    k = rng.randrange(len(blocks))
    b = blocks[k]
    frames, lengths = list(b.frames), list(b.lengths)
    n = len(frames)
    op = rng.randrange(16)
    buf = bytearray(data)
    zhdr = b.header + MappedRamHeader.SIZE
    entry = b.table + 8 + 8 * rng.randrange(n)  # a seek table entry
    foot = b.table + 8 + 8 * n
    if op == 0:  # the region header's length
        value = rng.choice([b.region + rng.choice([-1, 1, -8, 8, -4096, 4096]), rng.choice(INTERESTING)])
        buf[zhdr : zhdr + 8] = struct.pack(">Q", value % (1 << 64))
    elif op == 1:  # frame_pages or frames
        at = zhdr + rng.choice([8, 12])
        value = rng.choice([*ZSTD_INTERESTING, 1 << rng.randrange(32), n + rng.choice([-1, 1])])
        buf[at : at + 4] = struct.pack(">I", value % (1 << 32))
    elif op == 2:  # a compressed or decompressed size in the table
        at = entry + rng.choice([0, 4])
        (old,) = struct.unpack_from("<I", data, at)
        value = rng.choice([*ZSTD_INTERESTING, old + rng.choice([-1, 1, -9, 9, 4096])])
        buf[at : at + 4] = struct.pack("<I", value % (1 << 32))
    elif op == 3 and n > 1:  # sizes moved between two entries: the sum still fills the region
        i = rng.randrange(n - 1)
        d = rng.choice([1, 8, 9, len(frames[i]) - 1, -1, -8])
        a, c = len(frames[i]) + d, len(frames[i + 1]) - d
        if a >= 0 and c >= 0:
            struct.pack_into("<I", buf, b.table + 8 + 8 * i, a)
            struct.pack_into("<I", buf, b.table + 16 + 8 * i, c)
    elif op == 4:  # the footer: frame count, descriptor, seekable magic
        field = rng.randrange(3)
        if field == 0:
            struct.pack_into("<I", buf, foot, rng.choice([*ZSTD_INTERESTING, n - 1, n + 1]) % (1 << 32))
        elif field == 1:
            buf[foot + 4] = rng.choice([0x80, 0x40, 0x01, 0x7C, rng.randrange(256)])
        else:
            buf[foot + 5 + rng.randrange(4)] ^= 1 << rng.randrange(8)
    elif op == 5:  # the skippable frame's magic or size
        at = b.table + rng.choice([0, 4])
        struct.pack_into("<I", buf, at, rng.choice([0x184D2A50, 0x184D2A5F, 0xFD2FB528, 8 * n + 8, 8 * n + 10,
                                                    *ZSTD_INTERESTING]))  # fmt: skip
    elif op == 6 and n > 1:  # two frames swapped
        i, j = rng.sample(range(n), 2)
        frames[i], frames[j] = frames[j], frames[i]
        return relay(data, blocks, {k: (frames, lengths)})
    elif op == 7:  # a frame cut
        i = rng.randrange(n)
        frames[i] = frames[i][: rng.randrange(len(frames[i]))]
        return relay(data, blocks, {k: (frames, lengths)})
    elif op == 8:  # a frame dropped, or one more: the count no longer covers the block
        if n > 1 and rng.random() < 0.5:
            i = rng.randrange(n)
            del frames[i], lengths[i]
        else:
            frames.append(rng.choice(frames))
            lengths.append(rng.choice([lengths[0], lengths[-1]]))
        return relay(data, blocks, {k: (frames, lengths)})
    elif op == 9:  # a frame of another block, or the same block's other one
        other = rng.choice(blocks)
        frames[rng.randrange(n)] = rng.choice(other.frames)
        return relay(data, blocks, {k: (frames, lengths)})
    elif op == 10:  # a frame's magic
        at = b.pages + sum(len(f) for f in frames[: rng.randrange(n)])
        buf[at + rng.randrange(4)] ^= 1 << rng.randrange(8)
    elif op == 11:  # a decompressed size that lies, told consistently by the table
        i = rng.randrange(n)
        lengths[i] = rng.choice([0, lengths[i] - b.page_size, lengths[i] + b.page_size, lengths[i] * 2, 1 << 31])
        return relay(data, blocks, {k: (frames, lengths)})
    else:  # ops 12..15 (and the few above that do not apply): a hostile frame, the table right
        i = rng.randrange(n)
        frames[i] = hostile_frame(frames[i], lengths[i], rng)
        return relay(data, blocks, {k: (frames, lengths)})
    return bytes(buf)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
        if not buf:
            buf = bytearray(data[: rng.randrange(1, 64)])
        op = rng.randrange(8)
        at = rng.randrange(len(buf))
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.randrange(256)
        elif op in (2, 3):
            size = rng.choice([">B", ">H", ">I", ">Q"])
            width = struct.calcsize(size)
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[at : at + width] = struct.pack(size, value)[: len(buf) - at]
        elif op == 4:
            del buf[at:]
        elif op == 5:
            del buf[at : at + rng.randrange(1, 64)]
        elif op == 6:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            n = rng.randrange(1, 256)
            src = rng.randrange(len(buf))
            buf[at:at] = buf[src : src + n]
    return bytes(buf)


def check(path: str, rewrite: bool = False) -> None:
    """Open, read every page, verify; only FormatError may escape. With ``rewrite``, also
    decompress (or compress) the file and compress that again, through the threaded engine."""
    compressed = False
    try:
        with mappedram.open_file(path) as f:
            compressed = f.compressed
            for b in f.blocks:
                for first in range(0, b.num_pages, 2048):
                    f.read_pages(b, first, min(2048, b.num_pages - first))
            f.device_state()
    except mappedram.FormatError:
        pass
    ops.verify(path)
    ops.verify(path, data=True)
    if rewrite:
        engine = ops.EngineOptions(channels=2, durable=False)
        out, again = path + ".out", path + ".again"
        try:
            if compressed:
                ops.decompress(path, out, options=engine)
            else:
                ops.compress(path, out, compression=ops.CompressOptions(frame_bytes=FUZZ_FRAME_BYTES), options=engine)
            ops.compress(out, again, compression=ops.CompressOptions(frame_bytes=4096), options=engine)
        except mappedram.FormatError:
            pass
        try:  # every block into raw files, through the mappings a restore writes
            with mappedram.open_file(path) as f:
                names = [b.idstr for b in f.blocks]
            ops.restore_files(path, [(n, f"{again}.{i}.raw") for i, n in enumerate(names)], options=engine)
        except mappedram.FormatError:
            pass
        finally:
            for p in (out, again, *(f"{again}.{i}.raw" for i in range(64))):
                try:
                    os.unlink(p)
                except OSError:
                    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


PARENT_VALUES: list[Any] = [None, True, 0, 1, -1, 4096, 1 << 62, 1 << 64, "", ".", "..", "/", "/dev/zero",
                            "/proc/self/mem", "/etc/passwd", "a" * 5000, "x\u0000y", "00" * 32, "ff" * 31, [], {}, 1.5]


def chain_seeds(parent: str) -> list[bytes]:
    """A parent written at ``parent`` (the device-state seed, or the first) and a child of it
    (two pages changed, one of them to zeros), the child named by the parent's file name."""

    base = seeds()[:3][-1]
    Path(parent).write_bytes(base)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(parent)) as tmp:
        other = os.path.join(tmp, "b.mig")
        with mappedram.open_file(parent) as f:
            blocks = [(b.idstr, bytearray(f.read_pages(b, 0, b.num_pages))) for b in f.blocks]
            spec = (f.machine_type, f.device_state(), f.vmdesc.raw if f.vmdesc else None)
        blocks[0][1][5] ^= 0xFF
        blocks[0][1][4096 : 2 * 4096] = bytes(4096)
        quick = ops.EngineOptions(channels=1, durable=False)
        ops.save(other, [(n, bytes(d)) for n, d in blocks], machine_type=spec[0] or "pc-q35-10.0",
                 device_state=spec[1], vmdesc=spec[2], options=quick)  # fmt: skip
        child = os.path.join(os.path.dirname(parent), os.path.basename(parent) + ".child")
        ops.diff(parent, other, write_child=child, options=ops.EngineOptions(channels=1, durable=False))
        data = Path(child).read_bytes()
        os.unlink(child)
    return [data]


def mutate_parent(data: bytes, rng: random.Random) -> bytes | None:
    """``data`` with its trailer's parent entry mutated (framed right); None without one."""
    tail_at = max(0, len(data) - (8 << 20))
    vmdesc = find_vmdesc(data[tail_at:], tail_at)
    parent = vmdesc.data.get("mappedram", {}).get("parent") if vmdesc is not None else None
    if vmdesc is None or not isinstance(parent, dict):
        return None
    desc = json.loads(json.dumps(vmdesc.data))
    entry = desc["mappedram"]["parent"]
    for _ in range(rng.choice([1, 1, 2])):
        op = rng.randrange(6)
        if op == 0 and entry:
            entry.pop(rng.choice(sorted(entry)))
        elif op == 1:
            entry[rng.choice(["path", "stream_bytes", "digest", "extra"])] = rng.choice(PARENT_VALUES)
        elif op == 2 and isinstance(entry.get("stream_bytes"), int):
            entry["stream_bytes"] += rng.choice([-4096, -1, 1, 4096])
        elif op == 3 and isinstance(entry.get("digest"), str) and entry["digest"]:
            d, k = entry["digest"], rng.randrange(len(entry["digest"]))
            entry["digest"] = d[:k] + ("1" if d[k] == "0" else "0") + d[k + 1 :]
        elif op == 4:  # itself, by its own name: a cycle
            entry["path"] = rng.choice([os.path.basename(CHILD_NAME), CHILD_NAME, "./" + os.path.basename(CHILD_NAME)])
        else:
            desc["mappedram"]["parent"] = rng.choice(PARENT_VALUES)
            break
    return data[: vmdesc.offset] + encode_vmdesc(json.dumps(desc).encode("utf-8"))


#: The file a worker writes each input to (its children name their parent beside it).
CHILD_NAME = ""


def worker(args: tuple[int, int, int, float, int, str]) -> dict[str, Any]:
    global CHILD_NAME
    index, count, seed, timeout, max_mem, out = args
    resource.setrlimit(resource.RLIMIT_AS, (max_mem << 20, max_mem << 20))
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(seed * 1_000_003 + index)
    path = f"/dev/shm/mappedram-fuzz-{os.getpid()}.mig"
    CHILD_NAME = path
    parent = path + ".parent"
    corpus = seeds() + chain_seeds(parent)
    parts = [zstd_blocks(s) for s in corpus]
    crashes = hangs = io_errors = 0
    slowest = 0.0
    try:
        for i in range(count):
            k = rng.randrange(len(corpus))
            seed_data, blocks = corpus[k], parts[k]
            if blocks is not None and rng.random() < 0.6:
                data = mutate_zstd(seed_data, blocks, rng)
                if rng.random() < 0.2:
                    data = mutate(data, rng)
            else:
                data = (mutate_seal(seed_data, rng) if rng.random() < 0.4 else None) or seed_data
                if data is seed_data and rng.random() < 0.6:
                    data = mutate_parent(seed_data, rng) or seed_data
                if data is seed_data or rng.random() < 0.3:
                    data = mutate(data, rng)
            with open(path, "wb") as f:
                f.write(data)
            t = time.perf_counter()
            rewrite = rng.random() < 0.02
            signal.setitimer(signal.ITIMER_REAL, timeout * (4 if rewrite else 1))
            try:
                check(path, rewrite)
            except Hang:
                hangs += 1
                _save(out, "hang", index, i, data, "timeout")
            except IOEngineError:
                io_errors += 1
                _save(out, "io", index, i, data, traceback.format_exc())
            except BaseException:
                crashes += 1
                _save(out, "crash", index, i, data, traceback.format_exc())
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t)
    finally:
        for p in (path, parent):
            try:
                os.unlink(p)
            except OSError:
                pass
    return {"inputs": count, "crashes": crashes, "hangs": hangs, "io_errors": io_errors, "slowest": slowest}


def _save(out: str, kind: str, worker_index: int, i: int, data: bytes, why: str) -> None:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{kind}-{worker_index}-{i}")
    Path(stem + ".mig").write_bytes(data)
    Path(stem + ".txt").write_text(why)


def run(
    inputs: int, workers: int, seed: int, timeout: float = 1.0, max_mem: int = 2048, out: str = "fuzz-crashes"
) -> dict[str, Any]:
    per = [inputs // workers + (1 if k < inputs % workers else 0) for k in range(workers)]
    jobs = [(k, n, seed, timeout, max_mem, out) for k, n in enumerate(per) if n]
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(worker, jobs)
    total = {key: sum(r[key] for r in results) for key in ("inputs", "crashes", "hangs", "io_errors")}
    total["slowest"] = max(r["slowest"] for r in results)
    total["seconds"] = time.perf_counter() - t
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds one input may take")
    ap.add_argument("--max-mem-mib", type=int, default=2048, help="address-space limit of each worker")
    ap.add_argument("--out", default="fuzz-crashes", help="where crashing inputs are saved")
    args = ap.parse_args()
    r = run(args.inputs, args.workers, args.seed, args.timeout, args.max_mem_mib, args.out)
    print(
        f"{r['inputs']} inputs in {r['seconds']:.0f} s ({r['inputs'] / max(r['seconds'], 1e-9):.0f}/s): "
        f"{r['crashes']} crashes, {r['hangs']} hangs, {r['io_errors']} I/O errors, "
        f"slowest {r['slowest'] * 1000:.0f} ms"
    )
    return 1 if r["crashes"] or r["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())

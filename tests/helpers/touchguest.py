"""A tiny x86 guest that fills its RAM with a pattern, then keeps reading it: for live-migration tests.

The guest is QEMU's firmware (``-bios FILE``): a 64 KiB image whose machine code is
emitted here byte by byte (hand-assembled, each instruction with its assembly in
``listing()``), so no toolchain is needed. It runs on ``-machine q35`` or ``pc``
under TCG or KVM, without SeaBIOS, on one vCPU.

What it does, from the reset vector (real mode, CS:IP = F000:FFF0):

1. ``cli``, enable A20 through port 0x92, load a flat GDT, set CR0.PE and jump to
   32-bit protected mode (no paging, no IDT; interrupts stay off).
2. Status: write the status area at guest-physical ``STATUS_ADDR`` (see ``Status``),
   magic last, with ``phase = PHASE_FILLING``.
3. Fill: for every 4 KiB page ``p`` (absolute page number, address ``p << 12``) in
   ``[RAM_START, ram_end)``, write the little-endian u64 ``expected_page_word(p)`` at
   the page's first 8 bytes, except for the zero pages (``p % 16 == 15``), which it
   never writes. Nothing else in RAM is written but the status area.
4. ``phase = PHASE_TOUCHING``.
5. Touch, forever: sweep the pages of ``[RAM_START, ram_end)`` in a scattered
   order, page ``RAM_START_PAGE + (i * stride) % n`` for ``i`` in ``0..n-1`` (``n``
   pages, ``stride`` = ``touch_stride(n)``, coprime to ``n``), reading each page's
   first 8 bytes and comparing them with the pattern (zero on a zero page). A
   mismatch adds one to ``errors`` and records the page in ``last_bad`` (and in
   ``first_bad`` the first time). After each sweep, ``loops`` grows by one.

So once the fill is done, guest RAM equals ``expected_ram()`` on every page but the
status page, and only the status page is ever written again.

The RAM file of a ``memory-backend-file`` guest is guest-physical memory from 0 as
long as all RAM is below QEMU's low-memory split (any size up to 2 GiB): offset =
address, which is what ``read_status`` and ``check_ram`` assume.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "BIOS_SIZE",
    "DEFAULT_RAM_END",
    "MAGIC",
    "MULTIPLIER",
    "NO_PAGE",
    "PAGE_SIZE",
    "PHASE_FILLING",
    "PHASE_TOUCHING",
    "RAM_START",
    "RAM_START_PAGE",
    "SEED",
    "STATUS_ADDR",
    "STATUS_FORMAT",
    "STATUS_PAGE",
    "STATUS_SIZE",
    "ZERO_PAGE_MASK",
    "Status",
    "bios_image",
    "build_bios",
    "check_ram",
    "expected_page_word",
    "expected_ram",
    "is_zero_page",
    "listing",
    "read_status",
    "read_status_file",
    "touch_stride",
]

PAGE_SIZE = 4096
#: The firmware image's size: QEMU maps it at 4 GiB - 64 KiB and also at 0xF0000.
BIOS_SIZE = 64 << 10
#: Guest-physical address of the image's first byte (its high mapping).
BIOS_BASE = (1 << 32) - BIOS_SIZE

#: The first patterned page's address (1 MiB: everything below is left alone but the status area).
RAM_START = 0x100000
RAM_START_PAGE = RAM_START // PAGE_SIZE
#: The end of the patterned range unless ``build_bios`` is told otherwise: all of a 64 MiB guest.
DEFAULT_RAM_END = 64 << 20
#: The highest ``ram_end`` accepted (below QEMU's low-memory split on q35 and pc).
MAX_RAM_END = 2 << 30

#: The pattern: ``lo = (page * MULTIPLIER) ^ seed`` (mod 2**32), ``hi = ~lo``.
MULTIPLIER = 0x9E3779B1
SEED = 0x5EED7A11
#: Page ``p`` is a zero page iff ``p & ZERO_PAGE_MASK == ZERO_PAGE_MASK`` (every 16th page).
ZERO_PAGE_MASK = 0xF

#: Guest-physical address of the status area (in conventional memory, below ``RAM_START``).
STATUS_ADDR = 0x9000
STATUS_PAGE = STATUS_ADDR // PAGE_SIZE
#: magic, phase, loops, errors, first_bad, last_bad, pages, seed: eight little-endian u32.
STATUS_FORMAT = "<8I"
STATUS_SIZE = struct.calcsize(STATUS_FORMAT)
#: ``Status.magic`` once the guest has initialised the area ("TUCH" in memory).
MAGIC = 0x48435554
#: ``Status.phase``: filling RAM, then sweeping it forever.
PHASE_FILLING = 0
PHASE_TOUCHING = 1
#: ``first_bad`` / ``last_bad`` while no mismatch was seen.
NO_PAGE = 0xFFFFFFFF

_MASK32 = 0xFFFFFFFF

# Status field offsets (from STATUS_ADDR).
_ST_MAGIC, _ST_PHASE, _ST_LOOPS, _ST_ERRORS, _ST_FIRST, _ST_LAST, _ST_PAGES, _ST_SEED = range(0, 32, 4)

# GDT selectors.
_CODE32 = 0x08
_DATA32 = 0x10


# -- the pattern ---------------------------------------------------------------------


def is_zero_page(page: int) -> bool:
    """Page number ``page`` is one the guest never writes (inside the patterned range)."""
    return page & ZERO_PAGE_MASK == ZERO_PAGE_MASK


def expected_page_word(page: int, *, seed: int = SEED, ram_end: int = DEFAULT_RAM_END) -> int | None:
    """The little-endian u64 at the start of page number ``page``; None if the page stays all zero.

    Inside ``[RAM_START, ram_end)``: ``lo = (page * MULTIPLIER) ^ seed`` (mod 2**32),
    ``hi = ~lo``, the word is ``lo | hi << 32`` (never zero) and the rest of the page
    is zero; pages with ``page % 16 == 15`` are zero pages (None). Pages outside
    that range are None too, but for the status page (see ``Status``).
    """
    if not RAM_START_PAGE <= page < ram_end // PAGE_SIZE or is_zero_page(page):
        return None
    lo = ((page * MULTIPLIER) ^ seed) & _MASK32
    return lo | (lo ^ _MASK32) << 32


def _page_words(pages: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    """``expected_page_word`` for an array of page numbers, 0 for zero pages (range not checked)."""
    lo = (pages * np.uint64(MULTIPLIER) & np.uint64(_MASK32)) ^ np.uint64(seed & _MASK32)
    words = lo | (lo ^ np.uint64(_MASK32)) << np.uint64(32)
    words[(pages & np.uint64(ZERO_PAGE_MASK)) == np.uint64(ZERO_PAGE_MASK)] = 0
    return words


def expected_ram(ram_size: int, *, seed: int = SEED, ram_end: int = DEFAULT_RAM_END) -> npt.NDArray[np.uint8]:
    """Guest RAM (``ram_size`` bytes from address 0) once the fill is done, the status page zero."""
    if ram_size % PAGE_SIZE:
        raise ValueError(f"ram_size {ram_size} is not a multiple of {PAGE_SIZE}")
    if ram_size < ram_end:
        raise ValueError(f"ram_size {ram_size:#x} is below ram_end {ram_end:#x}")
    words = np.zeros((ram_size // PAGE_SIZE, PAGE_SIZE // 8), dtype="<u8")
    pages = np.arange(RAM_START_PAGE, ram_end // PAGE_SIZE, dtype=np.uint64)
    words[RAM_START_PAGE : ram_end // PAGE_SIZE, 0] = _page_words(pages, seed)
    return words.view(np.uint8).reshape(-1)


def check_ram(ram: bytes | memoryview, *, seed: int = SEED, ram_end: int = DEFAULT_RAM_END) -> str | None:
    """None if ``ram`` (guest RAM from address 0) holds the pattern, else the first mismatch.

    Every page is checked, the status page excepted: patterned pages hold their word
    and zeros, every other page (zero pages, below ``RAM_START``, from ``ram_end``)
    is all zero.
    """
    data = np.frombuffer(ram, dtype="<u8")
    if len(ram) % PAGE_SIZE or len(ram) < ram_end:
        return f"RAM of {len(ram):#x} bytes: not whole pages, or below ram_end {ram_end:#x}"
    pages = data.reshape(-1, PAGE_SIZE // 8)
    want = np.zeros(len(pages), dtype=np.uint64)
    want[RAM_START_PAGE : ram_end // PAGE_SIZE] = _page_words(
        np.arange(RAM_START_PAGE, ram_end // PAGE_SIZE, dtype=np.uint64), seed
    )
    bad = (pages[:, 0] != want) | np.any(pages[:, 1:] != 0, axis=1)
    bad[STATUS_PAGE] = False
    where = np.flatnonzero(bad)
    if not len(where):
        return None
    page = int(where[0])
    row = pages[page]
    nonzero = np.flatnonzero(row[1:])
    detail = f"first word {int(row[0]):#018x}, expected {int(want[page]):#018x}"
    if len(nonzero):
        at = int(nonzero[0]) + 1
        detail += f"; word {at} (byte +{at * 8:#x}) is {int(row[at]):#018x}, expected 0"
    return f"{len(where)} page(s) differ; first: page {page} (address {page * PAGE_SIZE:#x}): {detail}; first pages: {where[:8].tolist()}"


# -- the status area -----------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """The guest's status area at ``STATUS_ADDR``: eight little-endian u32 (``STATUS_FORMAT``).

    ``magic`` is ``MAGIC`` once the guest started (written last of the area);
    ``phase`` is ``PHASE_FILLING`` or ``PHASE_TOUCHING``; ``loops`` counts the
    completed sweeps of the touch phase; ``errors`` the mismatching reads;
    ``first_bad`` / ``last_bad`` the page numbers of the first and latest mismatch
    (``NO_PAGE`` for none); ``pages`` the number of pages swept (``n``); ``seed``
    the pattern's seed baked into the image.
    """

    magic: int
    phase: int
    loops: int
    errors: int
    first_bad: int
    last_bad: int
    pages: int
    seed: int

    @property
    def valid(self) -> bool:
        """The guest has written the area."""
        return self.magic == MAGIC

    @property
    def touching(self) -> bool:
        """The fill is done and the guest is sweeping."""
        return self.valid and self.phase == PHASE_TOUCHING

    @property
    def first_bad_page(self) -> int | None:
        """``first_bad``, or None if no read mismatched."""
        return None if self.first_bad == NO_PAGE else self.first_bad


def read_status(mem: bytes | bytearray | memoryview, base: int = 0) -> Status:
    """Decode the status area from ``mem``, a RAM image whose first byte is at guest-physical ``base``."""
    offset = STATUS_ADDR - base
    if offset < 0 or offset + STATUS_SIZE > len(mem):
        raise ValueError(f"the status area at {STATUS_ADDR:#x} is not inside {len(mem):#x} bytes from {base:#x}")
    return Status(*struct.unpack_from(STATUS_FORMAT, mem, offset))


def read_status_file(path: str | os.PathLike[str]) -> Status:
    """``read_status`` of a RAM file (e.g. a shared ``memory-backend-file``), by one pread."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, STATUS_SIZE, STATUS_ADDR)
    finally:
        os.close(fd)
    return read_status(data, STATUS_ADDR)


# -- the program ---------------------------------------------------------------------


def _u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & _MASK32)


class _Asm:
    """A minimal emitter: bytes with their assembly text, labels, and relative-jump fixups."""

    def __init__(self, origin: int) -> None:
        self.origin = origin  # address of code[0] as the CPU sees it (for the listing)
        self.code = bytearray()
        self.lines: list[tuple[int, bytes, str]] = []
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, int, str]] = []  # (position, size, label)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)
        self.lines.append((len(self.code), b"", f"{name}:"))

    def emit(self, data: bytes, text: str) -> None:
        self.lines.append((len(self.code), bytes(data), text))
        self.code += data

    def align(self, n: int) -> None:
        pad = -len(self.code) % n
        if pad:
            self.emit(b"\x00" * pad, f".align {n}")

    def jump(self, opcode: bytes, size: int, target: str, text: str) -> None:
        """``opcode`` followed by a ``size``-byte displacement to ``target`` (from the next instruction)."""
        self.fixups.append((len(self.code) + len(opcode), size, target))
        self.emit(opcode + b"\x00" * size, f"{text} {target}")

    def resolve(self) -> bytes:
        for pos, size, target in self.fixups:
            # modulo the displacement's width: a 16-bit IP wraps at 64 KiB
            rel = (self.labels[target] - (pos + size)) % (1 << 8 * size)
            self.code[pos : pos + size] = rel.to_bytes(size, "little")
        self.lines = [(o, bytes(self.code[o : o + len(b)]), t) for o, b, t in self.lines]
        return bytes(self.code)


def touch_stride(pages: int) -> int:
    """The sweep's step (mod ``pages``): odd, coprime to ``pages``, near ``pages`` times the golden ratio."""
    if pages < 2:
        raise ValueError("the touch sweep needs at least 2 pages")
    stride = int(pages * 0.6180339887) | 1
    while math.gcd(stride, pages) != 1:
        stride += 2
    if not 0 < stride < pages:
        stride = 1
    return stride


def _program(ram_end: int, seed: int) -> _Asm:
    if ram_end % PAGE_SIZE or not RAM_START + 2 * PAGE_SIZE <= ram_end <= MAX_RAM_END:
        raise ValueError(
            f"ram_end {ram_end:#x}: need a page multiple in [{RAM_START + 2 * PAGE_SIZE:#x}, {MAX_RAM_END:#x}]"
        )
    end_page = ram_end // PAGE_SIZE
    n = end_page - RAM_START_PAGE
    stride = touch_stride(n)
    st = STATUS_ADDR
    a = _Asm(BIOS_BASE)

    # ---- data: the GDT and its descriptor (the image's first bytes) ----
    a.label("gdt")
    a.emit(_u32(0) + _u32(0), ".quad 0                      # null descriptor")
    # base 0, limit 0xFFFFF pages (4 GiB), G=1 D=1, present, DPL 0, code exec/read
    a.emit(_u32(0x0000FFFF) + _u32(0x00CF9A00), ".quad 0x00CF9A000000FFFF     # 0x08: flat 32-bit code")
    # same, data read/write
    a.emit(_u32(0x0000FFFF) + _u32(0x00CF9200), ".quad 0x00CF92000000FFFF     # 0x10: flat 32-bit data")
    a.label("gdtr")
    gdt_linear = BIOS_BASE + a.labels["gdt"]
    a.emit(_u16(3 * 8 - 1) + _u32(gdt_linear), f".word 23; .long {gdt_linear:#x}  # lgdt operand")
    a.align(16)

    # ---- 16-bit real mode, CS base 0xFFFF0000 (so IP = offset into the image) ----
    a.label("start16")
    a.emit(b"\xfa", "cli")
    a.emit(b"\xfc", "cld")
    a.emit(b"\xe4\x92", "in al, 0x92                  # system control port A")
    a.emit(b"\x24\xfe", "and al, 0xfe                 # never pulse the fast-reset bit")
    a.emit(b"\x0c\x02", "or al, 2                     # A20 on")
    a.emit(b"\xe6\x92", "out 0x92, al")
    # 2E = CS override, 66 = 32-bit operand (loads all 32 bits of the base), 0F 01 /2 = lgdt,
    # ModRM 0x16 = mod 00 reg 010 rm 110: [disp16]
    a.emit(b"\x2e\x66\x0f\x01\x16" + _u16(a.labels["gdtr"]), "lgdt cs:[gdtr]               # o32")
    a.emit(b"\x0f\x20\xc0", "mov eax, cr0")
    a.emit(b"\x66\x83\xc8\x01", "or eax, 1                    # CR0.PE")
    a.emit(b"\x0f\x22\xc0", "mov cr0, eax")
    # 66 EA ptr16:32: far jump into the 32-bit code segment, to the high mapping
    pm_entry_at = len(a.code) + 2
    a.emit(b"\x66\xea" + _u32(0) + _u16(_CODE32), "jmp far 0x08:start32          # o32")

    # ---- 32-bit protected mode, flat segments ----
    a.label("start32")
    a.code[pm_entry_at : pm_entry_at + 4] = _u32(BIOS_BASE + a.labels["start32"])
    a.emit(b"\x66\xb8" + _u16(_DATA32), "mov ax, 0x10")
    a.emit(b"\x8e\xd8", "mov ds, ax")
    a.emit(b"\x8e\xc0", "mov es, ax")
    a.emit(b"\x8e\xd0", "mov ss, ax")
    a.emit(b"\x8e\xe0", "mov fs, ax")
    a.emit(b"\x8e\xe8", "mov gs, ax")
    a.emit(b"\xbc" + _u32(0x7000), "mov esp, 0x7000              # never used: no call, push or interrupt")

    # status area: everything but the magic, then the magic (C7 05 = mov dword [disp32], imm32)
    def store(offset: int, value: int, name: str) -> None:
        a.emit(b"\xc7\x05" + _u32(st + offset) + _u32(value), f"mov dword [{st + offset:#x}], {value:#x}  # {name}")

    store(_ST_PHASE, PHASE_FILLING, "phase")
    store(_ST_LOOPS, 0, "loops")
    store(_ST_ERRORS, 0, "errors")
    store(_ST_FIRST, NO_PAGE, "first_bad")
    store(_ST_LAST, NO_PAGE, "last_bad")
    store(_ST_PAGES, n, "pages")
    store(_ST_SEED, seed, "seed")
    store(_ST_MAGIC, MAGIC, "magic")

    # ---- fill: esi = page number ----
    a.emit(b"\xbe" + _u32(RAM_START_PAGE), f"mov esi, {RAM_START_PAGE:#x}             # first page")
    a.label("fill")
    a.emit(b"\x89\xf0", "mov eax, esi")
    a.emit(b"\x83\xe0" + bytes([ZERO_PAGE_MASK]), f"and eax, {ZERO_PAGE_MASK}")
    a.emit(b"\x83\xf8" + bytes([ZERO_PAGE_MASK]), f"cmp eax, {ZERO_PAGE_MASK}")
    a.jump(b"\x0f\x84", 4, "fill_next", "je")  # a zero page: leave it alone
    a.emit(b"\x69\xc6" + _u32(MULTIPLIER), f"imul eax, esi, {MULTIPLIER:#x}")
    a.emit(b"\x35" + _u32(seed), f"xor eax, {seed:#x}           # lo")
    a.emit(b"\x89\xf7", "mov edi, esi")
    a.emit(b"\xc1\xe7\x0c", "shl edi, 12                  # page address")
    a.emit(b"\x89\x07", "mov [edi], eax")
    a.emit(b"\xf7\xd0", "not eax                      # hi = ~lo")
    a.emit(b"\x89\x47\x04", "mov [edi+4], eax")
    a.label("fill_next")
    a.emit(b"\x46", "inc esi")
    a.emit(b"\x81\xfe" + _u32(end_page), f"cmp esi, {end_page:#x}")
    a.jump(b"\x0f\x82", 4, "fill", "jb")
    store(_ST_PHASE, PHASE_TOUCHING, "phase")

    # ---- touch: ebx = (i * stride) % n, ecx = pages left in this sweep ----
    a.emit(b"\x31\xdb", "xor ebx, ebx")
    a.label("sweep")
    a.emit(b"\xb9" + _u32(n), f"mov ecx, {n:#x}                # pages per sweep")
    a.label("touch")
    a.emit(b"\x8d\xb3" + _u32(RAM_START_PAGE), f"lea esi, [ebx+{RAM_START_PAGE:#x}]        # page number")
    a.emit(b"\x31\xc0", "xor eax, eax                 # expected lo")
    a.emit(b"\x31\xd2", "xor edx, edx                 # expected hi")
    a.emit(b"\x89\xf7", "mov edi, esi")
    a.emit(b"\x83\xe7" + bytes([ZERO_PAGE_MASK]), f"and edi, {ZERO_PAGE_MASK}")
    a.emit(b"\x83\xff" + bytes([ZERO_PAGE_MASK]), f"cmp edi, {ZERO_PAGE_MASK}")
    a.jump(b"\x0f\x84", 4, "compare", "je")  # a zero page: expect 0:0
    a.emit(b"\x69\xc6" + _u32(MULTIPLIER), f"imul eax, esi, {MULTIPLIER:#x}")
    a.emit(b"\x35" + _u32(seed), f"xor eax, {seed:#x}")
    a.emit(b"\x89\xc2", "mov edx, eax")
    a.emit(b"\xf7\xd2", "not edx")
    a.label("compare")
    a.emit(b"\x89\xf7", "mov edi, esi")
    a.emit(b"\xc1\xe7\x0c", "shl edi, 12")
    a.emit(b"\x39\x07", "cmp [edi], eax")
    a.jump(b"\x0f\x85", 4, "bad", "jne")
    a.emit(b"\x39\x57\x04", "cmp [edi+4], edx")
    a.jump(b"\x0f\x85", 4, "bad", "jne")
    a.label("next")
    a.emit(b"\x81\xc3" + _u32(stride), f"add ebx, {stride:#x}             # stride")
    a.emit(b"\x81\xfb" + _u32(n), f"cmp ebx, {n:#x}")
    a.jump(b"\x0f\x82", 4, "nowrap", "jb")
    a.emit(b"\x81\xeb" + _u32(n), f"sub ebx, {n:#x}")
    a.label("nowrap")
    a.emit(b"\x49", "dec ecx")
    a.jump(b"\x0f\x85", 4, "touch", "jnz")
    a.emit(b"\xff\x05" + _u32(st + _ST_LOOPS), f"inc dword [{st + _ST_LOOPS:#x}]          # loops")
    a.jump(b"\xe9", 4, "sweep", "jmp")
    a.label("bad")
    a.emit(b"\xff\x05" + _u32(st + _ST_ERRORS), f"inc dword [{st + _ST_ERRORS:#x}]          # errors")
    a.emit(b"\x83\x3d" + _u32(st + _ST_FIRST) + b"\xff", f"cmp dword [{st + _ST_FIRST:#x}], -1     # first_bad")
    a.jump(b"\x0f\x85", 4, "bad2", "jne")
    a.emit(b"\x89\x35" + _u32(st + _ST_FIRST), f"mov [{st + _ST_FIRST:#x}], esi")
    a.label("bad2")
    a.emit(b"\x89\x35" + _u32(st + _ST_LAST), f"mov [{st + _ST_LAST:#x}], esi           # last_bad")
    a.jump(b"\xe9", 4, "next", "jmp")

    # ---- the reset vector, 16 bytes before the end (F000:FFF0) ----
    reset = BIOS_SIZE - 16
    if len(a.code) > reset:
        raise AssertionError("the program overlaps the reset vector")
    a.emit(b"\x00" * (reset - len(a.code)), f".org {reset:#x}")
    a.label("reset")
    # E9 rel16: IP wraps at 64 KiB, so this reaches start16 in the same (high) mapping
    a.jump(b"\xe9", 2, "start16", "jmp near")
    a.emit(b"\xf4" * (BIOS_SIZE - len(a.code)), "hlt (padding)")
    return a


def bios_image(*, ram_end: int = DEFAULT_RAM_END, seed: int = SEED) -> bytes:
    """The 64 KiB firmware image for ``-bios``, with ``ram_end`` and ``seed`` baked in."""
    image = _program(ram_end, seed & _MASK32).resolve()
    assert len(image) == BIOS_SIZE
    return image


def listing(*, ram_end: int = DEFAULT_RAM_END, seed: int = SEED) -> str:
    """The program as text: address (high mapping), bytes and assembly (Intel syntax) per instruction."""
    a = _program(ram_end, seed & _MASK32)
    a.resolve()
    out = []
    for offset, data, text in a.lines:
        if text.endswith(":"):
            out.append(text)
        elif text.startswith((".org", ".align", "hlt (")):
            out.append(f"    {a.origin + offset:08x}  ({len(data)} bytes)  {text}")
        else:
            out.append(f"    {a.origin + offset:08x}  {data.hex(' '):<33} {text}")
    return "\n".join(out) + "\n"


def build_bios(path: Path, *, ram_end: int = DEFAULT_RAM_END, seed: int = SEED) -> Path:
    """Write ``bios_image(ram_end=..., seed=...)`` to ``path`` and return ``path``.

    Start QEMU with ``-bios path`` and at least ``ram_end`` bytes of RAM (at most 2 GiB).
    """
    path = Path(path)
    path.write_bytes(bios_image(ram_end=ram_end, seed=seed))
    return path

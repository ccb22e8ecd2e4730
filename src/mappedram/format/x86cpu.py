"""x86 CPU state from the ``cpu`` device sections, and the core-file notes QEMU makes of it.

The ``cpu`` section (vmstate_x86_cpu, one per vCPU, instance_id = cpu_index) is
decoded with its vmdesc entry: the entry gives each field's size in stream order, so
the fields needed here (``env.regs``, ``env.eip``, ``env.eflags``, ``env.hflags``,
``env.segs``, ``env.ldt``/``tr``/``gdt``/``idt``, ``env.cr[n]``, ``env.kernelgsbase``) are
located without knowing the VMStateDescription. vmstate integers are big-endian.

The notes are those of ``dump-guest-memory``: for each CPU an NT_PRSTATUS note named
"CORE" (the x86_64 layout when the first CPU is in long mode, HF_LMA set; the i386
layout otherwise), then for each CPU a "QEMU" note holding QEMUCPUState.

References:
    QEMU target/i386/machine.c (vmstate_x86_cpu, vmstate_segment),
    target/i386/cpu.h (R_EAX.., R_ES.., HF_LMA_SHIFT), target/i386/arch_dump.c
    (x86_64_write_elf64_note, x86_fill_elf_prstatus, qemu_get_cpustate,
    cpu_get_dump_info), dump/dump.c (write_elf64_notes, cpu_index).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from mappedram.errors import FormatError

from .constants import QEMU_VM_SUBSECTION
from .elf import EM_386, EM_X86_64, NT_PRSTATUS, elf_note
from .vmstate import FieldSpan, field_spans, find_field

__all__ = [
    "SegmentCache",
    "X86CPUState",
    "HF_LMA_MASK",
    "decode_cpu_section",
    "prstatus_x86_64",
    "prstatus_i386",
    "qemu_cpustate",
    "core_notes",
    "R_EAX",
    "R_ECX",
    "R_EDX",
    "R_EBX",
    "R_ESP",
    "R_EBP",
    "R_ESI",
    "R_EDI",
    "R_ES",
    "R_CS",
    "R_SS",
    "R_DS",
    "R_FS",
    "R_GS",
]

# target/i386/cpu.h
R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI = range(8)
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
HF_LMA_SHIFT = 14
HF_LMA_MASK = 1 << HF_LMA_SHIFT
CPU_NB_REGS = 16

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF

# arch_dump.c: x86_64_elf_prstatus = pad1[32], pid, pad2[76], x86_64_user_regs_struct (27 x u64), pad3[8]
_PRSTATUS_X86_64 = struct.Struct("<32xI76x27Q8x")
# x86_elf_prstatus = pad1[24], pid, pad2[44], x86_user_regs_struct, pad3[4]
_PRSTATUS_I386 = struct.Struct("<24xI44x7I8H2I2H2I2H4x")
# QEMUCPUState: version, size, 18 x u64, 10 x QEMUCPUSegment, cr[5], kernel_gs_base
_QEMU_CPUSTATE = struct.Struct("<II18Q" + "IIIIQ" * 10 + "5QQ")
QEMUCPUSTATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class SegmentCache:
    """QEMU's SegmentCache (vmstate_segment)."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True, slots=True)
class X86CPUState:
    """The part of CPUX86State that dump-guest-memory writes, for vCPU ``cpu_index``."""

    cpu_index: int
    regs: tuple[int, ...]  # CPU_NB_REGS, QEMU's order: R_EAX .. R_EDI, then r8 .. r15
    eip: int
    eflags: int
    hflags: int
    segs: tuple[SegmentCache, ...]  # R_ES, R_CS, R_SS, R_DS, R_FS, R_GS
    ldt: SegmentCache
    tr: SegmentCache
    gdt: SegmentCache
    idt: SegmentCache
    cr: tuple[int, int, int, int, int]  # cr0 .. cr4; cr1 is never migrated (always 0)
    kernelgsbase: int

    @property
    def lma(self) -> bool:
        """Long mode active (HF_LMA): QEMU then writes an EM_X86_64 core."""
        return bool(self.hflags & HF_LMA_MASK)


def _uint(body: bytes, span: FieldSpan, index: int = 0) -> int:
    at = span.offset + index * span.size
    return int.from_bytes(body[at : at + span.size], "big")


def _need(fields: object, path: tuple[str, ...], body: bytes, count: int = 1) -> FieldSpan:
    span = find_field(fields, path)
    if span is None:
        raise FormatError("cpu section: the vmdesc has no such field", field=".".join(path),
                          expected="a field of vmstate_x86_cpu")  # fmt: skip
    if span.count < count or (span.size not in (1, 2, 4, 8) and span.struct_fields is None):
        raise FormatError("cpu section: unexpected field shape", field=".".join(path),
                          expected=f">= {count} elements of 1..8 bytes",
                          actual=f"{span.count} x {span.size} bytes")  # fmt: skip
    if span.offset + span.size * span.count > len(body):
        raise FormatError("cpu section: field lies past the end of the section body", field=".".join(path),
                          expected=f"<= {len(body)} bytes", actual=span.offset + span.size * span.count)  # fmt: skip
    return span


def _segment(body: bytes, span: FieldSpan, index: int) -> SegmentCache:
    if span.struct_fields is None:
        raise FormatError("cpu section: segment field is not a struct", field=span.name, expected="vmstate_segment")
    members = {s.name: s for s in field_spans(list(span.struct_fields), span.offset + index * span.size)}
    values = []
    for name in ("selector", "base", "limit", "flags"):
        member = members.get(name)
        if member is None or member.size not in (1, 2, 4, 8):
            raise FormatError("cpu section: segment lacks a member", field=f"{span.name}.{name}",
                              expected="selector, base, limit, flags")  # fmt: skip
        values.append(_uint(body, member))
    return SegmentCache(*values)


# reference: vmstate_x86_cpu (target/i386/machine.c)
def decode_cpu_section(body: bytes, fields: object, cpu_index: int) -> X86CPUState:
    """Decode the ``cpu`` section body of vCPU ``cpu_index`` with its vmdesc ``fields``.

    Raises FormatError when a field is missing, or when the vmdesc sizes do not lead
    exactly to the section's subsections (or its end): then the offsets cannot be trusted.
    """
    spans = field_spans(fields)
    end = spans[-1].offset + spans[-1].size * spans[-1].count if spans else 0
    if end > len(body) or (end < len(body) and body[end] != QEMU_VM_SUBSECTION):
        raise FormatError("cpu section: the vmdesc field sizes do not match the section body", offset=end,
                          field="vmdesc", expected=f"subsections or the end at {end:#x}",
                          actual=f"{len(body):#x} bytes")  # fmt: skip
    regs = _need(fields, ("env.regs",), body, CPU_NB_REGS)
    segs = _need(fields, ("env.segs",), body, 6)
    crs = [_uint(body, _need(fields, (f"env.cr[{n}]",), body)) if n != 1 else 0 for n in range(5)]
    kgs = find_field(fields, ("env.kernelgsbase",))  # TARGET_X86_64 only
    return X86CPUState(
        cpu_index=cpu_index,
        regs=tuple(_uint(body, regs, i) for i in range(CPU_NB_REGS)),
        eip=_uint(body, _need(fields, ("env.eip",), body)),
        eflags=_uint(body, _need(fields, ("env.eflags",), body)),
        hflags=_uint(body, _need(fields, ("env.hflags",), body)),
        segs=tuple(_segment(body, segs, i) for i in range(6)),
        ldt=_segment(body, _need(fields, ("env.ldt",), body), 0),
        tr=_segment(body, _need(fields, ("env.tr",), body), 0),
        gdt=_segment(body, _need(fields, ("env.gdt",), body), 0),
        idt=_segment(body, _need(fields, ("env.idt",), body), 0),
        cr=(crs[0], crs[1], crs[2], crs[3], crs[4]),
        kernelgsbase=0 if kgs is None or kgs.offset + kgs.size > len(body) else _uint(body, kgs),
    )


# reference: x86_64_write_elf64_note
def prstatus_x86_64(cpu: X86CPUState) -> bytes:
    """The x86_64_elf_prstatus descriptor (336 bytes); pr_pid is cpu_index + 1."""
    r, s = cpu.regs, cpu.segs
    regs = (
        r[15], r[14], r[13], r[12], r[R_EBP], r[R_EBX], r[11], r[10], r[9], r[8],
        r[R_EAX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], 0,  # orig_rax: QEMU writes 0 ("FIXME")
        cpu.eip, s[R_CS].selector, cpu.eflags, r[R_ESP], s[R_SS].selector,
        s[R_FS].base, s[R_GS].base, s[R_DS].selector, s[R_ES].selector, s[R_FS].selector, s[R_GS].selector,
    )  # fmt: skip
    return _PRSTATUS_X86_64.pack(cpu.cpu_index + 1, *regs)


# reference: x86_fill_elf_prstatus
def prstatus_i386(cpu: X86CPUState) -> bytes:
    """The x86_elf_prstatus descriptor (144 bytes): 32-bit registers, 16-bit selectors."""
    r, s = cpu.regs, cpu.segs
    return _PRSTATUS_I386.pack(
        cpu.cpu_index + 1,
        r[R_EBX] & _M32, r[R_ECX] & _M32, r[R_EDX] & _M32, r[R_ESI] & _M32, r[R_EDI] & _M32,
        r[R_EBP] & _M32, r[R_EAX] & _M32,
        s[R_DS].selector & _M16, 0, s[R_ES].selector & _M16, 0,
        s[R_FS].selector & _M16, 0, s[R_GS].selector & _M16, 0,
        0, cpu.eip & _M32,  # orig_eax is left 0
        s[R_CS].selector & _M16, 0,
        cpu.eflags & _M32, r[R_ESP] & _M32,
        s[R_SS].selector & _M16, 0,
    )  # fmt: skip


def _qemu_segment(seg: SegmentCache) -> tuple[int, int, int, int, int]:
    # reference: copy_segment (selector, limit, flags, pad, base)
    return seg.selector & _M32, seg.limit & _M32, seg.flags & _M32, 0, seg.base


# reference: qemu_get_cpustate
def qemu_cpustate(cpu: X86CPUState) -> bytes:
    """QEMUCPUState (440 bytes, version 1, with kernel_gs_base)."""
    r, s = cpu.regs, cpu.segs
    gprs = (r[R_EAX], r[R_EBX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], r[R_ESP], r[R_EBP], *r[8:16])
    segments = [s[R_CS], s[R_DS], s[R_ES], s[R_FS], s[R_GS], s[R_SS], cpu.ldt, cpu.tr, cpu.gdt, cpu.idt]
    flat = [v for seg in segments for v in _qemu_segment(seg)]
    return _QEMU_CPUSTATE.pack(QEMUCPUSTATE_VERSION, _QEMU_CPUSTATE.size, *gprs, cpu.eip, cpu.eflags, *flat,
                               *cpu.cr, cpu.kernelgsbase)  # fmt: skip


# reference: write_elf64_notes, x86_cpu_write_elf64_note, cpu_write_qemu_note, cpu_get_dump_info
def core_notes(cpus: Sequence[X86CPUState]) -> tuple[bytes, int]:
    """(notes, e_machine) for ``cpus`` in cpu_index order: NT_PRSTATUS of each, then "QEMU" of each.

    The layout and e_machine follow the first CPU: EM_X86_64 in long mode, else EM_386.
    """
    if not cpus:
        return b"", EM_X86_64
    lma = cpus[0].lma
    prstatus = prstatus_x86_64 if lma else prstatus_i386
    notes = [elf_note(b"CORE", NT_PRSTATUS, prstatus(c)) for c in cpus]
    notes += [elf_note(b"QEMU", 0, qemu_cpustate(c)) for c in cpus]
    return b"".join(notes), EM_X86_64 if lma else EM_386

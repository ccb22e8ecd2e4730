"""The vCPU state of the micro-VM (the built-in KVM guest) as a device section body: ``CpuState`` and its codec.

Theory of operation:
    * ``CpuState`` holds everything needed to resume an x86-64 vCPU exactly where it
      stopped, at a point where no instruction is half done: the general registers, rip
      and rflags, the eight segment registers with their hidden parts (base, limit,
      attributes), gdt/idt, the control registers, efer and apic_base, the pending-interrupt
      bitmap, the x87/SSE state and the MSRs listed in ``CPUSTATE_MSRS``.
    * The body is vmstate style: the fields one after another in a fixed order, each a
      big-endian integer (be64/be32/be16/u8) or a byte buffer, with no tags and no lengths,
      as ``vmstate_save_state`` writes a VMStateDescription's fields. Its size is fixed
      (``CpuState.SIZE``). Version ``CPUSTATE_VERSION`` of section ``CPUSTATE_IDSTR``.
    * ``vmdesc_fields()`` describes the same fields in the form QEMU's vmdesc JSON uses
      (``{"name", "type", "size"}``, as ``vmsd_desc_field_start``/``vmsd_desc_field_end``
      write them), so ``scripts/analyze-migration.py`` can print a saved body field by field.
    * Decoding checks the length and the values no vCPU can hold (a flag byte other than 0
      or 1, rflags without its always-one bit 1, ...) and raises a FormatError naming the
      field and its offset; anything else on bad input is a bug.

References:
    QEMU migration/vmstate.c (vmstate_save_state_v, vmsd_desc_field_start,
    vmsd_desc_field_end), migration/vmstate-types.c (the "uint64"... and "buffer" infos),
    scripts/analyze-migration.py (how the vmdesc is read), target/i386/machine.c
    (vmstate_x86_cpu: what QEMU itself saves of a vCPU); Linux
    arch/x86/include/uapi/asm/kvm.h (kvm_regs, kvm_sregs, kvm_segment, kvm_fpu).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mappedram.errors import FormatError, TruncatedError
from mappedram.format.vmstate import DeviceRecord

__all__ = [
    "CPUSTATE_IDSTR",
    "CPUSTATE_VERSION",
    "CPUSTATE_MSRS",
    "GENERAL_REGISTERS",
    "SEGMENT_REGISTERS",
    "CONTROL_REGISTERS",
    "Segment",
    "DescriptorTable",
    "FpuState",
    "CpuState",
    "vmdesc_fields",
    "vmdesc_device",
]

CPUSTATE_IDSTR = "mappedram-cpu"
CPUSTATE_VERSION = 1

GENERAL_REGISTERS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

#: The MSRs a CpuState carries, in body order: (field name, MSR index).
CPUSTATE_MSRS: tuple[tuple[str, int], ...] = (
    ("msr_tsc", 0x10),  # IA32_TIME_STAMP_COUNTER
    ("msr_sysenter_cs", 0x174),
    ("msr_sysenter_esp", 0x175),
    ("msr_sysenter_eip", 0x176),
    ("msr_pat", 0x277),  # IA32_PAT
    ("msr_misc_enable", 0x1A0),  # IA32_MISC_ENABLE
    ("msr_star", 0xC0000081),
    ("msr_lstar", 0xC0000082),
    ("msr_cstar", 0xC0000083),
    ("msr_fmask", 0xC0000084),
    ("msr_kernel_gs_base", 0xC0000102),
)

_NR_INTERRUPT_WORDS = 4  # KVM_NR_INTERRUPTS (256) bits
_FLAG_FIELDS = ("present", "db", "s", "l", "g", "avl", "unusable")
_RFLAGS_FIXED1 = 1 << 1  # reserved, always 1
_RFLAGS_RESERVED = ~((1 << 22) - 1) & ((1 << 64) - 1)  # bits 63..22: always 0


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register with its hidden part, as ``struct kvm_segment``."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the kernel's name (long mode)
    g: int
    avl: int
    unusable: int


@dataclass(frozen=True, slots=True)
class DescriptorTable:
    """GDTR or IDTR, as ``struct kvm_dtable``."""

    base: int
    limit: int


@dataclass(frozen=True, slots=True)
class FpuState:
    """The x87 and SSE state, as ``struct kvm_fpu`` (fxsave layout; ``ftwx`` abridged)."""

    fpr: bytes  # 8 registers of 16 bytes (80-bit values, padded)
    fcw: int
    fsw: int
    ftwx: int
    last_opcode: int
    last_ip: int
    last_dp: int
    xmm: bytes  # 16 registers of 16 bytes
    mxcsr: int


# The body, field by field: (vmdesc name, struct code, vmdesc type). Built once.
_INT_TYPES = {"Q": ("uint64", 8), "I": ("uint32", 4), "H": ("uint16", 2), "B": ("uint8", 1)}
_SEGMENT_LAYOUT = (
    ("base", "Q"), ("limit", "I"), ("selector", "H"), ("type", "B"), ("present", "B"), ("dpl", "B"),
    ("db", "B"), ("s", "B"), ("l", "B"), ("g", "B"), ("avl", "B"), ("unusable", "B"),
)  # fmt: skip
_FPU_LAYOUT = (
    ("fpr", "128s"), ("fcw", "H"), ("fsw", "H"), ("ftwx", "B"), ("last_opcode", "H"),
    ("last_ip", "Q"), ("last_dp", "Q"), ("xmm", "256s"), ("mxcsr", "I"),
)  # fmt: skip


def _layout() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [(name, "Q") for name in GENERAL_REGISTERS]
    for seg in SEGMENT_REGISTERS:
        out += [(f"{seg}.{name}", code) for name, code in _SEGMENT_LAYOUT]
    for table in ("gdt", "idt"):
        out += [(f"{table}.base", "Q"), (f"{table}.limit", "H")]
    out += [(name, "Q") for name in CONTROL_REGISTERS]
    out += [(f"interrupt_bitmap[{i}]", "Q") for i in range(_NR_INTERRUPT_WORDS)]
    out += [(f"fpu.{name}", code) for name, code in _FPU_LAYOUT]
    out += [(name, "Q") for name, _ in CPUSTATE_MSRS]
    return out


_LAYOUT = _layout()
_BODY = struct.Struct(">" + "".join(code for _, code in _LAYOUT))


def _field_offsets() -> list[int]:
    offsets, at = [], 0
    for _, code in _LAYOUT:
        offsets.append(at)
        at += struct.calcsize(">" + code)
    return offsets


_OFFSETS = _field_offsets()


@dataclass(frozen=True, slots=True)
class CpuState:
    """Everything needed to resume the vCPU exactly: see the module docstring.

    ``msrs`` holds the values of ``CPUSTATE_MSRS`` in that order (see :meth:`msr`).
    """

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, ...]
    fpu: FpuState
    msrs: tuple[int, ...]

    SIZE: ClassVar[int] = _BODY.size
    IDSTR: ClassVar[str] = CPUSTATE_IDSTR
    VERSION: ClassVar[int] = CPUSTATE_VERSION

    def msr(self, name: str) -> int:
        """The value of the MSR named ``name`` in CPUSTATE_MSRS (e.g. ``"msr_pat"``)."""
        for (known, _), value in zip(CPUSTATE_MSRS, self.msrs):
            if known == name:
                return value
        raise KeyError(name)

    @property
    def counter(self) -> int:
        """The built-in guest's loop counter: the workload keeps it in r8."""
        return self.r8

    def record(self) -> DeviceRecord:
        """This state as the FULL device section a file carries, with its vmdesc fields."""
        return DeviceRecord(CPUSTATE_IDSTR, 0, CPUSTATE_VERSION, self.encode(), tuple(vmdesc_fields()))

    def encode(self) -> bytes:
        """The section body: ``SIZE`` bytes, big-endian, in the fixed field order."""
        if len(self.interrupt_bitmap) != _NR_INTERRUPT_WORDS or len(self.msrs) != len(CPUSTATE_MSRS):
            raise ValueError("interrupt_bitmap needs 4 words and msrs one value per CPUSTATE_MSRS entry")
        values: list[Any] = [getattr(self, name) for name in GENERAL_REGISTERS]
        for seg in SEGMENT_REGISTERS:
            segment = getattr(self, seg)
            values += [getattr(segment, name) for name, _ in _SEGMENT_LAYOUT]
        for table in (self.gdt, self.idt):
            values += [table.base, table.limit]
        values += [getattr(self, name) for name in CONTROL_REGISTERS]
        values += list(self.interrupt_bitmap)
        values += [getattr(self.fpu, name) for name, _ in _FPU_LAYOUT]
        values += list(self.msrs)
        try:
            return _BODY.pack(*values)
        except struct.error as exc:
            raise ValueError(f"CpuState field out of range: {exc}") from None

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, *, offset: int = 0) -> CpuState:
        """Decode the body at ``data[offset:]`` (``SIZE`` bytes; what follows is not looked at).

        Raises:
            TruncatedError: fewer than ``SIZE`` bytes; names the first field cut off.
            FormatError: a value no vCPU can hold; names the field and its offset.
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        available = len(data) - offset
        if available < cls.SIZE:
            index = next(i for i, at in enumerate(_OFFSETS) if at + _BODY_FIELD_SIZES[i] > available)
            raise TruncatedError(
                f"{CPUSTATE_IDSTR} body is cut off",
                offset=offset + _OFFSETS[index],
                field=_LAYOUT[index][0],
                expected=f"{cls.SIZE} bytes",
                actual=f"{max(available, 0)} bytes",
            )
        raw = _BODY.unpack_from(data, offset)
        values = dict(zip((name for name, _ in _LAYOUT), raw))
        _check(values, offset)
        return cls.from_parts(
            registers={name: values[name] for name in GENERAL_REGISTERS},
            segments={
                seg: Segment(**{f: values[f"{seg}.{f}"] for f, _ in _SEGMENT_LAYOUT}) for seg in SEGMENT_REGISTERS
            },
            gdt=DescriptorTable(values["gdt.base"], values["gdt.limit"]),
            idt=DescriptorTable(values["idt.base"], values["idt.limit"]),
            control={name: values[name] for name in CONTROL_REGISTERS},
            interrupt_bitmap=tuple(values[f"interrupt_bitmap[{i}]"] for i in range(_NR_INTERRUPT_WORDS)),
            fpu=FpuState(**{f: values[f"fpu.{f}"] for f, _ in _FPU_LAYOUT}),
            msrs=tuple(values[name] for name, _ in CPUSTATE_MSRS),
        )

    @classmethod
    def from_parts(
        cls,
        *,
        registers: Mapping[str, int],
        segments: Mapping[str, Segment],
        gdt: DescriptorTable,
        idt: DescriptorTable,
        control: Mapping[str, int],
        interrupt_bitmap: tuple[int, ...],
        fpu: FpuState,
        msrs: tuple[int, ...],
    ) -> CpuState:
        """Build a CpuState from groups keyed by GENERAL_REGISTERS, SEGMENT_REGISTERS, CONTROL_REGISTERS."""
        args: list[Any] = [int(registers[name]) for name in GENERAL_REGISTERS]
        args += [segments[name] for name in SEGMENT_REGISTERS]
        args += [gdt, idt]
        args += [int(control[name]) for name in CONTROL_REGISTERS]
        args += [tuple(int(w) for w in interrupt_bitmap), fpu, tuple(int(v) for v in msrs)]
        return cls(*args)


_BODY_FIELD_SIZES = [struct.calcsize(">" + code) for _, code in _LAYOUT]
_INDEX = {name: i for i, (name, _) in enumerate(_LAYOUT)}


def _bad(values_offset: int, name: str, message: str, expected: str, actual: int) -> FormatError:
    return FormatError(
        f"{CPUSTATE_IDSTR} body: {message}",
        offset=values_offset + _OFFSETS[_INDEX[name]],
        field=name,
        expected=expected,
        actual=actual,
    )


def _check(values: dict[str, Any], offset: int) -> None:
    rflags = values["rflags"]
    if not rflags & _RFLAGS_FIXED1 or rflags & _RFLAGS_RESERVED:
        raise _bad(offset, "rflags", "reserved rflags bits are wrong", "bit 1 set, bits 63..22 clear", rflags)
    for seg in SEGMENT_REGISTERS:
        for flag in _FLAG_FIELDS:
            name = f"{seg}.{flag}"
            if values[name] > 1:
                raise _bad(offset, name, "a segment flag is not a boolean", "0 or 1", values[name])
        if values[f"{seg}.type"] > 15:
            raise _bad(offset, f"{seg}.type", "segment type does not fit 4 bits", "0..15", values[f"{seg}.type"])
        if values[f"{seg}.dpl"] > 3:
            raise _bad(offset, f"{seg}.dpl", "descriptor privilege level above 3", "0..3", values[f"{seg}.dpl"])


def vmdesc_fields() -> list[dict[str, Any]]:
    """The body's fields as QEMU's vmdesc JSON describes a VMStateDescription's fields.

    Integers are ``{"name", "type": "uint64"|"uint32"|"uint16"|"uint8", "size"}``, byte
    arrays ``{"name", "type": "buffer", "size"}`` (vmstate_info_buffer), in body order;
    the sizes add up to ``CpuState.SIZE``.
    """
    out: list[dict[str, Any]] = []
    for (name, code), size in zip(_LAYOUT, _BODY_FIELD_SIZES):
        kind = _INT_TYPES[code][0] if code in _INT_TYPES else "buffer"
        out.append({"name": name, "type": kind, "size": size})
    return out


def vmdesc_device(instance_id: int = 0) -> dict[str, Any]:
    """The vmdesc ``devices`` entry of a FULL section holding a CpuState body."""
    return {
        "name": CPUSTATE_IDSTR,
        "instance_id": instance_id,
        "vmsd_name": CPUSTATE_IDSTR,
        "version": CPUSTATE_VERSION,
        "fields": vmdesc_fields(),
    }


assert sum(_BODY_FIELD_SIZES) == _BODY.size, "the layout and the struct disagree"

"""The built-in guests' vCPU state in a file: find and decode its device section.

A file of the KVM guest holds a ``mappedram-cpu`` section (:class:`.cpustate.CpuState`),
one of the software guest a ``mappedram-soft-cpu`` section (:class:`.softvm.SoftCpu`).
"""

from __future__ import annotations

from mappedram.errors import FormatError
from mappedram.image import MigrationFile

from .cpustate import CPUSTATE_IDSTR, CpuState
from .softvm import SOFTCPU_IDSTR, SoftCpu

__all__ = ["read_guest_state"]

#: The built-in guests' vCPU sections, by idstr: how to decode one.
_STATE_CODECS: dict[str, type[CpuState] | type[SoftCpu]] = {CPUSTATE_IDSTR: CpuState, SOFTCPU_IDSTR: SoftCpu}


def read_guest_state(mf: MigrationFile) -> CpuState | SoftCpu:
    """The built-in guest's vCPU section of ``mf`` (``mappedram-cpu`` or ``mappedram-soft-cpu``)."""
    sections = mf.device_sections or []
    blob = mf.device_state()
    for s in sections:
        cls = _STATE_CODECS.get(s.idstr)
        if cls is None:
            continue
        start = s.body_offset - mf.device_state_offset
        body = blob[start : start + s.body_length]
        if len(body) != cls.SIZE:
            raise FormatError(
                f"{s.idstr} section has a body of the wrong size",
                offset=s.body_offset,
                field=s.idstr,
                expected=f"{cls.SIZE} bytes",
                actual=f"{len(body)} bytes",
                path=mf.path,
            )
        try:
            return cls.decode(body)
        except FormatError as exc:
            if exc.offset is not None:
                exc.offset += s.body_offset
            exc.path = mf.path
            raise
    raise FormatError(
        "no vCPU state of the built-in guest in this file",
        offset=mf.device_state_offset,
        field="device sections",
        expected=f"a {CPUSTATE_IDSTR!r} or {SOFTCPU_IDSTR!r} section",
        actual=", ".join(repr(s.idstr) for s in sections) or "none",
        path=mf.path,
    )

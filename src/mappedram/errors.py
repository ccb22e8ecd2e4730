"""The single exception tree of mappedram.

::

    MappedRamError                      root; exit_code 1
    ├── FormatError                     the bytes are not a valid QEMU migration stream
    │   ├── TruncatedError              the stream ends before a record is complete
    │   ├── BadMagicError               not "QEVM", not a known section type, ...
    │   ├── UnsupportedError            valid QEMU input this project does not handle
    │   ├── LayoutError                 offsets, sizes or alignment that cannot be right
    │   └── IntegrityError              the data does not match the file's seal (block, pages, offsets)
    ├── UsageError                      the caller asked for something impossible; exit_code 2
    ├── IOEngineError                   an OS call failed on a file (errno, path, offset)
    │   └── IncompleteRestoreError      ... during a restore: lists the page ranges not restored
    ├── KvmError                        /dev/kvm is missing or refused, or a KVM ioctl failed
    └── MigrationError                  a QEMU destination refused the stream or went away; exit_code 3

Every error carries keyword-only structured fields and renders them in ``str()``, always
in one shape: ``FILE: message (offset 0x.., field .., expected .., found ..)``; the CLI
prints that after ``mappedram: ``, and ``to_dict()`` gives the same fields as JSON (the
bare ``message``, the rendered ``text``).
Any exception other than :class:`FormatError` (or :class:`IOEngineError` for
OS failures) raised while decoding untrusted input is a bug.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MappedRamError",
    "FormatError",
    "TruncatedError",
    "BadMagicError",
    "UnsupportedError",
    "LayoutError",
    "IntegrityError",
    "UsageError",
    "IOEngineError",
    "IncompleteRestoreError",
    "KvmError",
    "MigrationError",
]


class MappedRamError(Exception):
    """Root of every error raised by mappedram."""

    exit_code: int = 1

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, **self.fields, "text": str(self)}


class FormatError(MappedRamError):
    """Malformed input: names the file offset, the field, what was expected and what was found.

    Args:
        message: a short statement of the problem.
        offset: absolute file offset of the offending bytes.
        field: name of the field (QEMU's name where it has one).
        expected: what a valid stream has there.
        actual: what was found.
        path: the file, when known (filled in by the reader).
        block: the RAM block's idstr, when the problem is inside one.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        field: str | None = None,
        expected: Any = None,
        actual: Any = None,
        path: str | None = None,
        block: str | None = None,
    ) -> None:
        super().__init__(message, offset=offset, field=field, expected=expected, actual=actual, path=path, block=block)
        self.offset = offset
        self.field = field
        self.expected = expected
        self.actual = actual
        self.path = path
        self.block = block

    def with_path(self, path: str) -> FormatError:
        """Return this error with ``path`` filled in (the codec itself never knows the file)."""
        if self.path is None:
            self.path = path
            self.fields["path"] = path
        return self

    def __str__(self) -> str:
        text = f"{self.path}: " if self.path is not None else ""
        if self.block is not None and f"block {self.block!r}" not in self.message:
            text += f"block {self.block!r}: "
        text += self.message
        details = []
        if self.offset is not None:
            details.append(f"offset {self.offset:#x}")
        if self.field is not None:
            details.append(f"field {self.field}")
        if self.expected is not None:
            details.append(f"expected {_render(self.expected)}")
        if self.actual is not None:
            details.append(f"found {_render(self.actual)}")
        if details:
            text += " (" + ", ".join(details) + ")"
        return text


class TruncatedError(FormatError):
    """The stream ends before the record at ``offset`` is complete."""


class BadMagicError(FormatError):
    """A magic number, type byte or marker has the wrong value."""


class UnsupportedError(FormatError):
    """Valid QEMU input that this project does not handle (e.g. XBZRLE pages)."""


class LayoutError(FormatError):
    """Offsets, sizes or alignment that no valid file can have."""


class IntegrityError(FormatError):
    """The file's content does not match its seal (format/seal.py), or a seal the caller
    asked for is missing. ``offset``, ``block`` and the message name the first mismatch;
    ``mismatches`` lists them all (each a dict with ``block``, ``first_page``, ``pages``,
    ``file_offset``, ``file_end``: the page range and the file bytes it reads)."""

    def __init__(self, message: str, *, mismatches: list[dict[str, Any]] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.mismatches = list(mismatches or [])
        self.fields["mismatches"] = self.mismatches


class UsageError(MappedRamError):
    """The caller asked for something that cannot be done (bad option, unknown block)."""

    exit_code = 2


class IOEngineError(MappedRamError):
    """An OS call failed: names the operation, the file, the offset and the errno."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        length: int | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message, path=path, offset=offset, length=length, errno=errno)
        self.path = path
        self.offset = offset
        self.length = length
        self.errno = errno

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        details = [f"offset {self.offset:#x}"] if self.offset is not None else []
        if self.length is not None:
            details.append(f"{self.length} bytes")
        return text + (" (" + ", ".join(details) + ")" if details else "")


class IncompleteRestoreError(IOEngineError):
    """A restore failed part-way; ``incomplete`` lists ``{block, first_page, pages}`` that may be
    half-written. Every page outside those ranges holds the file's content."""

    def __init__(self, message: str, *, incomplete: list[dict[str, Any]], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.incomplete = incomplete
        self.fields["incomplete"] = incomplete


class KvmError(MappedRamError):
    """KVM is unusable here, or one of its ioctls failed: names the ioctl and the errno.

    Args:
        message: what failed and why, in words.
        ioctl: the ioctl (``KVM_RUN``, ...) or the call (``open``, ``mmap``) that failed.
        errno: the OS error number, when there is one.
        exit_reason: for a guest that stopped unexpectedly, the KVM exit reason's name.
        details: what else KVM reported (registers, hardware reasons).
    """

    def __init__(
        self,
        message: str,
        *,
        ioctl: str | None = None,
        errno: int | None = None,
        exit_reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, ioctl=ioctl, errno=errno, exit_reason=exit_reason, details=details)
        self.ioctl = ioctl
        self.errno = errno
        self.exit_reason = exit_reason
        self.details = details or {}


class MigrationError(MappedRamError):
    """A migration to a QEMU destination failed: the destination refused the stream, closed
    the connection, or did not answer in time.

    Args:
        message: what happened, in words.
        destination: the address served (``unix:PATH``, ``tcp:HOST:PORT``).
        stage: where in the protocol it happened (``connect``, ``stream``, ``postcopy``, ...).
        qemu_error: what QEMU said: its ``query-migrate`` error-desc, or the last error line
            on its stderr when mappedram started it.
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        destination: str | None = None,
        stage: str | None = None,
        qemu_error: str | None = None,
    ) -> None:
        super().__init__(message, destination=destination, stage=stage, qemu_error=qemu_error)
        self.destination = destination
        self.stage = stage
        self.qemu_error = qemu_error

    def __str__(self) -> str:
        text = f"{self.destination}: {self.message}" if self.destination else self.message
        if self.qemu_error and self.qemu_error not in self.message:
            text += f" (QEMU: {self.qemu_error})"
        return text


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:#x}" if value > 9 else str(value)
    if isinstance(value, (bytes, bytearray)):
        return value[:32].hex(" ") + (" ..." if len(value) > 32 else "")
    if isinstance(value, str):
        return repr(value)
    return str(value)

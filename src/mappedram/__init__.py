"""mappedram: QEMU mapped-ram migration files in Python.

Read, verify and extract QEMU migration files (mapped-ram and the legacy streamed
format) with the same byte-level rules QEMU uses. Everything in ``__all__`` is the
public API; every other module name is an implementation detail.
"""

from __future__ import annotations

from mappedram.errors import (
    BadMagicError as BadMagicError,
    FormatError as FormatError,
    IOEngineError as IOEngineError,
    LayoutError as LayoutError,
    MappedRamError as MappedRamError,
    TruncatedError as TruncatedError,
    UnsupportedError as UnsupportedError,
    UsageError as UsageError,
)
from mappedram.image import MigrationFile as MigrationFile, RamBlock as RamBlock, open_file as open_file

__version__ = "0.1.0"

__all__ = [
    "BadMagicError",
    "FormatError",
    "IOEngineError",
    "LayoutError",
    "MappedRamError",
    "MigrationFile",
    "RamBlock",
    "TruncatedError",
    "UnsupportedError",
    "UsageError",
    "open_file",
    "__version__",
]

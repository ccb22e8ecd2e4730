"""mappedram: QEMU mapped-ram migration files in Python.

Read, verify and extract QEMU migration files (mapped-ram and the legacy streamed
format) with the same byte-level rules QEMU uses. Everything in ``__all__`` is the
public API; every other module name is an implementation detail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mappedram.errors import (
    BadMagicError as BadMagicError,
)
from mappedram.errors import (
    FormatError as FormatError,
)
from mappedram.errors import (
    IncompleteRestoreError as IncompleteRestoreError,
)
from mappedram.errors import (
    IntegrityError as IntegrityError,
)
from mappedram.errors import (
    IOEngineError as IOEngineError,
)
from mappedram.errors import (
    KvmError as KvmError,
)
from mappedram.errors import (
    LayoutError as LayoutError,
)
from mappedram.errors import (
    MappedRamError as MappedRamError,
)
from mappedram.errors import (
    TruncatedError as TruncatedError,
)
from mappedram.errors import (
    UnsupportedError as UnsupportedError,
)
from mappedram.errors import (
    UsageError as UsageError,
)

if TYPE_CHECKING:
    from mappedram.image import MigrationFile as MigrationFile
    from mappedram.image import RamBlock as RamBlock
    from mappedram.image import open_file as open_file

__version__ = "0.1.0"

__all__ = [
    "BadMagicError",
    "FormatError",
    "IncompleteRestoreError",
    "IOEngineError",
    "IntegrityError",
    "KvmError",
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


def __getattr__(name: str) -> Any:
    # The reader is imported on first use (PEP 562): ``import mappedram.errors`` and the
    # CLI's start-up do not pay for the whole package.
    if name in ("MigrationFile", "RamBlock", "open_file"):
        from mappedram import image

        value = getattr(image, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Operations on migration files: each composes the reader, the layout planner and the
engine, and returns a report object; nothing here prints (the CLI renders the reports).

This package is the CLI's one door to the library:

* :mod:`.inspect`: :func:`info`, :func:`verify`, :func:`diff`;
* :mod:`.blockimage` and :mod:`.guestphys`: raw block images, ELF cores and guest-physical images;
* :mod:`.writer`, :mod:`.loader`, :mod:`.relay`: static saves, restores, re-lays and conversions;
* :mod:`.live` with :mod:`.trackers`: live saves of RAM that keeps changing;
* :mod:`.serve` with :mod:`.qemu`: a file served to a live QEMU destination, precopy or postcopy;
* :mod:`.seal`: integrity manifests: :func:`seal_file`, :func:`check_seal` (every reader's check);
* :mod:`.protocol`: the save protocol every writer runs under;
* :mod:`.options`: :class:`EngineOptions`, the one options object of every page-moving operation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blockimage import ExtractedBlock, ExtractReport, extract, safe_filename
    from .chain import ChildReport, flatten, write_child
    from .converge import AutoConverge, Converger, CpuThrottle, DirtyLimit
    from .guestphys import EXPORT_FORMATS, ExportReport, ExportSegment, export
    from .inspect import (
        BlockDiff,
        BlockInfo,
        DeviceInfo,
        DiffReport,
        InfoReport,
        LibvirtInfo,
        Problem,
        VerifyReport,
        diff,
        info,
        verify,
    )
    from .live import FORMATS, LIVE_DEFAULTS, LiveOptions, LiveSaveReport, PassStats, live_save
    from .loader import RestoreReport, restore, restore_files
    from .options import DEFAULT_CHANNELS, DEFAULTS, DirtySample, EngineOptions, OnStart, Progress
    from .protocol import TEMP_MARKER
    from .relay import CONVERT_FORMATS, convert, rewrite
    from .seal import (
        NO_CHECK,
        SEAL_ALGORITHMS,
        SEAL_CHECK,
        SealCheck,
        SealInfo,
        SealKey,
        SealMismatch,
        SealOptions,
        SealReport,
        check_seal,
        load_key,
        seal_file,
        verify_seal,
    )
    from .server import ServeOptions, ServeReport, serve, serve_qemu
    from .trackers import CallbackTracker, CompareTracker, DirtyTracker, OwnerTracker
    from .writer import DEFAULT_MACHINE, SaveReport, save, save_files
    from .zstd import CompressOptions, CompressReport, compress, decompress

__all__ = [
    "AutoConverge",
    "Converger",
    "CpuThrottle",
    "DirtyLimit",
    "LIVE_DEFAULTS",
    "LiveOptions",
    "BlockDiff",
    "BlockInfo",
    "CONVERT_FORMATS",
    "CallbackTracker",
    "ChildReport",
    "CompressOptions",
    "CompressReport",
    "CompareTracker",
    "DEFAULTS",
    "DEFAULT_CHANNELS",
    "DEFAULT_MACHINE",
    "DeviceInfo",
    "DiffReport",
    "DirtyTracker",
    "EXPORT_FORMATS",
    "EngineOptions",
    "ExportReport",
    "ExportSegment",
    "ExtractReport",
    "ExtractedBlock",
    "FORMATS",
    "InfoReport",
    "LibvirtInfo",
    "LiveSaveReport",
    "NO_CHECK",
    "OnStart",
    "OwnerTracker",
    "PassStats",
    "DirtySample",
    "Problem",
    "Progress",
    "RestoreReport",
    "SEAL_ALGORITHMS",
    "SEAL_CHECK",
    "SaveReport",
    "SealCheck",
    "SealInfo",
    "SealKey",
    "SealMismatch",
    "SealOptions",
    "SealReport",
    "ServeOptions",
    "ServeReport",
    "TEMP_MARKER",
    "VerifyReport",
    "check_seal",
    "compress",
    "convert",
    "decompress",
    "diff",
    "export",
    "extract",
    "flatten",
    "info",
    "live_save",
    "load_key",
    "restore",
    "restore_files",
    "rewrite",
    "safe_filename",
    "save",
    "save_files",
    "seal_file",
    "serve",
    "serve_qemu",
    "verify",
    "verify_seal",
    "write_child",
]

#: Where each public name lives: the submodule is imported on first use (PEP 562), so a
#: command imports only what it runs (the CLI's start-up is part of every save it times).
_WHERE = {
    "AutoConverge": "converge",
    "Converger": "converge",
    "DirtyLimit": "converge",
    "BlockDiff": "inspect",
    "BlockInfo": "inspect",
    "CONVERT_FORMATS": "options",
    "CallbackTracker": "trackers",
    "ChildReport": "chain",
    "CompareTracker": "trackers",
    "CompressOptions": "zstd",
    "CompressReport": "zstd",
    "CpuThrottle": "converge",
    "DEFAULTS": "options",
    "DEFAULT_CHANNELS": "options",
    "DEFAULT_MACHINE": "options",
    "DeviceInfo": "inspect",
    "DiffReport": "inspect",
    "DirtyTracker": "trackers",
    "EXPORT_FORMATS": "options",
    "EngineOptions": "options",
    "ExportReport": "guestphys",
    "ExportSegment": "guestphys",
    "ExtractReport": "blockimage",
    "ExtractedBlock": "blockimage",
    "FORMATS": "options",
    "InfoReport": "inspect",
    "LIVE_DEFAULTS": "options",
    "LibvirtInfo": "inspect",
    "LiveOptions": "options",
    "LiveSaveReport": "live",
    "NO_CHECK": "seal",
    "OnStart": "options",
    "OwnerTracker": "trackers",
    "PassStats": "options",
    "DirtySample": "options",
    "Problem": "inspect",
    "Progress": "options",
    "RestoreReport": "loader",
    "SEAL_ALGORITHMS": "options",
    "SEAL_CHECK": "seal",
    "SaveReport": "writer",
    "SealCheck": "seal",
    "SealInfo": "seal",
    "SealKey": "seal",
    "SealMismatch": "seal",
    "SealOptions": "seal",
    "SealReport": "seal",
    "ServeOptions": "server",
    "ServeReport": "server",
    "TEMP_MARKER": "protocol",
    "VerifyReport": "inspect",
    "check_seal": "seal",
    "compress": "zstd",
    "convert": "relay",
    "decompress": "zstd",
    "diff": "inspect",
    "export": "guestphys",
    "extract": "blockimage",
    "flatten": "chain",
    "info": "inspect",
    "live_save": "live",
    "load_key": "seal",
    "restore": "loader",
    "restore_files": "loader",
    "rewrite": "relay",
    "safe_filename": "blockimage",
    "save": "writer",
    "save_files": "writer",
    "seal_file": "seal",
    "serve": "server",
    "serve_qemu": "server",
    "verify": "inspect",
    "verify_seal": "seal",
    "write_child": "chain",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

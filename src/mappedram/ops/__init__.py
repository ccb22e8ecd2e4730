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

from .blockimage import ExtractedBlock, ExtractReport, extract, safe_filename
from .chain import ChildReport, flatten, write_child
from .converge import AutoConverge, CpuThrottle
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
from .options import DEFAULT_CHANNELS, DEFAULTS, EngineOptions, OnStart, Progress
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
from .serve import ServeOptions, ServeReport, serve, serve_qemu
from .trackers import CallbackTracker, CompareTracker, DirtyTracker, OwnerTracker
from .writer import DEFAULT_MACHINE, SaveReport, save, save_files
from .zstd import CompressOptions, CompressReport, compress, decompress

__all__ = [
    "AutoConverge",
    "CpuThrottle",
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

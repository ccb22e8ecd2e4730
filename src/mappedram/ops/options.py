"""The engine options every operation that moves pages takes, as one object.

An operation takes ``options: EngineOptions`` (default :data:`DEFAULTS`) instead of
loose keyword arguments, so the CLI, the vm operations and library callers pass the same
six settings the same way, and mypy sees the whole boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineOptions", "DEFAULTS", "DEFAULT_CHANNELS", "Progress", "OnStart"]

#: Called with the bytes of RAM each finished piece of work covered.
Progress = Callable[[int], None]
#: Called once, before the first page moves, with the total bytes the operation will cover.
OnStart = Callable[[int], None]

#: Parallel channels (threads, each with its own file descriptors) unless told otherwise.
DEFAULT_CHANNELS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineOptions:
    """How an operation moves pages.

    Args:
        channels: parallel channels (threads with their own descriptors and buffers).
        direct_io: page I/O with O_DIRECT, bypassing the page cache.
        direct_io_fallback: with ``direct_io``, use the page cache where the filesystem
            refuses O_DIRECT (the report says so) instead of failing.
        durable: fsync the file and its directory before a save reports success.
        progress: called with the RAM bytes each finished piece of work covered.
        on_start: called once with the total bytes, before the first page moves.
    """

    channels: int = DEFAULT_CHANNELS
    direct_io: bool = False
    direct_io_fallback: bool = False
    durable: bool = True
    progress: Progress | None = None
    on_start: OnStart | None = None

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def started(self, total: int) -> None:
        if self.on_start is not None:
            self.on_start(total)


DEFAULTS = EngineOptions()

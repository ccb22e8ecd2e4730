"""The CLI's shared pieces: each shared option defined once, QEMU's size and URI syntax,
progress bars, and report output (text or JSON)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from mappedram import ops
from mappedram.errors import UsageError
from mappedram.ops.options import DEFAULT_CHANNELS, DIRECT_IO_MODES, EngineOptions, OnStart, Progress

if TYPE_CHECKING:
    from mappedram.ops import SealOptions

__all__ = [
    "parse_size",
    "parse_target",
    "add_output",
    "add_quiet",
    "add_channels",
    "add_engine",
    "engine_options",
    "add_seal_writer",
    "add_seal_reader",
    "seal_writer_options",
    "seal_reader_options",
    "show_progress",
    "progress_bar",
    "quiet",
    "note",
    "emit",
]

_SIZE = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)([bBkKmMgGtTpPeE]?)$")
_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """QEMU's size syntax for ``offset=``: decimal, 0x hex, or a binary suffix (1M = 1048576)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}: expected e.g. 4096, 0x1000 or 1M")
    digits, suffix = m.groups()
    if digits.lower().startswith("0x"):
        if suffix:
            raise UsageError(f"invalid size {text!r}: hex takes no suffix")
        return int(digits, 16)
    return int(digits) << _SUFFIX[suffix.lower()]


def parse_target(text: str, offset: str | None) -> tuple[str, int]:
    """Accept ``PATH`` or QEMU's ``file:PATH[,offset=N]``; ``--offset`` wins over the URI's."""
    path, uri_offset = text, 0
    if text.startswith("file:"):
        path = text[len("file:") :]
        cut = path.find(",offset=")
        if cut >= 0:
            uri_offset = parse_size(path[cut + len(",offset=") :])
            path = path[:cut]
    return path, parse_size(offset) if offset is not None else uri_offset


# -- options --------------------------------------------------------------------------


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print nothing but errors: no progress bar, no report, no notes (--output json still prints its JSON)",
    )


def add_channels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        help=f"parallel channels (threads with their own file descriptors; default {DEFAULT_CHANNELS})",
    )


def add_engine(p: argparse.ArgumentParser, *, direct_io: bool = True) -> None:
    """``--channels`` and, for commands that write or read pages in bulk, the O_DIRECT options."""
    add_channels(p)
    if direct_io:
        p.add_argument(
            "--direct-io",
            nargs="?",
            choices=DIRECT_IO_MODES,
            const="on",
            default="auto",
            metavar="auto|on|off",
            help="page I/O with O_DIRECT, bypassing the page cache: auto (the default) where the filesystem "
            "takes it and a probe (once per filesystem) found it faster there; on (--direct-io alone); off",
        )
        p.add_argument(
            "--direct-io-fallback",
            action="store_true",
            help="with --direct-io on: use the page cache where the filesystem refuses O_DIRECT",
        )


_KEY_HELP = "a regular file of your own, mode 0600, of 16 bytes or more (e.g. head -c 32 /dev/urandom)"


def add_seal_writer(p: argparse.ArgumentParser) -> None:
    """``--seal`` and ``--key`` for a command that writes a file."""
    p.add_argument("--seal", action="store_true",
                   help="seal the file (a digest of every MiB of its RAM and one of the rest, in its trailer) "
                        "before it gets its name")  # fmt: skip
    p.add_argument("--key", metavar="KEYFILE", help=f"seal with a key (implies --seal): KEYFILE is {_KEY_HELP}")


def add_seal_reader(p: argparse.ArgumentParser) -> None:
    """``--key`` and ``--no-verify-seal`` for a command that reads a file's RAM."""
    p.add_argument("--key", metavar="KEYFILE",
                   help="check the seal with this key (a keyed seal needs it; an unsealed file, or one sealed "
                        f"without a key, is then refused): {_KEY_HELP}")  # fmt: skip
    p.add_argument("--no-verify-seal", action="store_true",
                   help="do not check a sealed file's digests before writing (by default they are all checked "
                        "first, and a mismatch writes nothing)")  # fmt: skip


def seal_writer_options(args: argparse.Namespace) -> SealOptions | None:
    """The seal a writer makes (None: none), as ``--seal`` and ``--key`` say."""
    key = getattr(args, "key", None)
    if not getattr(args, "seal", False) and key is None:
        return None
    return ops.SealOptions(key=None if key is None else ops.load_key(key))


def seal_reader_options(args: argparse.Namespace) -> SealOptions:
    """How a reader checks a sealed file, as ``--key`` and ``--no-verify-seal`` say."""
    key = getattr(args, "key", None)
    if getattr(args, "no_verify_seal", False):
        if key is not None:
            raise UsageError("--key checks the seal, --no-verify-seal skips it: give one of them")
        return ops.NO_CHECK
    return ops.SealOptions(key=None if key is None else ops.load_key(key))


def engine_options(
    args: argparse.Namespace, progress: Progress | None = None, on_start: OnStart | None = None, **changes: Any
) -> EngineOptions:
    """The :class:`EngineOptions` the parsed arguments say."""
    channels = getattr(args, "channels", DEFAULT_CHANNELS)
    if channels < 1:
        raise UsageError(f"--channels must be at least 1, got {channels}")
    settings: dict[str, Any] = dict(
        channels=channels,
        direct_io=getattr(args, "direct_io", "auto"),
        direct_io_fallback=getattr(args, "direct_io_fallback", False),
        progress=progress,
        on_start=on_start,
    )
    return EngineOptions(**{**settings, **changes})


# -- progress and output ----------------------------------------------------------------


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only for people: on a terminal, with human output, unless --quiet."""
    return args.output != "json" and sys.stderr.isatty() and not getattr(args, "quiet", False)


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[tuple[Progress | None, OnStart | None]]:
    """A tqdm bar on a terminal (bytes, with rate); nothing otherwise."""
    if not enabled:
        yield None, None
        return
    from tqdm import tqdm

    bar: list[Any] = []

    def start(total: int) -> None:
        bar.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label, leave=False))

    def update(n: int) -> None:
        if bar:
            bar[0].update(n)

    try:
        yield update, start
    finally:
        if bar:
            bar[0].close()


def emit(args: argparse.Namespace, report: Any, render: Callable[[Any], str]) -> None:
    """Print a report: ``to_dict()`` as JSON with ``--output json``, else its rendering
    (nothing with ``--quiet``)."""
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif not quiet(args):
        print(render(report))


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def note(args: argparse.Namespace, text: str) -> None:
    """A line for a person on stderr (a warning, where files were kept), unless ``--quiet``."""
    if not quiet(args):
        print(f"mappedram: {text}", file=sys.stderr)

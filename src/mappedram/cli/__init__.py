"""Command line: ``mappedram COMMAND``. It parses, calls an operation, and renders its report.

* :mod:`.files`: info, verify, extract, export, save, restore, rewrite, convert, diff;
* :mod:`.vm`: demo and vm run|save|restore (the built-in guest);
* :mod:`.render`: the reports as text; :mod:`.args`: the shared options, defined once.

The CLI imports the operations (:mod:`mappedram.ops`, :mod:`mappedram.vm.ops`) and the
errors only. A :class:`~mappedram.errors.MappedRamError` becomes ``mappedram: FILE: ...``
on stderr (with ``--output json`` also its fields on stdout) and the error's exit code
(``--traceback`` shows the stack instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

# numpy's BLAS is never used here; its threads would spin on the CPUs the page I/O needs.
# Set before numpy is first imported (commands import it when they run).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from mappedram import __version__
from mappedram.errors import MappedRamError

from . import files, vm
from .args import parse_size, parse_target

__all__ = ["main", "build_parser", "parse_size", "parse_target"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mappedram",
        description="QEMU migration files (mapped-ram and legacy): inspect, verify, extract, export, convert;"
        " save and restore RAM, also live (the built-in guest: demo, vm).",
    )
    parser.add_argument("--version", action="version", version=f"mappedram {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    files.add_commands(sub)
    vm.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--qemu" in argv:
        # `serve ... --qemu -- QEMU-ARGS`: argparse would take the "--" for its own end of options
        at = argv.index("--qemu")
        if argv[at + 1 : at + 2] == ["--"]:
            del argv[at + 1]
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
        return code
    except MappedRamError as exc:
        if args.traceback:
            raise
        if getattr(args, "output", None) == "json":
            print(json.dumps(exc.to_dict(), indent=2, default=str))
        print(f"mappedram: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, as a Unix tool should.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("mappedram: interrupted", file=sys.stderr)
        return 130

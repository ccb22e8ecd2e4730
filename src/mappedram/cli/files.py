"""The file commands: info, verify, seal, extract, export, save, restore, rewrite, convert, diff."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from mappedram import ops
from mappedram.errors import UsageError

from . import render
from .args import (
    add_channels,
    add_engine,
    add_output,
    add_quiet,
    add_seal_reader,
    add_seal_writer,
    emit,
    engine_options,
    note,
    parse_size,
    parse_target,
    progress_bar,
    quiet,
    seal_reader_options,
    seal_writer_options,
    show_progress,
)

__all__ = ["add_commands"]


def _compression(args: argparse.Namespace) -> ops.CompressOptions:
    given = {"level": args.level, "frame_bytes": args.frame_size}
    return ops.CompressOptions(**{k: v for k, v in given.items() if v is not None})


def cmd_info(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    with progress_bar(show_progress(args), "info") as (update, start):
        report = ops.info(path, offset, options=engine_options(args, update, start))
    emit(args, report, render.render_info)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    if args.key is not None and not args.data:
        raise UsageError("--key checks the seal's digests: give --data too")
    seal = ops.SealOptions(key=None if args.key is None else ops.load_key(args.key))
    with progress_bar(show_progress(args), "verify") as (update, start):
        report = ops.verify(path, offset, data=args.data, seal=seal, options=engine_options(args, update, start))
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        if not quiet(args):
            print(render.render_verify(report))
    else:
        print(f"mappedram: {render.render_verify(report)}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_seal(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    key = None if args.key is None else ops.load_key(args.key)
    with progress_bar(show_progress(args), "seal") as (update, start):
        report = ops.seal_file(path, offset, seal=ops.SealOptions(key=key, algorithm=args.algorithm),
                               options=engine_options(args, update, start))  # fmt: skip
    emit(args, report, render.render_seal)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    with progress_bar(show_progress(args), "extract") as (update, start):
        report = ops.extract(
            path, args.o, block=args.block, all_blocks=args.all, offset=offset,
            options=engine_options(args, update, start), seal=seal_reader_options(args),
        )  # fmt: skip
    emit(args, report, render.render_extract)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    below = None if args.max_ram_below_4g is None else parse_size(args.max_ram_below_4g)
    with progress_bar(show_progress(args), "export") as (update, start):
        report = ops.export(
            path, args.o, format=args.format, offset=offset, max_ram_below_4g=below, qemu_layout=args.qemu_layout,
            options=engine_options(args, update, start), seal=seal_reader_options(args),
        )  # fmt: skip
    for w in report.warnings:
        note(args, f"warning: {w}")
    emit(args, report, render.render_export)
    return 0


def _block_args(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise UsageError(f"--block takes NAME=PATH, got {item!r}")
        out.append((name, path))
    return out


def cmd_save(args: argparse.Namespace) -> int:
    offset = None if args.offset is None else parse_size(args.offset)
    with progress_bar(show_progress(args), "save") as (update, start):
        report = ops.save_files(
            args.o, _block_args(args.block), machine_type=args.machine, offset=offset,
            options=engine_options(args, update, start), seal=seal_writer_options(args),
        )  # fmt: skip
    emit(args, report, render.render_save)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    with progress_bar(show_progress(args), "restore") as (update, start):
        report = ops.restore_files(
            path, _block_args(args.block), offset=offset, zero_absent=args.zero,
            options=engine_options(args, update, start), seal=seal_reader_options(args),
        )  # fmt: skip
    emit(args, report, render.render_restore)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    with progress_bar(show_progress(args), "convert") as (update, start):
        report = ops.convert(
            path, args.out, to=args.to, source_offset=offset, options=engine_options(args, update, start),
            seal=seal_writer_options(args),
        )  # fmt: skip
    emit(args, report, render.render_save)
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    with progress_bar(show_progress(args), "rewrite") as (update, start):
        report = ops.rewrite(path, args.out, source_offset=offset, options=engine_options(args, update, start),
                             seal=seal_writer_options(args))  # fmt: skip
    emit(args, report, render.render_save)
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    with progress_bar(show_progress(args), "flatten") as (update, start):
        report = ops.flatten(args.child, args.out, options=engine_options(args, update, start),
                             seal=seal_writer_options(args))  # fmt: skip
    emit(args, report, render.render_save)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    if args.threads < 0:
        raise UsageError(f"--threads must be at least 1 (or 0: one per CPU), got {args.threads}")
    threads = args.threads or len(os.sched_getaffinity(0))
    with progress_bar(show_progress(args), "compress") as (update, start):
        report = ops.compress(path, args.out, source_offset=offset,
                              compression=_compression(args),
                              options=engine_options(args, update, start, channels=threads),
                              seal=seal_writer_options(args))  # fmt: skip
    emit(args, report, render.render_compress)
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    with progress_bar(show_progress(args), "decompress") as (update, start):
        report = ops.decompress(path, args.out, source_offset=offset, options=engine_options(args, update, start),
                                seal=seal_writer_options(args))  # fmt: skip
    emit(args, report, render.render_save)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    a, offset_a = parse_target(args.a, args.offset_a)
    b, offset_b = parse_target(args.b, args.offset_b)
    with progress_bar(show_progress(args), "diff") as (update, start):
        report = ops.diff(a, b, offset_a=offset_a, offset_b=offset_b, options=engine_options(args, update, start),
                          write_child=args.write_child, seal=seal_writer_options(args))  # fmt: skip
    emit(args, report, render.render_diff)
    if args.write_child is not None:
        return 0
    return 0 if report.identical else 1


def cmd_serve(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    qemu_args = list(args.qemu or [])
    if qemu_args and qemu_args[0] == "--":
        qemu_args = qemu_args[1:]
    if (args.qemu is not None) == bool(args.to):
        raise UsageError("serve needs exactly one of --to ADDRESS (a QEMU listening there) or --qemu QEMU-ARGS...")
    if args.qemu is not None and args.qmp:
        raise UsageError("--qmp is for a destination started elsewhere; with --qemu serve has its own")
    if args.qemu is not None and (args.tls_creds or args.tls_hostname):
        raise UsageError("--tls-creds and --tls-hostname are for a destination started elsewhere (--to); "
                         "with --qemu the stream goes over serve's own private unix socket")  # fmt: skip
    options = ops.ServeOptions(
        postcopy=args.postcopy, postcopy_preempt=args.postcopy_preempt, timeout=args.timeout,
        insecure=args.insecure, qmp=args.qmp, connect_retry=args.timeout, tls_creds=args.tls_creds,
        tls_hostname=args.tls_hostname, seal=seal_reader_options(args),
    )  # fmt: skip
    with progress_bar(show_progress(args), "serve") as (update, start):
        engine = engine_options(args, update, start)
        if args.qemu is not None:
            report = ops.serve_qemu(path, qemu_args, offset=offset, options=options, engine=engine)
        else:
            report = ops.serve(path, args.to, offset=offset, options=options, engine=engine)
    emit(args, report, render.render_serve)
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    """Add the file commands to the CLI's subcommands."""

    def source(p: argparse.ArgumentParser, name: str = "file", metavar: str = "FILE") -> None:
        p.add_argument(name, metavar=metavar, help="migration file, or QEMU's file:PATH[,offset=N]")
        p.add_argument("--offset", metavar="N", help=f"where the stream starts in {metavar} (e.g. 4096, 0x1000, 1M)")

    p = sub.add_parser("info", help="describe a migration file")
    source(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check a migration file's structure (--data: its seal's digests too); "
                                      "exit 1 at the first problem")  # fmt: skip
    source(p)
    p.add_argument("--data", action="store_true",
                   help="check every digest of the file's seal against its data (exit 1 on a mismatch, and for a "
                        "file that is not sealed or whose keyed seal cannot be checked without --key)")  # fmt: skip
    p.add_argument("--key", metavar="KEYFILE", help="with --data: the key of a keyed seal (a regular file of "
                                                    "your own, mode 0600)")  # fmt: skip
    add_channels(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("seal", help="seal a file in place: digests of its RAM and state, in its trailer")
    source(p)
    p.add_argument("--key", metavar="KEYFILE", help="a keyed seal (authenticity): KEYFILE is a regular file of "
                                                    "your own, mode 0600, of 16 bytes or more")  # fmt: skip
    p.add_argument("--algorithm", choices=ops.SEAL_ALGORITHMS, default=ops.SEAL_ALGORITHMS[0],
                   help="the digest (default blake3)")  # fmt: skip
    add_channels(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("extract", help="write RAM blocks as raw images (sparse where pages are zero)")
    source(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", metavar="NAME", help="the block's idstr, e.g. pc.ram")
    which.add_argument("--all", action="store_true", help="every block, into the directory -o")
    p.add_argument("-o", metavar="OUT", required=True, help="output file (--block) or directory (--all)")
    add_engine(p, direct_io=False)
    add_seal_reader(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export", help="write guest-physical memory as an ELF core (as dump-guest-memory) or raw image")
    source(p)
    p.add_argument("--format", choices=ops.EXPORT_FORMATS, default="elf", help="ELF core, or flat raw image")
    p.add_argument("-o", metavar="OUT", required=True, help="the file to write (sparse)")
    p.add_argument(
        "--max-ram-below-4g",
        metavar="SIZE",
        help="the guest's max-ram-below-4g machine property, when it was set (not in the file)",
    )
    p.add_argument(
        "--qemu-layout",
        action="store_true",
        help="ELF: page data right after the notes, as dump-guest-memory (default: page-aligned)",
    )
    add_engine(p, direct_io=False)
    add_seal_reader(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("save", help="save raw RAM images as a mapped-ram file QEMU can load")
    p.add_argument(
        "--block",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a RAM block (QEMU's idstr, e.g. pc.ram) and its raw image; repeat, largest first",
    )
    p.add_argument("-o", metavar="OUT", required=True, help="the migration file to write")
    p.add_argument("--machine", default=ops.DEFAULT_MACHINE, help="machine type QEMU will load it into")
    p.add_argument("--offset", metavar="N", help="write in place into OUT at offset N (as file:OUT,offset=N)")
    add_engine(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="read RAM blocks of a migration file into raw images")
    source(p)
    p.add_argument(
        "--block",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a block of the file and the raw image to fill (created when missing); repeat",
    )
    p.add_argument("--zero", action="store_true", help="zero the pages the file marks absent (destination not fresh)")
    add_engine(p)
    add_seal_reader(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("rewrite", help="re-lay a QEMU file (mapped-ram or legacy) as mapped-ram, device state kept")
    source(p, "input", "IN")
    p.add_argument("out", metavar="OUT", help="the mapped-ram file to write")
    add_engine(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("compress", help="compress a file with random access kept: zstd frames and a seek table")
    source(p, "input", "IN")
    p.add_argument("out", metavar="OUT", help="the compressed file to write (QEMU does not load it)")
    p.add_argument("--level", type=int, default=None, help="zstd level (default 3; 1..19)")
    p.add_argument("--threads", type=int, default=0, help="compression threads (default: one per CPU)")
    p.add_argument("--frame-size", type=parse_size, default=None,
                   help="RAM per zstd frame, a power of two (default 2M): what a random read decompresses")  # fmt: skip
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", help="a compressed file back as a mapped-ram file QEMU loads")
    source(p, "input", "IN")
    p.add_argument("out", metavar="OUT", help="the mapped-ram file to write")
    add_engine(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("convert", help="convert between mapped-ram and the legacy format, device state kept")
    source(p, "input", "IN")
    p.add_argument("out", metavar="OUT", help="the file to write")
    p.add_argument("--to", choices=ops.CONVERT_FORMATS, required=True, help="format of OUT")
    add_engine(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "serve",
        help="be the migration source of a QEMU destination (-incoming), precopy or postcopy",
        description="Send FILE to a QEMU started with -incoming defer and `migrate-incoming unix:PATH` (or tcp:), "
        "as its migration source; with --postcopy the guest runs at once and its pages follow as it asks. "
        "--qemu starts the destination itself: QEMU's command line follows it, to the end of the line.",
    )
    source(p)
    p.add_argument("--to", metavar="ADDRESS", help="where the destination listens: unix:PATH or tcp:HOST:PORT")
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="start the guest first, send pages as it asks (the destination needs postcopy-ram on)",
    )
    p.add_argument(
        "--postcopy-preempt",
        action="store_true",
        help="with --postcopy: answer page requests on a second connection (the destination needs postcopy-preempt on)",
    )
    p.add_argument("--qmp", metavar="PATH", help="the destination's QMP socket: wait for it to complete; its errors")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="the longest wait at any step (default 60 s)"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a TCP destination on another host without TLS: guest RAM then crosses the network in the clear",
    )
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="TLS, as QEMU's TLS migration (the destination has tls-creds-x509 and the tls-creds parameter): "
        "DIR as QEMU's client-endpoint creds dir, ca-cert.pem [client-cert.pem client-key.pem (0600)]",
    )
    p.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name the destination's certificate is for (QEMU's tls-hostname; default the tcp: host; "
        "needed over unix:)",
    )
    p.add_argument(
        "--qemu",
        nargs=argparse.REMAINDER,
        metavar="QEMU-ARGS",
        help="start the destination: the rest of the line is its command line (last option; `--` may precede it)",
    )
    add_seal_reader(p)
    add_channels(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("diff", help="pages that differ between two files' RAM blocks; exit 1 if any")
    p.add_argument("a", metavar="A", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("b", metavar="B", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("--offset-a", metavar="N", help="where the stream starts in A")
    p.add_argument("--offset-b", metavar="N", help="where the stream starts in B")
    p.add_argument("--write-child", metavar="OUT",
                   help="write OUT, an incremental snapshot of A holding the pages of B that differ (and B's device "
                        "state): `flatten` makes it a whole file again; exit 0 once written")  # fmt: skip
    add_channels(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("flatten", help="an incremental snapshot and its parents as one whole file QEMU loads")
    p.add_argument("child", metavar="CHILD", help="a child file (written by diff --write-child or vm save --parent)")
    p.add_argument("out", metavar="OUT", help="the mapped-ram file to write")
    add_engine(p)
    add_seal_writer(p)
    add_output(p)
    add_quiet(p)
    p.set_defaults(func=cmd_flatten)

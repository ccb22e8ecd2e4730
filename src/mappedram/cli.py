"""Command line: ``mappedram info|verify|extract|export|save|restore|rewrite|convert|diff``. Renders reports only."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mappedram import __version__, forensics, ops, snapshot
from mappedram.errors import MappedRamError, UsageError

__all__ = ["main", "parse_size", "parse_target"]

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


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _hex(n: int | None) -> str:
    return "-" if n is None else f"{n:#x}"


# -- rendering -------------------------------------------------------------------------


def _render_libvirt(lv: ops.LibvirtInfo) -> list[str]:
    memory = "-"
    if lv.memory_value is not None:
        memory = f"{lv.memory_value} {lv.memory_unit}"
        if lv.memory_bytes is not None:
            memory += f" ({_human(lv.memory_bytes)})"
    cookie = "none"
    if lv.cookie_length is not None:
        cookie = f"{lv.cookie_length} bytes at {lv.xml_offset + lv.cookie_offset:#x}"
    return [
        f"libvirt save image: {lv.magic} version {lv.version} ({lv.byteorder}-endian), format {lv.format} "
        f"({lv.format_id}), was_running {'yes' if lv.was_running else 'no'}",
        f"  domain XML: {lv.xml_length} bytes at {lv.xml_offset:#x}; cookie: {cookie}; data_len {lv.data_len}",
        f"  domain: {lv.name or '-'} (uuid {lv.uuid or '-'}, type {lv.domain_type or '-'}), memory {memory}, "
        f"machine {lv.machine or '-'}, arch {lv.arch or '-'}",
        f"  QEMU stream at {lv.stream_offset:#x}",
    ]


def render_info(r: ops.InfoReport) -> str:
    lines = [
        f"file: {r.path}",
        *([] if r.libvirt is None else _render_libvirt(r.libvirt)),
        f"format: {r.format}",
        f"machine type: {r.machine_type or '(no configuration section)'}",
        f"capabilities: {', '.join(r.capabilities) or '(none)'}",
        f"file size: {_human(r.file_size)} ({r.file_size} bytes); on disk {_human(r.allocated_bytes)}",
        f"stream offset: {r.offset:#x}",
        f"page size: {r.page_size}",
        f"RAM section: id {r.ram_section_id}, MEM_SIZE {_human(r.mem_size)} ({r.mem_size} bytes), "
        f"{r.part_sections} PART section(s), SWITCHOVER_START {'yes' if r.switchover_start else 'no'}",
        "RAM blocks:",
    ]
    name_w = max([len(b.idstr) for b in r.blocks] + [5])
    if r.format == "mapped-ram":
        lines.append(
            f"  {'idstr':<{name_w}}  {'size':>10}  {'present':>9}  {'zero':>9}  "
            f"{'bitmap_offset':>13}  {'pages_offset':>12}"
        )
        for b in r.blocks:
            lines.append(
                f"  {b.idstr:<{name_w}}  {_human(b.used_length):>10}  {b.pages_present:>9}  {b.pages_zero:>9}  "
                f"{_hex(b.bitmap_offset):>13}  {_hex(b.pages_offset):>12}"
            )
    else:
        lines.append(f"  {'idstr':<{name_w}}  {'size':>10}  {'present':>9}  {'zero':>9}  {'records':>9}")
        for b in r.blocks:
            lines.append(
                f"  {b.idstr:<{name_w}}  {_human(b.used_length):>10}  {b.pages_present:>9}  {b.pages_zero:>9}  "
                f"{b.page_records or 0:>9}"
            )
    dev = f"device state: offset {r.device_state_offset:#x}, {r.device_state_length} bytes"
    if r.devices is not None:
        dev += f", {len(r.devices)} sections"
    lines.append(dev)
    for d in r.devices or []:
        lines.append(
            f"  {d.idstr} (instance {d.instance_id}, section {d.section_id}, version {d.version_id}): "
            f"{d.length} bytes at {d.offset:#x}"
        )
    if r.vmdesc_offset is not None:
        lines.append(f"vmdesc: offset {r.vmdesc_offset:#x}, {r.vmdesc_length} bytes of JSON")
    else:
        lines.append("vmdesc: none")
    return "\n".join(lines)


def render_verify(r: ops.VerifyReport) -> str:
    if r.ok:
        lines = [f"{r.path}: OK ({r.format})"]
        lines += [f"  checked: {c}" for c in r.checks]
        lines += [f"  note: {n}" for n in r.notes]
        lines.append("  not checkable: page contents (the format has no checksums)")
        return "\n".join(lines)
    return f"{r.error_text}"


def render_extract(r: ops.ExtractReport) -> str:
    lines = [
        f"{b.idstr}: {b.path} ({_human(b.used_length)}, {b.pages_written} pages written, rest are holes)"
        for b in r.blocks
    ]
    lines.append(f"{_human(r.bytes_read_logical)} in {r.seconds:.2f} s ({r.gbps:.2f} GB/s, {r.channels} channels)")
    return "\n".join(lines)


def render_export(r: forensics.ExportReport) -> str:
    what = "ELF core" if r.format == "elf" else "raw guest-physical image"
    machine = f"{r.machine_type or '(no machine type)'} ({r.machine_family})"
    lines = [
        f"{r.output}: {what} of {r.source}, {machine}, {_human(r.ram_size)} of RAM in {r.ram_block!r} "
        f"({_human(r.below_4g_mem_size)} below 4 GiB, {_human(r.above_4g_mem_size)} above)",
    ]
    if r.format == "elf":
        lines.append(
            f"  {r.e_machine}, notes of {r.cpus} CPU(s), {len(r.segments)} PT_LOAD segment(s), {r.layout} data"
        )
    for s in r.segments:
        lines.append(
            f"  {s.paddr:#014x}-{s.paddr + s.size - 1:#014x}  {_human(s.size):>10}  {s.block}+{s.block_offset:#x}"
            f"  at file offset {s.file_offset:#x}"
        )
    lines.append(
        f"file size {_human(r.file_size)}, {_human(r.bytes_written)} written (the rest are holes); "
        f"{r.seconds:.2f} s ({r.gbps:.2f} GB/s, {r.channels} channels)"
    )
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_save(r: snapshot.SaveReport) -> str:
    lines = [
        f"{r.path}: {r.format}, {_human(r.ram_bytes)} of RAM ({r.machine_type}), {r.pages_written} pages written, "
        + (f"{r.pages_zero} zero pages left as holes" if r.format == "mapped-ram" else f"{r.pages_zero} ZERO records"),
        f"file size {_human(r.file_size)}; {r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'}",
        f"{r.total_seconds:.2f} s ({r.gbps:.2f} GB/s): " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_restore(r: snapshot.RestoreReport) -> str:
    lines = [
        f"{r.path}: restored {', '.join(r.blocks)} ({_human(r.ram_bytes)}), {r.pages_read} pages read, "
        f"{r.pages_absent} zero pages {'zeroed' if r.zero_absent else 'left untouched'}",
        f"{r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'}; {r.total_seconds:.2f} s "
        f"({r.gbps:.2f} GB/s): " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
    ]
    if r.skipped_blocks:
        lines.append(f"not restored (no destination given): {', '.join(r.skipped_blocks)}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_diff(r: ops.DiffReport, limit: int = 20) -> str:
    lines = [f"{r.a} vs {r.b}: {'identical RAM' if r.identical else 'RAM differs'} ({r.seconds:.2f} s)"]
    for d in r.blocks:
        size = "" if d.size_a == d.size_b else f" (sizes differ: {d.size_a} vs {d.size_b})"
        lines.append(f"  {d.idstr}: {d.pages_differ} of {max(d.size_a, d.size_b) // 4096} pages differ{size}")
        for first, count in d.ranges[:limit]:
            lines.append(f"    pages {first}..{first + count - 1} ({count})")
        if len(d.ranges) > limit:
            lines.append(f"    ... {len(d.ranges) - limit} more ranges (--output json lists all)")
    for name in r.only_in_a:
        lines.append(f"  {name}: only in {r.a}")
    for name in r.only_in_b:
        lines.append(f"  {name}: only in {r.b}")
    return "\n".join(lines)


# -- progress --------------------------------------------------------------------------


@contextmanager
def _progress(enabled: bool, label: str) -> Iterator[tuple[Callable[[int], None] | None, ...]]:
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


# -- commands --------------------------------------------------------------------------


def _emit(args: argparse.Namespace, report: Any, render: Callable[[Any], str]) -> None:
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))


def cmd_info(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    _emit(args, ops.info(path, offset), render_info)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    report = ops.verify(path, offset)
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        print(render_verify(report))
    else:
        print(f"mappedram: {render_verify(report)}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_extract(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    show = args.output != "json" and sys.stderr.isatty() and not args.quiet
    with _progress(show, "extract") as (update, start):
        report = ops.extract(
            path,
            args.o,
            block=args.block,
            all_blocks=args.all,
            offset=offset,
            channels=args.channels,
            progress=update,
            on_start=start,
        )
    _emit(args, report, render_extract)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    below = None if args.max_ram_below_4g is None else parse_size(args.max_ram_below_4g)
    show = args.output != "json" and sys.stderr.isatty() and not args.quiet
    with _progress(show, "export") as (update, start):
        report = forensics.export(
            path,
            args.o,
            format=args.format,
            offset=offset,
            channels=args.channels,
            max_ram_below_4g=below,
            qemu_layout=args.qemu_layout,
            progress=update,
            on_start=start,
        )
    for w in report.warnings:
        print(f"mappedram: warning: {w}", file=sys.stderr)
    _emit(args, report, render_export)
    return 0


def _block_args(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise UsageError(f"--block takes NAME=PATH, got {item!r}")
        out.append((name, path))
    return out


def _run_engine(args: argparse.Namespace, label: str, operation: Callable[..., Any], *pos: Any, **kw: Any) -> Any:
    """Run a save-like operation with the shared engine options and a progress bar on a terminal."""
    show = args.output != "json" and sys.stderr.isatty() and not args.quiet
    with _progress(show, label) as (update, start):
        return operation(
            *pos,
            channels=args.channels,
            direct_io=args.direct_io,
            direct_io_fallback=args.direct_io_fallback,
            progress=update,
            on_start=start,
            **kw,
        )


def cmd_save(args: argparse.Namespace) -> int:
    offset = None if args.offset is None else parse_size(args.offset)
    report = _run_engine(
        args, "save", snapshot.save_files, args.o, _block_args(args.block), machine_type=args.machine, offset=offset
    )
    _emit(args, report, render_save)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.file, args.offset)
    report = _run_engine(
        args, "restore", snapshot.restore_files, path, _block_args(args.block), offset=offset, zero_absent=args.zero
    )
    _emit(args, report, render_restore)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    report = _run_engine(args, "convert", snapshot.convert, path, args.out, to=args.to, source_offset=offset)
    _emit(args, report, render_save)
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    path, offset = parse_target(args.input, args.offset)
    report = _run_engine(args, "rewrite", snapshot.rewrite, path, args.out, source_offset=offset)
    _emit(args, report, render_save)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    a, offset_a = parse_target(args.a, args.offset_a)
    b, offset_b = parse_target(args.b, args.offset_b)
    report = ops.diff(a, b, offset_a=offset_a, offset_b=offset_b, channels=args.channels)
    _emit(args, report, render_diff)
    return 0 if report.identical else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mappedram",
        description="QEMU migration files (mapped-ram and legacy): inspect, verify, extract, export, convert;"
        " save and restore RAM, also live (the built-in guest: demo, vm).",
    )
    parser.add_argument("--version", action="version", version=f"mappedram {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help="migration file, or QEMU's file:PATH[,offset=N]")
        p.add_argument("--offset", metavar="N", help="where the stream starts in FILE (e.g. 4096, 0x1000, 1M)")
        p.add_argument("--output", choices=("human", "json"), default="human", help="output format")

    p = sub.add_parser("info", help="describe a migration file")
    common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check a migration file's structure; exit 1 at the first problem")
    common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("extract", help="write RAM blocks as raw images (sparse where pages are zero)")
    common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", metavar="NAME", help="the block's idstr, e.g. pc.ram")
    which.add_argument("--all", action="store_true", help="every block, into the directory -o")
    p.add_argument("-o", metavar="OUT", required=True, help="output file (--block) or directory (--all)")
    p.add_argument("--channels", type=int, default=min(4, os.cpu_count() or 1), help="parallel readers")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export", help="write guest-physical memory as an ELF core (as dump-guest-memory) or raw image")
    common(p)
    p.add_argument("--format", choices=forensics.EXPORT_FORMATS, default="elf", help="ELF core, or flat raw image")
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
    p.add_argument("--channels", type=int, default=min(4, os.cpu_count() or 1), help="parallel readers")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    def engine_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--channels", type=int, default=4, help="parallel channels (threads with their own fds)")
        p.add_argument("--direct-io", action="store_true", help="page I/O with O_DIRECT, bypassing the page cache")
        p.add_argument(
            "--direct-io-fallback",
            action="store_true",
            help="with --direct-io: use the page cache where the filesystem refuses O_DIRECT",
        )
        p.add_argument("--output", choices=("human", "json"), default="human", help="output format")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("save", help="save raw RAM images as a mapped-ram file QEMU can load")
    p.add_argument(
        "--block",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a RAM block (QEMU's idstr, e.g. pc.ram) and its raw image; repeat, largest first",
    )
    p.add_argument("-o", metavar="OUT", required=True, help="the migration file to write")
    p.add_argument("--machine", default=snapshot.DEFAULT_MACHINE, help="machine type QEMU will load it into")
    p.add_argument("--offset", metavar="N", help="write in place into OUT at offset N (as file:OUT,offset=N)")
    engine_opts(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="read RAM blocks of a migration file into raw images")
    p.add_argument("file", metavar="FILE", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument(
        "--block",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a block of the file and the raw image to fill (created when missing); repeat",
    )
    p.add_argument("--offset", metavar="N", help="where the stream starts in FILE")
    p.add_argument("--zero", action="store_true", help="zero the pages the file marks absent (destination not fresh)")
    engine_opts(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("rewrite", help="re-lay a QEMU file (mapped-ram or legacy) as mapped-ram, device state kept")
    p.add_argument("input", metavar="IN", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("out", metavar="OUT", help="the mapped-ram file to write")
    p.add_argument("--offset", metavar="N", help="where the stream starts in IN")
    engine_opts(p)
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("convert", help="convert between mapped-ram and the legacy format, device state kept")
    p.add_argument("input", metavar="IN", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("out", metavar="OUT", help="the file to write")
    p.add_argument("--to", choices=("mapped-ram", "legacy"), required=True, help="format of OUT")
    p.add_argument("--offset", metavar="N", help="where the stream starts in IN")
    engine_opts(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("diff", help="pages that differ between two files' RAM blocks; exit 1 if any")
    p.add_argument("a", metavar="A", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("b", metavar="B", help="migration file, or QEMU's file:PATH[,offset=N]")
    p.add_argument("--offset-a", metavar="N", help="where the stream starts in A")
    p.add_argument("--offset-b", metavar="N", help="where the stream starts in B")
    p.add_argument("--channels", type=int, default=2, help="parallel readers")
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format")
    p.set_defaults(func=cmd_diff)

    from mappedram.cli_vm import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
        print(f"mappedram: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, as a Unix tool should.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("mappedram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The CLI of the built-in guest: ``mappedram demo`` and ``mappedram vm run|save|restore``.

Rendering only: the operations are :mod:`mappedram.vmops`; this module turns their
reports into text (or JSON) and shows progress on a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mappedram import vmops
from mappedram.live import FORMATS, LiveSaveReport, PassStats

__all__ = ["add_commands", "render_live", "render_demo", "DEMO_BANDWIDTH"]

#: The demo's bandwidth limit (MB/s). Unlimited, a save here writes about 1.5 GB/s while the
#: KVM guest dirties under 200 MB/s (each first write after a dirty-log read faults): one
#: pass would do. At this limit the dirtying is heavy against the save, as it is against
#: QEMU's default max-bandwidth (128 MiB/s), and the passes, and the legacy stream, show it.
DEMO_BANDWIDTH = 256.0


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x else "-"


def render_passes(passes: list[PassStats]) -> list[str]:
    lines = ["  pass  pages sent     written        zero     written (MB)  seconds  dirtied/s (pages)"]
    for p in passes:
        mark = "*" if p.stopped else " "
        lines.append(
            f"  {p.index:>3}{mark} {p.pages_sent:>11,} {p.pages_written:>11,} {p.pages_zero:>11,}"
            f" {p.bytes_written / 1e6:>14,.1f} {p.seconds:>8.2f}  {_rate(p.dirty_rate):>17}"
        )
    lines.append("  (* with the guest stopped)")
    return lines


def render_live(r: LiveSaveReport, title: str = "live save") -> str:
    live = sum(1 for p in r.passes if not p.stopped)
    stop = "converged" if r.stop_reason == "converged" else f"stopped iterating at the pass limit ({live} live)"
    if r.bandwidth_limit:
        stop += f"; bandwidth limit {r.bandwidth_limit / 1e6:g} MB/s"
    lines = [
        f"{title}, {r.format}: {r.path}; {len(r.passes)} passes, {stop}",
        *render_passes(r.passes),
        f"  file {_mb(r.file_size)} = {r.growth:.3f}x the RAM ({_mb(r.ram_bytes)})"
        + (", exactly the planned layout" if r.planned_size == r.file_size else "")
        + f"; on disk {_mb(r.allocated_bytes)} ({r.allocated_bytes / r.ram_bytes:.3f}x)",
        f"  downtime {r.downtime:.3f} s (limit {r.downtime_limit:g} s); last live pass {r.bandwidth / 1e9:.2f} GB/s;"
        f" {r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'}; {r.total_seconds:.2f} s in all",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _check_line(check: dict[str, Any]) -> str:
    ram = check["ram"]
    verdict = "OK" if check["ok"] else "FAILED"
    checksum = "matches" if check["checksum"] == check["expected_checksum"] else "DIFFERS"
    text = (
        f"{verdict}: counter {check['counter']:,}, checksum {checksum},"
        f" {ram['pages_checked']:,} data pages ({ram['mismatches']} wrong)"
    )
    bad = [name for name, good in check["registers"].items() if not good]
    if bad:
        text += "; registers wrong: " + ", ".join(bad)
    if ram.get("first_bad"):
        text += f"; first bad page {ram['first_bad']}"
    return text


def render_restore(r: vmops.VmRestoreReport) -> str:
    lines = [
        f"restored {r.path} into a fresh {r.guest} guest ({r.mem_mib} MiB): {r.restore.pages_read:,} pages in"
        f" {r.restore.total_seconds:.2f} s ({r.restore.gbps:.2f} GB/s)",
        f"  at the restore point: {_check_line(r.at_restore)}",
    ]
    if r.after is not None:
        lines.append(
            f"  resumed {r.ran_seconds:.2f} s: counter {r.counter:,} -> {r.counter_after:,}; {_check_line(r.after)}"
        )
    return "\n".join(lines)


def render_run(r: vmops.VmRunReport) -> str:
    lines = [
        f"{r.guest} guest, {r.mem_mib} MiB: fill {r.fill_seconds:.2f} s; ran {r.seconds:.2f} s,"
        f" {r.counter:,} iterations ({r.iterations_per_second:,.0f}/s)",
        f"  {_check_line(r.check)}",
    ]
    if r.note:
        lines.insert(0, f"note: {r.note}")
    return "\n".join(lines)


def render_save(r: vmops.VmSaveReport) -> str:
    lines = [f"note: {r.note}"] if r.note else []
    lines.append(
        f"{r.guest} guest, {r.mem_mib} MiB: fill {r.fill_seconds:.2f} s, ran {r.warmup_seconds:g} s, stopped at"
        f" iteration {r.counter:,}"
    )
    lines.append(render_live(r.save))
    if r.source_check is not None:
        lines.append(f"  the paused source: {_check_line(r.source_check)}")
    return "\n".join(lines)


def render_demo(r: vmops.DemoReport) -> str:
    lines = [f"note: {r.note}"] if r.note else []
    lines.append(
        f"mappedram demo: a {r.mem_mib} MiB {r.guest} guest rewriting its RAM (fill {r.fill_seconds:.2f} s,"
        f" ran {r.warmup_seconds:g} s before the save)"
    )
    lines.append(render_live(r.mapped_ram))
    lines.append(render_live(r.legacy, "the same workload saved live as a legacy stream"))
    m, g = r.mapped_ram, r.legacy
    lines.append(
        f"file size vs RAM, {len(m.passes)} passes each: mapped-ram {m.growth:.3f}x"
        f" ({m.allocated_bytes / m.ram_bytes:.3f}x on disk), legacy {g.growth:.3f}x"
        f" ({g.allocated_bytes / g.ram_bytes:.3f}x on disk)"
    )
    lines.append(render_restore(r.restore))
    for name, good in r.source_match.items():
        lines.append(f"  {name}: {'yes' if good else 'NO'}")
    lines.append("demo OK" if r.ok else "demo FAILED")
    return "\n".join(lines)


@contextmanager
def _live_progress(enabled: bool) -> Iterator[tuple[Callable[[int], None] | None, Callable[[PassStats], None] | None]]:
    """A tqdm bar of RAM bytes sent (no total: passes keep coming) and a line per pass."""
    if not enabled:
        yield None, None
        return
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="live save", leave=False)

    def on_pass(p: PassStats) -> None:
        what = "guest stopped" if p.stopped else "live"
        bar.write(f"  pass {p.index} ({what}): {p.pages_sent:,} pages, {p.seconds:.2f} s")

    try:
        yield bar.update, on_pass
    finally:
        bar.close()


def _show(args: argparse.Namespace) -> bool:
    return args.output != "json" and sys.stderr.isatty() and not args.quiet


def _emit(args: argparse.Namespace, report: Any, render: Callable[[Any], str]) -> None:
    print(json.dumps(report.to_dict(), indent=2) if args.output == "json" else render(report))


def _guest_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"seed": args.seed, "fill_fraction": args.fill, "rate": args.rate, "batch": args.batch}


def _live_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "channels": args.channels,
        "max_passes": args.max_passes,
        "downtime_limit": args.downtime_limit,
        "bandwidth_limit": args.bandwidth_limit * 1e6 if args.bandwidth_limit else None,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = args.dir or tempfile.mkdtemp(prefix=".mappedram-demo-", dir=os.getcwd())
    os.makedirs(workdir, exist_ok=True)
    show = _show(args)
    try:
        with _live_progress(show) as (update, on_pass):
            report = vmops.demo(
                workdir,
                mem_mib=args.mem,
                guest=args.guest,
                warmup=args.warmup,
                run=args.run,
                direct_io=not args.no_direct_io,
                guest_params=_guest_params(args),
                on_phase=(lambda text: print(f"== {text}", file=sys.stderr)) if show else None,
                on_pass=on_pass,
                progress=update,
                **_live_options(args),
            )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    _emit(args, report, render_demo)
    if args.keep or args.dir:
        print(f"files kept in {workdir}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_vm_run(args: argparse.Namespace) -> int:
    report = vmops.vm_run(mem_mib=args.mem, seconds=args.seconds, guest=args.guest, **_guest_params(args))
    _emit(args, report, render_run)
    return 0 if report.ok else 1


def cmd_vm_save(args: argparse.Namespace) -> int:
    with _live_progress(_show(args)) as (update, on_pass):
        report = vmops.vm_save(
            args.out,
            mem_mib=args.mem,
            warmup=args.warmup,
            guest=args.guest,
            format=args.format,
            guest_params=_guest_params(args),
            direct_io=args.direct_io,
            direct_io_fallback=args.direct_io_fallback,
            on_pass=on_pass,
            progress=update,
            **_live_options(args),
        )
    _emit(args, report, render_save)
    return 0 if report.source_check is None or report.source_check["ok"] else 1


def cmd_vm_restore(args: argparse.Namespace) -> int:
    report = vmops.vm_restore(
        args.file,
        run=args.run,
        rate=args.rate,
        channels=args.channels,
        direct_io=args.direct_io,
        direct_io_fallback=args.direct_io_fallback,
    )
    _emit(args, report, render_restore)
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    """Add ``demo`` and ``vm`` to the CLI's subcommands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("human", "json"), default="human", help="output format")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress")

    def guest_opts(p: argparse.ArgumentParser, mem: int) -> None:
        p.add_argument("--mem", type=int, default=mem, metavar="MIB", help=f"guest RAM in MiB (default {mem})")
        p.add_argument("--guest", choices=vmops.GUEST_KINDS, default="auto",
                       help="kvm (the micro-VM on /dev/kvm), software, or auto: kvm where it works")  # fmt: skip
        p.add_argument("--rate", type=float, metavar="N", help="guest page writes per second (default: unlimited)")
        p.add_argument("--fill", type=float, default=0.5, metavar="F", help="share of RAM the guest fills")
        p.add_argument("--seed", type=int, default=1, help="the guest's seed")
        p.add_argument("--batch", type=int, default=4096, help="guest iterations between two exits (pause points)")

    def live_opts(p: argparse.ArgumentParser, bandwidth: float | None = None) -> None:
        p.add_argument("--channels", type=int, default=4, help="parallel page channels")
        p.add_argument("--max-passes", type=int, default=10, metavar="N", help="live passes before stopping the guest")
        p.add_argument("--downtime-limit", type=float, default=0.3, metavar="S",
                       help="stop iterating when the rest fits this many seconds (default 0.3)")  # fmt: skip
        p.add_argument(
            "--bandwidth-limit",
            type=float,
            default=bandwidth,
            metavar="MB_S",
            help="cap on the bytes written per second, in MB/s; 0: none"
            + (f" (default {bandwidth:g}: the guest's dirtying then keeps several passes busy)" if bandwidth else ""),
        )

    p = sub.add_parser("demo", help="run the built-in guest, save it live, restore it into a fresh VM, resume, verify")
    guest_opts(p, 1024)
    live_opts(p, DEMO_BANDWIDTH)
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds the guest runs before the save")
    p.add_argument("--run", type=float, default=1.0, metavar="S", help="seconds the restored guest runs on")
    p.add_argument("--no-direct-io", action="store_true", help="page I/O through the page cache")
    p.add_argument("--dir", help="write the files here and keep them (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    common(p)
    p.set_defaults(func=cmd_demo)

    vm = sub.add_parser("vm", help="the built-in guest: run, save live, restore and resume")
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")

    p = vsub.add_parser("run", help="run the guest, pause it, and check its registers and RAM")
    guest_opts(p, 256)
    p.add_argument("--seconds", type=float, default=2.0, help="how long it runs after its fill")
    common(p)
    p.set_defaults(func=cmd_vm_run)

    p = vsub.add_parser("save", help="start the guest and save it live")
    p.add_argument("out", metavar="OUT", help="the file to write")
    guest_opts(p, 1024)
    live_opts(p)
    p.add_argument("--format", choices=FORMATS, default="mapped-ram", help="file format")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds the guest runs before the save")
    p.add_argument("--direct-io", action="store_true", help="page I/O with O_DIRECT")
    p.add_argument("--direct-io-fallback", action="store_true", help="page cache where O_DIRECT is refused")
    common(p)
    p.set_defaults(func=cmd_vm_save)

    p = vsub.add_parser("restore", help="restore a saved guest into a fresh VM, check it, resume it, check again")
    p.add_argument("file", metavar="FILE", help="a file saved by `vm save` or the demo")
    p.add_argument("--run", type=float, default=1.0, metavar="S", help="seconds it runs on after the restore")
    p.add_argument("--rate", type=float, metavar="N", help="guest page writes per second once resumed")
    p.add_argument("--channels", type=int, default=4, help="parallel page channels")
    p.add_argument("--direct-io", action="store_true", help="page I/O with O_DIRECT")
    p.add_argument("--direct-io-fallback", action="store_true", help="page cache where O_DIRECT is refused")
    common(p)
    p.set_defaults(func=cmd_vm_restore)

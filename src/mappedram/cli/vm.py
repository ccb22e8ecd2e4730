"""The built-in guest's commands: ``mappedram demo`` and ``mappedram vm run|save|restore``.

The operations are :mod:`mappedram.vm.ops`; this module parses their options, shows
progress on a terminal and renders their reports (:mod:`.render`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from mappedram import ops
from mappedram.ops import FORMATS, AutoConverge, DirtyLimit, LiveOptions, PassStats, Progress
from mappedram.vm import config

if TYPE_CHECKING:
    from mappedram.vm import ops as vmops

from . import render
from .args import (
    add_engine,
    add_output,
    add_quiet,
    add_seal_reader,
    add_seal_writer,
    emit,
    engine_options,
    note,
    progress_bar,
    seal_reader_options,
    seal_writer_options,
    show_progress,
)

__all__ = ["add_commands"]


@contextmanager
def _live_progress(enabled: bool) -> Iterator[tuple[Progress | None, Callable[[PassStats], None] | None]]:
    """A tqdm bar of RAM bytes sent (no total: passes keep coming) and a line per pass."""
    if not enabled:
        yield None, None
        return
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="live save", leave=False)

    def on_pass(p: PassStats) -> None:
        what = "guest stopped" if p.stopped else f"live, throttle {p.throttle}%"
        bar.write(f"  pass {p.index} ({what}): {p.pages_sent:,} pages, {p.seconds:.2f} s")

    try:
        yield bar.update, on_pass
    finally:
        bar.close()


def _guest(args: argparse.Namespace) -> vmops.GuestConfig:
    from mappedram.vm import ops as vmops

    return vmops.GuestConfig(
        kind=args.guest, mem_mib=args.mem, seed=args.seed, fill_fraction=args.fill, rate=args.rate, batch=args.batch
    )


def _live(args: argparse.Namespace, on_pass: Callable[[PassStats], None] | None) -> LiveOptions:
    auto = limit = None
    if args.dirty_limit or args.dirty_limit_from_start:
        limit = DirtyLimit(throttle_trigger_threshold=args.throttle_trigger_threshold,
                           vcpu_dirty_limit=args.vcpu_dirty_limit, from_start=args.dirty_limit_from_start)  # fmt: skip
    elif not args.no_auto_converge:
        auto = AutoConverge(
            throttle_trigger_threshold=args.throttle_trigger_threshold,
            cpu_throttle_initial=args.cpu_throttle_initial,
            cpu_throttle_increment=args.cpu_throttle_increment,
            cpu_throttle_tailslow=args.cpu_throttle_tailslow,
            max_cpu_throttle=args.max_cpu_throttle,
        )
    return LiveOptions(
        max_passes=args.max_passes,
        downtime_limit=args.downtime_limit,
        downtime_margin=args.downtime_margin,
        bandwidth_limit=args.bandwidth_limit * 1e6 if args.bandwidth_limit else None,
        auto_converge=auto,
        dirty_limit=limit,
        on_pass=on_pass,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from mappedram.vm import ops as vmops

    workdir = args.dir or tempfile.mkdtemp(prefix=".mappedram-demo-", dir=os.getcwd())
    os.makedirs(workdir, exist_ok=True)
    show = show_progress(args)
    try:
        with _live_progress(show) as (update, on_pass):
            report = vmops.demo(
                workdir,
                _guest(args),
                warmup=args.warmup,
                warmup_iterations=args.warmup_iterations,
                run=args.run,
                run_iterations=args.run_iterations,
                step_batches=args.step_batches,
                live=_live(args, on_pass),
                options=engine_options(args, update, direct_io="off" if args.no_direct_io else "auto"),
                on_phase=(lambda text: print(f"== {text}", file=sys.stderr)) if show else None,
                seal=ops.SealOptions() if args.seal else None,
            )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(args, report, render.render_demo)
    if args.keep or args.dir:
        note(args, f"files kept in {workdir}")
    return 0 if report.ok else 1


def cmd_vm_run(args: argparse.Namespace) -> int:
    from mappedram.vm import ops as vmops

    report = vmops.vm_run(_guest(args), seconds=args.seconds, iterations=args.iterations)
    emit(args, report, render.render_vm_run)
    return 0 if report.ok else 1


def cmd_vm_save(args: argparse.Namespace) -> int:
    from mappedram.vm import ops as vmops

    if args.parent is not None:
        with progress_bar(show_progress(args), "child") as (update, start):
            child = vmops.vm_save_child(args.out, args.parent, warmup=args.warmup,
                                        warmup_iterations=args.warmup_iterations, rate=args.rate,
                                        options=engine_options(args, update, start),
                                        seal=seal_writer_options(args))  # fmt: skip
        emit(args, child, render.render_vm_child)
        return 0 if child.ok else 1
    with _live_progress(show_progress(args)) as (update, on_pass):
        report = vmops.vm_save(
            args.out,
            _guest(args),
            format=args.format,
            warmup=args.warmup,
            warmup_iterations=args.warmup_iterations,
            step_batches=args.step_batches,
            live=_live(args, on_pass),
            options=engine_options(args, update),
            seal=seal_writer_options(args),
        )
    emit(args, report, render.render_vm_save)
    return 0 if report.ok else 1


def cmd_vm_restore(args: argparse.Namespace) -> int:
    from mappedram.vm import ops as vmops

    with progress_bar(show_progress(args), "restore") as (update, start):
        report = vmops.vm_restore(
            args.file, mode=args.mode, run=args.run, run_iterations=args.run_iterations, rate=args.rate,
            lazy_fallback=args.fallback_eager, options=engine_options(args, update, start),
            seal=seal_reader_options(args),
        )  # fmt: skip
    emit(args, report, render.render_vm_restore)
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    """Add ``demo`` and ``vm`` to the CLI's subcommands."""
    defaults = config.VM_LIVE_DEFAULTS
    auto = AutoConverge()
    limit = DirtyLimit()

    def common(p: argparse.ArgumentParser) -> None:
        add_output(p)
        add_quiet(p)

    def rate_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rate", type=float, metavar="N", help="guest page writes per second (default: unlimited)")

    def guest_opts(p: argparse.ArgumentParser, mem: int) -> None:
        p.add_argument("--mem", type=int, default=mem, metavar="MIB", help=f"guest RAM in MiB (default {mem})")
        p.add_argument("--guest", choices=config.GUEST_KINDS, default="auto",
                       help="kvm (the micro-VM on /dev/kvm), software, or auto: kvm where it works")  # fmt: skip
        rate_opt(p)
        p.add_argument("--fill", type=float, default=0.5, metavar="F", help="share of RAM the guest fills")
        p.add_argument("--seed", type=int, default=1, help="the guest's seed")
        p.add_argument("--batch", type=int, default=4096, help="guest iterations between two exits (pause points)")

    def warmup_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds the guest runs before the save")
        p.add_argument("--warmup-iterations", type=int, metavar="N",
                       help="instead: run exactly N loop iterations (a multiple of --batch) first")  # fmt: skip
        p.add_argument("--step-batches", type=int, metavar="N",
                       help="drive the guest step by step: it runs exactly N batches before each dirty sync and "
                            "is paused otherwise (deterministic passes)")  # fmt: skip

    def live_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-passes",
            type=int,
            default=defaults.max_passes,
            metavar="N",
            help=f"live passes at most before the guest is stopped (default {defaults.max_passes})",
        )
        p.add_argument("--downtime-limit", type=float, default=defaults.downtime_limit, metavar="S",
                       help="stop iterating when the rest fits this many seconds"
                            f" (default {defaults.downtime_limit:g})")  # fmt: skip
        p.add_argument("--downtime-margin", type=float, default=defaults.downtime_margin, metavar="F",
                       help="share of the downtime limit the estimated final pass may fill"
                            f" (default {defaults.downtime_margin:g}; 1: QEMU's rule)")  # fmt: skip
        p.add_argument("--bandwidth-limit", type=float, metavar="MB_S",
                       help="cap on the bytes written per second, in MB/s (default: none)")  # fmt: skip
        p.add_argument("--no-auto-converge", action="store_true", help="never throttle the guest")
        p.add_argument("--throttle-trigger-threshold", type=int, default=auto.throttle_trigger_threshold,
                       metavar="PCT", help="throttle when a pass's dirtied bytes exceed PCT%% of its sent bytes, "
                                           f"twice (default {auto.throttle_trigger_threshold})")  # fmt: skip
        p.add_argument("--cpu-throttle-initial", type=int, default=auto.cpu_throttle_initial, metavar="PCT",
                       help=f"the first throttle (default {auto.cpu_throttle_initial}%%)")  # fmt: skip
        p.add_argument("--cpu-throttle-increment", type=int, default=auto.cpu_throttle_increment, metavar="PCT",
                       help=f"added at each further trigger (default {auto.cpu_throttle_increment}%%)")  # fmt: skip
        p.add_argument("--cpu-throttle-tailslow", action="store_true",
                       help="smaller last increments, as QEMU's cpu-throttle-tailslow")  # fmt: skip
        p.add_argument("--max-cpu-throttle", type=int, default=auto.max_cpu_throttle, metavar="PCT",
                       help=f"the throttle never exceeds this (default {auto.max_cpu_throttle}%%)")  # fmt: skip
        p.add_argument("--dirty-limit", action="store_true",
                       help="instead of auto-converge, QEMU's dirty-limit: once the same trigger fires, hold the "
                            "guest's dirty rate to --vcpu-dirty-limit")  # fmt: skip
        p.add_argument("--dirty-limit-from-start", action="store_true",
                       help="dirty-limit held from pass 1 on, as QEMU's set-vcpu-dirty-limit before migrate:"
                            " the guest's dirty rate is measured first (calc-dirty-rate),"
                            " no trigger waited for")  # fmt: skip
        p.add_argument("--vcpu-dirty-limit", type=int, default=limit.vcpu_dirty_limit, metavar="MB_S",
                       help=f"the dirty rate dirty-limit holds the guest to"
                            f" (default {limit.vcpu_dirty_limit} MB/s)")  # fmt: skip

    def run_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", type=float, default=1.0, metavar="S", help="seconds the restored guest runs on")
        p.add_argument("--run-iterations", type=int, metavar="N",
                       help="instead: run exactly N more loop iterations (a multiple of the batch)")  # fmt: skip

    p = sub.add_parser("demo", help="run the built-in guest, save it live, restore it into a fresh VM, resume, verify")
    guest_opts(p, 1024)
    warmup_opts(p)
    live_opts(p)
    run_opts(p)
    add_engine(p, direct_io=False)
    p.add_argument("--no-direct-io", action="store_true", help="page I/O through the page cache")
    p.add_argument("--dir", help="write the files here and keep them (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--seal", action="store_true", help="seal both saves; every restore checks the seal first")
    common(p)
    p.set_defaults(func=cmd_demo)

    vm = sub.add_parser("vm", help="the built-in guest: run, save live, restore and resume")
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")

    p = vsub.add_parser("run", help="run the guest, pause it, and check its registers and RAM")
    guest_opts(p, 256)
    p.add_argument("--seconds", type=float, default=2.0, help="how long it runs after its fill")
    p.add_argument("--iterations", type=int, metavar="N", help="instead: run exactly N loop iterations")
    common(p)
    p.set_defaults(func=cmd_vm_run)

    p = vsub.add_parser("save", help="start the guest and save it live")
    p.add_argument("out", metavar="OUT", help="the file to write")
    guest_opts(p, 1024)
    warmup_opts(p)
    live_opts(p)
    p.add_argument("--format", choices=FORMATS, default="mapped-ram", help="file format")
    p.add_argument("--parent", metavar="FILE",
                   help="an incremental snapshot: restore the guest from FILE, run it for the warm-up, and save "
                        "only the pages it wrote since (a child of FILE; `flatten` makes it a whole file)")  # fmt: skip
    add_engine(p)
    add_seal_writer(p)
    common(p)
    p.set_defaults(func=cmd_vm_save)

    p = vsub.add_parser("restore", help="restore a saved guest into a fresh VM, check it, resume it, check again")
    p.add_argument("file", metavar="FILE", help="a file saved by `vm save` or the demo")
    p.add_argument("--mode", choices=config.RESTORE_MODES, default="eager",
                   help="eager: read all RAM first; map: the RAM is a private mapping of the file, the guest"
                        " runs at once and reads each page on first touch; lazy (KVM guest): the guest runs"
                        " at once, userfaultfd serves each page it touches while prefetch threads fill the rest",
                   )  # fmt: skip
    p.add_argument(
        "--fallback-eager",
        action="store_true",
        help="with --mode lazy: restore eagerly where userfaultfd cannot be used (else that is an error)",
    )
    run_opts(p)
    rate_opt(p)
    add_engine(p)
    add_seal_reader(p)
    common(p)
    p.set_defaults(func=cmd_vm_restore)

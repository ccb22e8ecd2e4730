#!/usr/bin/env python3
"""Benchmark: our save and restore against QEMU 10's, and against fio, on the same disk.

For each density (fraction of NON-zero pages, random per page; each non-zero page holds
random data) a guest RAM image of --size-gib GiB is written to /dev/shm, so RAM is truly
in memory for QEMU and for us. Then, --runs times each, with medians reported:
  * ours: ``mappedram.ops.writer`` (in-process, durable: fsync + rename + dir fsync)
    from an mmap of the /dev/shm RAM file, at 1, 2 and 4 channels, buffered and
    direct-io; then ``restore`` of that file, cold (page cache dropped), into a fresh
    /dev/shm file mapped shared, with the same channels and I/O mode;
  * QEMU: the same RAM file is the guest's ``memory-backend-file`` (the guest is paused);
    save = ``migrate`` until ``query-migrate`` says completed, PLUS fsync of the output
    file and its directory afterwards (QEMU does not fsync, our save does); restore =
    ``migrate-incoming`` until completed, into a fresh destination whose RAM is a new zero
    file in /dev/shm, page cache dropped first. QEMU start-up is not timed. Variants:
    mapped-ram (1 channel), mapped-ram + multifd 4, mapped-ram + multifd 4 + direct-io;
    max-bandwidth lifted;
  * fio: O_DIRECT sequential write, then read, of the non-zero pages' byte count
    (bs=1M, iodepth 16, libaio) on a file in --dir.
Every restore (ours and QEMU's) is checked against the source RAM once per variant and
density (first run). Prints a table and the goal ratios; writes JSON (--json).
Needs root to drop the page cache (it warns and runs warm otherwise).

usage: python bench/saverestore.py [--size-gib 4] [--densities 0.5,0.9] [--runs 3]
                                   [--dir bench-work] [--skip-qemu-direct] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mappedram import ops
from mappedram.ops import EngineOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers
sys.path.insert(0, str(ROOT / "bench"))

from common import PAGE, drop_caches, fio, write_ram  # noqa: E402
from tests.helpers.qemu_harness import BACKEND_ID, QemuVM, file_uri, find_qemu, first_mismatch, qemu_version  # noqa: E402

import mappedram  # noqa: E402

SHM = Path("/dev/shm")
CHANNELS = (1, 2, 4)
#: QEMU variants: (name, capabilities, parameters).
QEMU_VARIANTS: list[tuple[str, dict[str, bool], dict[str, Any]]] = [
    ("mapped-ram", {"mapped-ram": True}, {}),
    ("multifd4", {"mapped-ram": True, "multifd": True}, {"multifd-channels": 4}),
    ("multifd4+dio", {"mapped-ram": True, "multifd": True}, {"multifd-channels": 4, "direct-io": True}),
]
QEMU_DIRECT = "multifd4+dio"
GOALS = {"save_vs_qemu": 2.0, "dio_save_vs_qemu_dio": 20.0, "save_vs_fio_write": 0.8,
         "restore_vs_qemu": 1.5, "restore_vs_fio_read": 0.8}  # fmt: skip


# -- helpers ---------------------------------------------------------------------------


def map_shm(path: Path, size: int, *, writable: bool, fresh: bool = False) -> mmap.mmap:
    """Map a /dev/shm file shared; ``fresh`` creates it anew, all zero (sparse), of ``size`` bytes."""
    if fresh:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
    else:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)


def compare_files(actual: Path, expected: Path, size: int) -> str | None:
    """None if the first ``size`` bytes of both files are equal, else where they differ."""
    if actual.stat().st_size < size:
        return f"{actual} holds {actual.stat().st_size} bytes, not {size}"
    step = 64 << 20
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(map_shm(actual, size, writable=False))
        e = stack.enter_context(map_shm(expected, size, writable=False))
        for at in range(0, size, step):
            end = min(at + step, size)
            if a[at:end] != e[at:end]:
                detail = first_mismatch(a[at:end], e[at:end])
                return f"in the {step >> 20} MiB chunk at byte {at:#x}: {detail}"
    return None


def fsync_path(path: Path) -> None:
    """fsync a file, then its directory (what our durable save does after writing)."""
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# -- measurements ----------------------------------------------------------------------


def ours_save(src: Path, size: int, out: Path, channels: int, direct: bool) -> tuple[dict[str, Any], Any]:
    unlink(out)
    with map_shm(src, size, writable=False) as ram:  # fresh mapping: pages fault in during the save, as in QEMU
        drop_caches()
        t0 = time.perf_counter()
        rep = ops.save(out, {BACKEND_ID: ram}, options=EngineOptions(channels=channels, direct_io=direct, durable=True))
        wall = time.perf_counter() - t0
    return {"seconds": wall, "phases": rep.seconds, "bytes_written": rep.bytes_written,
            "pages_written": rep.pages_written, "notes": rep.notes}, rep  # fmt: skip


def ours_restore(mig: Path, dst: Path, size: int, channels: int, direct: bool) -> dict[str, Any]:
    with map_shm(dst, size, writable=True, fresh=True) as ram:
        drop_caches()
        t0 = time.perf_counter()
        rep = ops.restore(mig, {BACKEND_ID: ram}, options=EngineOptions(channels=channels, direct_io=direct))
        wall = time.perf_counter() - t0
    return {"seconds": wall, "phases": rep.seconds, "pages_read": rep.pages_read, "notes": rep.notes}


def qemu_save(
    src: Path, size: int, out: Path, caps: dict[str, bool], params: dict[str, Any], work: Path, timeout: float
) -> dict[str, Any]:
    unlink(out)
    with QemuVM(src, machine="q35", ram_mib=size >> 20, workdir=work, name="sr-src", timeout=120) as vm:
        vm.cmd("stop")
        vm.configure_migration(caps, params)
        drop_caches()
        t0 = time.perf_counter()
        vm.cmd("migrate", {"uri": file_uri(out)})
        info = vm.wait_migration(timeout)
        t1 = time.perf_counter()
        fsync_path(out)
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "migrate_seconds": t1 - t0, "fsync_seconds": t2 - t1,
            "qemu_total_time_ms": info.get("total-time"), "file_size": out.stat().st_size}  # fmt: skip


def qemu_restore(
    mig: Path, dst: Path, size: int, caps: dict[str, bool], params: dict[str, Any], work: Path, timeout: float
) -> dict[str, Any]:
    with QemuVM(dst, machine="q35", ram_mib=size >> 20, incoming=True, workdir=work, name="sr-dst", timeout=120) as vm:
        vm.configure_migration(caps, params)
        drop_caches()
        t0 = time.perf_counter()
        vm.cmd("migrate-incoming", {"uri": file_uri(mig), "exit-on-error": False})
        vm.wait_migration(timeout)
        t1 = time.perf_counter()
    return {"seconds": t1 - t0}


# -- one density -----------------------------------------------------------------------


def bench_density(
    density: float, size: int, args: argparse.Namespace, work: Path, tag: str, log: Callable[[str], None]
) -> dict[str, Any]:
    src = SHM / f"{tag}-src.ram"
    dst = SHM / f"{tag}-dst.ram"
    ours_mig = work / f"{tag}-ours.mig"
    qemu_mig = work / f"{tag}-qemu.mig"
    fio_file = work / f"{tag}-fio.dat"
    try:
        log(f"density {density:.2f}: writing {size / 2**30:.2f} GiB of guest RAM to {src} ...")
        nonzero = write_ram(src, size, density, seed=0x5EED + int(density * 1000))
        data_bytes = nonzero * PAGE
        runs: dict[str, list[dict[str, Any]]] = {}
        verified: dict[str, str] = {}

        def record(name: str, result: dict[str, Any]) -> None:
            runs.setdefault(name, []).append(result)
            log(f"  {name:<28}{result['seconds']:8.3f} s")

        def check(name: str, restored: Path) -> None:
            bad = compare_files(restored, src, size)
            verified[name] = "ok" if bad is None else bad
            if bad is not None:
                raise SystemExit(f"{name}: restored RAM differs from the source: {bad}")
            log(f"  {name:<28}verified: restored RAM == source")

        qemu_variants = [v for v in QEMU_VARIANTS if not (args.skip_qemu_direct and v[0] == QEMU_DIRECT)]
        for run in range(args.runs):
            first = run == 0
            log(f"density {density:.2f}, run {run + 1}/{args.runs}")
            unlink(fio_file)
            drop_caches()
            record("fio write", fio("write", fio_file, data_bytes))
            drop_caches()
            record("fio read", fio("read", fio_file, data_bytes))
            unlink(fio_file)

            for direct in (False, True):
                io = "dio" if direct else "buffered"
                for ch in CHANNELS:
                    res, rep = ours_save(src, size, ours_mig, ch, direct)
                    if rep.pages_written != nonzero:
                        raise SystemExit(f"our save wrote {rep.pages_written} pages; the RAM has {nonzero} non-zero")
                    record(f"ours save {ch}ch {io}", res)
                    res = ours_restore(ours_mig, dst, size, ch, direct)
                    if res["pages_read"] != nonzero:
                        raise SystemExit(f"our restore read {res['pages_read']} pages; the RAM has {nonzero} non-zero")
                    record(f"ours restore {ch}ch {io}", res)
                    if first:
                        check(f"ours restore {ch}ch {io}", dst)
                    unlink(dst, ours_mig)

            for name, caps, params in qemu_variants:
                record(f"qemu save {name}", qemu_save(src, size, qemu_mig, caps, params, work, args.qemu_timeout))
                if first:
                    with mappedram.open_file(qemu_mig) as f:
                        present = f.block(BACKEND_ID).pages_present
                    if present != nonzero:
                        raise SystemExit(f"QEMU {name} saved {present} pages of {BACKEND_ID}; {nonzero} are non-zero")
                record(f"qemu restore {name}", qemu_restore(qemu_mig, dst, size, caps, params, work, args.qemu_timeout))
                if first:
                    check(f"qemu restore {name}", dst)
                unlink(dst, qemu_mig)
    finally:
        unlink(src, dst, ours_mig, qemu_mig, fio_file)
    return summarize(density, size, nonzero, runs, verified)


def summarize(
    density: float, size: int, nonzero: int, runs: dict[str, list[dict[str, Any]]], verified: dict[str, str]
) -> dict[str, Any]:
    data_bytes = nonzero * PAGE
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    detail: dict[str, str] = {}
    for k, v in runs.items():
        if k.startswith("ours save"):
            detail[k] = f"pages {statistics.median(r['phases']['pages'] for r in v):.2f}s " \
                        f"sync {statistics.median(r['phases']['sync'] for r in v):.2f}s " \
                        f"wrote {statistics.median(r['bytes_written'] for r in v) / 1e9:.2f} GB"  # fmt: skip
        elif k.startswith("qemu save"):
            detail[k] = f"migrate {statistics.median(r['migrate_seconds'] for r in v):.2f}s " \
                        f"fsync {statistics.median(r['fsync_seconds'] for r in v):.2f}s"  # fmt: skip
        elif k.startswith("ours restore"):
            detail[k] = f"validate {statistics.median(r['phases']['validate'] for r in v):.3f}s"

    def best(prefix: str, dio: bool | None = None) -> tuple[str, float] | None:
        cands = [(k, s) for k, s in med.items() if k.startswith(prefix) and (dio is None or k.endswith("dio") == dio)]
        return min(cands, key=lambda kv: kv[1]) if cands else None

    b_save, q_save = best("ours save"), best("qemu save")
    b_dio, q_dio = best("ours save", dio=True), med.get(f"qemu save {QEMU_DIRECT}")
    b_rest, q_rest = best("ours restore"), best("qemu restore")
    assert b_save and q_save and b_dio and b_rest and q_rest

    def goal(key: str, ours: str, base: str, ratio: float | None, meaning: str) -> dict[str, Any]:
        met = None if ratio is None else ratio >= GOALS[key]
        return {"ours": ours, "baseline": base, "ratio": ratio, "goal": GOALS[key], "met": met, "meaning": meaning}

    goals = {
        "save_vs_qemu": goal("save_vs_qemu", b_save[0], q_save[0], q_save[1] / b_save[1],
                             "x faster: best QEMU save seconds / our best save seconds"),
        "dio_save_vs_qemu_dio": goal("dio_save_vs_qemu_dio", b_dio[0], f"qemu save {QEMU_DIRECT}",
                                     None if q_dio is None else q_dio / b_dio[1],
                                     "x faster: QEMU multifd4+direct-io save / our best direct-io save"),
        "save_vs_fio_write": goal("save_vs_fio_write", b_save[0], "fio write", med["fio write"] / b_save[1],
                                  "our best save's data GB/s / fio write GB/s (same bytes)"),
        "restore_vs_qemu": goal("restore_vs_qemu", b_rest[0], q_rest[0], q_rest[1] / b_rest[1],
                                "x faster: best QEMU restore seconds / our best cold restore seconds"),
        "restore_vs_fio_read": goal("restore_vs_fio_read", b_rest[0], "fio read", med["fio read"] / b_rest[1],
                                    "our best restore's data GB/s / fio read GB/s (same bytes)"),
    }  # fmt: skip
    # direct-io saves also write the zero pages inside merged extents: the same ratio on the bytes actually written
    written = statistics.median(r["bytes_written"] for r in runs[b_save[0]])
    actual = (written / b_save[1]) / (data_bytes / med["fio write"])
    goals["save_vs_fio_write"]["ratio_on_bytes_actually_written"] = actual
    return {
        "density": density,
        "ram_bytes": size,
        "nonzero_pages": nonzero,
        "data_bytes": data_bytes,
        "runs": runs,
        "median_seconds": med,
        "gbps": {k: size / s / 1e9 for k, s in med.items()},
        "data_gbps": {k: data_bytes / s / 1e9 for k, s in med.items()},
        "detail": detail,
        "verified": verified,
        "goals": goals,
    }


def print_density(d: dict[str, Any], runs: int, cold: bool) -> None:
    print(
        f"\ndensity {d['density']:.2f}: {d['ram_bytes'] / 2**30:.2f} GiB RAM, {d['nonzero_pages']} non-zero pages = "
        f"{d['data_bytes'] / 2**30:.2f} GiB of page data ({runs} runs, medians; "
        f"{'cold' if cold else 'WARM'} restores)"
    )
    print(f"{'what':<28}{'seconds':>9}{'GB/s':>8}{'data GB/s':>11}  detail")
    for k, s in d["median_seconds"].items():
        gbps = "" if k.startswith("fio") else f"{d['gbps'][k]:.2f}"
        print(f"{k:<28}{s:>9.3f}{gbps:>8}{d['data_gbps'][k]:>11.2f}  {d['detail'].get(k, '')}")
    bad = {k: v for k, v in d["verified"].items() if v != "ok"}
    print(f"verified (first run): {len(d['verified']) - len(bad)}/{len(d['verified'])} restores equal the source RAM")
    print("goals:")
    for i, (key, g) in zip(("1", "2", "3", "4a", "4b"), d["goals"].items()):
        if g["ratio"] is None:
            state, ratio = "n/a (skipped)", "   -  "
        else:
            state, ratio = ("met" if g["met"] else "NOT MET"), f"{g['ratio']:6.2f}x"
        print(f"  ({i:<2}) {key:<22}{ratio}  goal >= {g['goal']:g}x  {state:<8} {g['ours']} vs {g['baseline']}")
        if "ratio_on_bytes_actually_written" in g:
            print(f"       (on the bytes it actually wrote, zero pages in merged extents included: "
                  f"{g['ratio_on_bytes_actually_written']:.2f}x fio write)")  # fmt: skip


# -- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit, so that clean-up runs."""

    def handler(signum: int, _: Any) -> None:
        raise SystemExit(f"killed by signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--densities", default="0.5,0.9", help="fractions of non-zero pages, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench-work"))
    ap.add_argument("--skip-qemu-direct", action="store_true", help="skip QEMU's (slow) multifd4+direct-io variant")
    ap.add_argument("--qemu-timeout", type=float, default=1800, help="seconds allowed for one QEMU migration")
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "saverestore.json"))
    args = ap.parse_args()

    densities = [float(x) for x in args.densities.split(",") if x.strip()]
    if not densities or any(not 0 < d <= 1 for d in densities):
        ap.error("--densities: fractions in (0, 1]")
    size = int(args.size_gib * (1 << 30)) >> 20 << 20
    if size <= 0:
        ap.error("--size-gib too small")
    binary = find_qemu()
    if binary is None or qemu_version(binary) < (9, 0, 0):
        print("error: qemu-system-x86_64 >= 9.0 is needed on PATH", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("error: fio is needed on PATH", file=sys.stderr)
        return 2
    if shutil.disk_usage(SHM).free < 2 * size + (256 << 20):
        print(f"error: /dev/shm needs {2 * size / 2**30:.1f} GiB free", file=sys.stderr)
        return 2
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cold = drop_caches()
    if not cold:
        print("warning: cannot drop the page cache (not root): restores run warm", file=sys.stderr)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tag = f"mappedram-sr-{os.getpid()}"
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "qemu": ".".join(map(str, qemu_version(binary))),
        "ram_bytes": size,
        "runs_per_measurement": args.runs,
        "dir": str(work),
        "cold_cache": cold,
        "skip_qemu_direct": args.skip_qemu_direct,
        "densities": [],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with terminate_as_exit():
        for density in densities:
            d = bench_density(density, size, args, work, tag, log)
            report["densities"].append(d)
            report["wall_seconds"] = time.perf_counter() - started
            out.write_text(json.dumps(report, indent=2))  # written after each density: partial results survive
    for d in report["densities"]:
        print_density(d, args.runs, cold)
    print(f"\nJSON: {out}   ({report['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: `mappedram convert` and `mappedram diff` against reading the same files with `cat`.

For each density (fraction of NON-zero pages, random per page, each holding random data)
a guest RAM image of --size-gib GiB is made and saved as mapped-ram (A); a second file (B)
differs from A in --differ (default 3%) of its pages (half of them given new random data,
half zeroed); A is converted once to legacy (A.legacy). Then, --runs times each, with the
page cache dropped before every timed command:
  * `cat A > /dev/null` and `mappedram convert A OUT --to legacy` (buffered, and --direct-io);
  * `cat A.legacy > /dev/null` and `mappedram convert A.legacy OUT --to mapped-ram` (both);
  * `cat A B > /dev/null` and `mappedram diff A B`.
Each command runs as a process (`python -m mappedram ...`), as a user would run it; the
ratio is cat's time over the command's (goal: >= 0.8, the command reads at >= 0.8x the
speed at which the disk gives `cat` the same bytes). Converts are durable (fsync, rename).
A second baseline copies the input with `dd bs=8M conv=fsync` (with `oflag=direct` for
the --direct-io variants): what the disk gives a plain read-and-write of the same file.
The first diff run checks the reported differing pages against the pages that were
changed. Prints medians and ratios; writes JSON (--json).
Needs root to drop the page cache (it warns and runs warm otherwise).

usage: python bench/convert_diff.py [--size-gib 4] [--densities 0.5,1.0] [--runs 3]
                                    [--differ 0.03] [--dir bench-work] [--channels 4]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mappedram import ops
from mappedram.ops import EngineOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import PAGE, drop_caches, write_ram  # noqa: E402

GOAL = 0.8


def timed(cmd: list[str] | str, *, shell: bool = False, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, shell=shell, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd}: exit {proc.returncode}")
    return seconds, proc.stdout


def mappedram(*args: str) -> list[str]:
    return [sys.executable, "-m", "mappedram", *args]


def make_files(work: Path, size: int, density: float, differ: float, seed: int) -> dict[str, Any]:
    """A (mapped-ram), B (A with ``differ`` of its pages changed), A.legacy; kept for later runs."""
    tag = f"{size >> 20}M-d{density:g}"
    a, b, legacy = work / f"cd-{tag}-A.mig", work / f"cd-{tag}-B.mig", work / f"cd-{tag}-A.legacy.mig"
    changed_file = work / f"cd-{tag}-changed.npy"
    if not (a.exists() and b.exists() and legacy.exists() and changed_file.exists()):
        ram = work / f"cd-{tag}.ram"
        print(f"making {tag}: RAM image, A, B, A.legacy ...", flush=True)
        write_ram(ram, size, density, seed)
        ops.save_files(a, [("pc.ram", str(ram))], options=EngineOptions(channels=4))
        rng = np.random.default_rng(seed + 1)
        npages = size // PAGE
        changed = np.sort(rng.choice(npages, size=int(npages * differ), replace=False))
        fd = os.open(ram, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size)
            pages = np.frombuffer(m, dtype=np.uint8).reshape(npages, PAGE)
            half = len(changed) // 2
            new = np.frombuffer(rng.bytes(half * PAGE), dtype=np.uint8).reshape(half, PAGE).copy()
            new[:, 0] |= 1
            was = pages[changed].copy()
            pages[changed[:half]] = new
            pages[changed[half:]] = 0
            # a changed page that was zero and is zeroed again did not change
            really = np.any(pages[changed] != was, axis=1)
            del pages, was, new
            m.close()
        finally:
            os.close(fd)
        np.save(changed_file, changed[really])
        ops.save_files(b, [("pc.ram", str(ram))], options=EngineOptions(channels=4))
        ram.unlink()
        ops.convert(a, legacy, to="legacy")
    changed = np.load(changed_file)
    return {"a": a, "b": b, "legacy": legacy, "changed": changed}


def check_diff(out: str, changed: np.ndarray) -> None:
    report = json.loads(out)
    block = report["blocks"][0]
    got = np.zeros(block["size_a"] // PAGE, dtype=np.bool_)
    for first, count in block["ranges"]:
        got[first : first + count] = True
    want = np.zeros_like(got)
    want[changed] = True
    if not np.array_equal(got, want):
        raise SystemExit(f"diff reported {int(got.sum())} pages, {int(want.sum())} were changed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--densities", default="0.5,1.0")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--differ", type=float, default=0.03)
    ap.add_argument("--dir", default=str(ROOT / "bench-work"))
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the input files for later runs")
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "convert_diff.json"))
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) << 20
    cold = drop_caches()
    if not cold:
        print("warning: cannot drop the page cache (not root): runs are warm", file=sys.stderr)
    ch = str(args.channels)
    report: dict[str, Any] = {"size": size, "cold_cache": cold, "runs": args.runs, "channels": args.channels,
                              "differ": args.differ, "densities": {}}  # fmt: skip
    for density in [float(d) for d in args.densities.split(",")]:
        f = make_files(work, size, density, args.differ, seed=0x5EED)
        a, b, legacy = str(f["a"]), str(f["b"]), str(f["legacy"])
        out_legacy, out_mapped = str(work / "cd-out.legacy.mig"), str(work / "cd-out.mapped.mig")
        to_legacy = mappedram("convert", a, out_legacy, "--to", "legacy", "-q")
        to_mapped = mappedram("convert", legacy, out_mapped, "--to", "mapped-ram", "--channels", ch, "-q")
        copy = str(work / "cd-copy.mig")
        dd = "dd bs=8M conv=fsync status=none"
        cases: dict[str, tuple[list[str] | str, list[str], tuple[int, ...], str | None]] = {
            "convert --to legacy": (f"cat {a} > /dev/null", to_legacy, (0,), f"{dd} if={a} of={copy}"),
            "convert --to legacy --direct-io": (f"cat {a} > /dev/null", [*to_legacy, "--direct-io"], (0,),
                                                f"{dd} oflag=direct if={a} of={copy}"),
            "convert --to mapped-ram": (f"cat {legacy} > /dev/null", to_mapped, (0,), f"{dd} if={legacy} of={copy}"),
            "convert --to mapped-ram --direct-io": (f"cat {legacy} > /dev/null", [*to_mapped, "--direct-io"], (0,),
                                                    f"{dd} oflag=direct if={legacy} of={copy}"),
            "diff": (f"cat {a} {b} > /dev/null", mappedram("diff", a, b, "--channels", ch, "--output", "json"), (1,),
                     None),
        }  # fmt: skip
        times: dict[str, dict[str, list[float]]] = {k: {"cat": [], "ours": [], "dd": []} for k in cases}
        for run in range(args.runs):
            for name, (cat, ours, ok, copy_cmd) in cases.items():
                drop_caches()
                times[name]["cat"].append(timed(cat, shell=True)[0])
                if copy_cmd is not None:
                    drop_caches()
                    times[name]["dd"].append(timed(copy_cmd, shell=True)[0])
                    Path(copy).unlink(missing_ok=True)
                for p in (out_legacy, out_mapped):
                    Path(p).unlink(missing_ok=True)
                drop_caches()
                seconds, out = timed(ours, ok=ok)
                times[name]["ours"].append(seconds)
                if name == "diff" and run == 0:
                    check_diff(out, f["changed"])
        for p in (out_legacy, out_mapped):
            Path(p).unlink(missing_ok=True)
        sizes = {"a": os.path.getsize(a), "b": os.path.getsize(b), "legacy": os.path.getsize(legacy)}
        med = {k: {w: statistics.median(v[w]) for w in v if v[w]} for k, v in times.items()}
        report["densities"][str(density)] = {
            "files": sizes,
            "allocated": {"a": os.stat(a).st_blocks * 512, "legacy": os.stat(legacy).st_blocks * 512},
            "pages_changed": len(f["changed"]),
            "times": times,
            "median_seconds": med,
            "ratio_vs_cat": {k: v["cat"] / v["ours"] for k, v in med.items()},
            "ratio_vs_dd_copy": {k: v["dd"] / v["ours"] for k, v in med.items() if "dd" in v},
        }
        print(f"\ndensity {density:g}: {size / 2**30:.1f} GiB of RAM; A {sizes['a'] / 2**30:.2f} GiB "
              f"(allocated {os.stat(a).st_blocks * 512 / 2**30:.2f}), A.legacy {sizes['legacy'] / 2**30:.2f} GiB; "
              f"{'cold' if cold else 'warm'} cache, {args.runs} runs, medians")  # fmt: skip
        print(f"{'command':<38}{'cat s':>8}{'dd s':>8}{'ours s':>9}{'vs cat':>8}{'vs dd':>7}  goal: vs cat >= {GOAL}")
        for k, v in med.items():
            r = v["cat"] / v["ours"]
            d = f"{v['dd']:>8.2f}{v['dd'] / v['ours']:>7.2f}" if "dd" in v else f"{'-':>8}{'-':>7}"
            d = f"{v['cat']:>8.2f}{d[:8]}{v['ours']:>9.2f}{r:>8.2f}{d[8:]}"
            print(f"{k:<38}{d}  {'met' if r >= GOAL else 'not met'}")
        if not args.keep:
            for p in (f["a"], f["b"], f["legacy"]):
                p.unlink(missing_ok=True)
            (work / f"cd-{size >> 20}M-d{density:g}-changed.npy").unlink(missing_ok=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cut a migration file at every STEP bytes (default 4 KiB) and check each cut is rejected.

Every truncation must fail `verify` with a format error that names an offset, and a
restore from it must raise before touching its destination. The file is copied once
(sparse) and shortened in place, from the end down, so nothing is rewritten.

usage: python tools/sweep_truncations.py FILE... [--offset N] [--step 4096] [--every K] [--restore-every K]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import mappedram
from mappedram import ops
from mappedram.ops import restore


def sweep(
    path: str, offset: int = 0, step: int = 4096, every: int = 1, restore_every: int = 1, workdir: str | None = None
) -> int:
    """Check the cuts; return how many were checked. Raises AssertionError at the first one accepted."""
    with mappedram.open_file(path, offset) as f:
        sizes = {b.idstr: b.used_length for b in f.blocks}
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cut_path = os.path.join(tmp, "cut.mig")
        with open(path, "rb") as src, open(cut_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        dests = {name: np.full(n, 0x5A, dtype=np.uint8) for name, n in sizes.items()}
        cuts = list(range((size - 1) // step * step, offset - 1, -step))[::every]
        for i, cut in enumerate(cuts):
            os.truncate(cut_path, cut)
            report = ops.verify(cut_path, offset)
            assert not report.ok, f"cut at {cut:#x} passed verify"
            assert report.problems[0].offset is not None, f"cut at {cut:#x}: problem without an offset"
            if i % restore_every == 0:
                try:
                    restore(cut_path, dests, offset=offset)
                except mappedram.FormatError:
                    pass
                else:
                    raise AssertionError(f"cut at {cut:#x} restored")
                assert all((d == 0x5A).all() for d in dests.values()), f"cut at {cut:#x} touched memory"
        return len(cuts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--step", type=int, default=4096)
    ap.add_argument("--every", type=int, default=1, help="check every K-th cut only")
    ap.add_argument("--restore-every", type=int, default=1, help="also restore from every K-th checked cut")
    args = ap.parse_args()
    for path in args.files:
        t = time.perf_counter()
        n = sweep(path, args.offset, args.step, args.every, args.restore_every)
        print(f"{path}: {n} truncations rejected ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

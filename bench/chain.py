#!/usr/bin/env python3
"""Benchmark: incremental snapshots of the built-in guest against full saves.

In one run, on the same disk:
  * the parent: the built-in guest (KVM where it runs, else the software guest) of
    --mem-mib (default 4096) MiB, filled and saved (`vm save`, live);
  * for each dirtied fraction (default 1 % and 10 % of the pages): the guest restored from
    the parent with its writes logged, run exactly the iterations that dirty that fraction
    of its pages on average (its workload writes uniformly random pages), then paused and
      - saved as a child of the parent (`vm save --parent`): the pages it wrote since;
      - or, from the same state, saved whole (`ops.save` of all its RAM while paused);
    each reported as file bytes on disk, seconds to write (synced), and the guest's
    pause (from the pause to the synced file).
Prints medians and writes JSON (bench-results/chain.json).

usage: python bench/chain.py [--mem-mib 4096] [--fractions 0.01 0.1] [--runs 3] [--dir bench-work]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import drop_caches  # noqa: E402

from mappedram import ops  # noqa: E402
from mappedram.engine.fileio import allocated_bytes  # noqa: E402
from mappedram.format.vmstate import encode_device_state, encode_vmdesc_json  # noqa: E402
from mappedram.image import open_file  # noqa: E402
from mappedram.vm import ops as vmops  # noqa: E402
from mappedram.vm.restore import restore_guest  # noqa: E402


def full_save_from(parent: Path, out: Path, iterations: int) -> dict[str, float]:
    """The guest restored from ``parent``, run ``iterations``, paused and saved whole."""
    with open_file(parent) as pmf:
        vm, cpu, _ = restore_guest(pmf, mode="eager", dirty_log=True, seal=ops.NO_CHECK)
        with vm:
            later = vm.run_until(cpu.counter + iterations, 600)
            t0 = time.perf_counter()
            state, devices = encode_device_state([later.record()], first_section_id=2)
            report = ops.save(out, {vm.ram_idstr: vm.memory}, machine_type=pmf.machine_type or "pc-q35-10.0",
                              device_state=state, vmdesc=encode_vmdesc_json(devices, page_size=4096))  # fmt: skip
            pause = time.perf_counter() - t0
    return {"pause_seconds": pause, "save_seconds": report.total_seconds, "file_bytes": allocated_bytes(str(out)),
            "pages_written": report.pages_written}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-mib", type=int, default=4096)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.10])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-work")
    args = ap.parse_args()
    work = args.dir / "chain"
    work.mkdir(parents=True, exist_ok=True)
    parent = work / "parent.mig"
    t0 = time.perf_counter()
    # pause points every 256 iterations (the default 4096 would round 1 % of a small guest up)
    saved = vmops.vm_save(parent, vmops.GuestConfig(mem_mib=args.mem_mib, batch=256), warmup_iterations=0)
    parent_save = {"seconds": time.perf_counter() - t0, "downtime": saved.save.downtime,
                   "file_bytes": allocated_bytes(str(parent)), "guest": saved.guest}  # fmt: skip
    npages = args.mem_mib * 256
    rows = []
    for f in args.fractions:
        iterations = round(-npages * math.log(1 - f) / 256) * 256
        child_runs, full_runs = [], []
        for k in range(args.runs):
            child = work / f"child-{f:g}-{k}.mig"
            full = work / f"full-{f:g}-{k}.mig"
            drop_caches()
            r = vmops.vm_save_child(child, parent, warmup_iterations=iterations)
            child_runs.append({"pause_seconds": r.pause_seconds, "save_seconds": r.child.total_seconds,
                               "file_bytes": r.child.allocated_bytes, "pages": r.child.pages_changed,
                               "mode": r.child.mode, "ok": r.ok})  # fmt: skip
            drop_caches()
            full_runs.append(full_save_from(parent, full, iterations))
            child.unlink()
            full.unlink()
        med = {
            "fraction": f, "iterations": iterations,
            "child_pages": statistics.median(c["pages"] for c in child_runs),
            "child_bytes": statistics.median(c["file_bytes"] for c in child_runs),
            "child_save": statistics.median(c["save_seconds"] for c in child_runs),
            "child_pause": statistics.median(c["pause_seconds"] for c in child_runs),
            "full_bytes": statistics.median(c["file_bytes"] for c in full_runs),
            "full_save": statistics.median(c["save_seconds"] for c in full_runs),
            "full_pause": statistics.median(c["pause_seconds"] for c in full_runs),
            "child_runs": child_runs, "full_runs": full_runs,
        }  # fmt: skip
        rows.append(med)
    print(f"parent ({parent_save['guest']}, {args.mem_mib} MiB): live save {parent_save['seconds']:.2f} s, "
          f"downtime {parent_save['downtime'] * 1e3:.0f} ms, "
          f"{parent_save['file_bytes'] / 1e6:.0f} MB on disk")  # fmt: skip
    print(f"{'dirtied':>8} {'pages':>8} {'child MB':>9} {'save s':>7} {'pause ms':>9} | {'full MB':>8} {'save s':>7} "
          f"{'pause ms':>9} | {'size x':>7} {'pause x':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['fraction']:>8.0%} {r['child_pages']:>8,.0f} {r['child_bytes'] / 1e6:>9.1f} {r['child_save']:>7.2f} "
              f"{r['child_pause'] * 1e3:>9.1f} | {r['full_bytes'] / 1e6:>8.1f} {r['full_save']:>7.2f} "
              f"{r['full_pause'] * 1e3:>9.1f} | {r['full_bytes'] / r['child_bytes']:>7.1f} "
              f"{r['full_pause'] / r['child_pause']:>8.1f}")  # fmt: skip
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "chain.json").write_text(json.dumps({"cpus": os.cpu_count(), "parent": parent_save, "rows": rows},
                                               indent=1, default=str))  # fmt: skip
    print(f"JSON: {out / 'chain.json'}")
    parent.unlink()


if __name__ == "__main__":
    main()

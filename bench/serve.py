#!/usr/bin/env python3
"""Benchmark: restoring a QEMU guest from a file, by QEMU itself and by ``mappedram serve``.

A 4 GiB q35 guest (``--mem-mib``) runs the tests' touch guest as its firmware under TCG (it hangs under nested KVM):
it fills its low 2 GiB with a pattern (the RAM above 4 GiB stays zero: about half the RAM
holds data), then sweeps it, reading every page, forever. QEMU saves it (mapped-ram,
multifd 4) while it sweeps. Then ``--runs`` times (medians), page cache dropped before each,
a fresh destination (anonymous RAM, the same firmware, not paused) restores it:

* ``qemu file`` (1 channel) and ``qemu file multifd 4``: ``migrate-incoming file:``;
* ``serve precopy``: ``mappedram serve`` to ``migrate-incoming unix:``;
* ``serve postcopy``: the same with postcopy-ram: the guest runs at once and faults;
* ``serve postcopy preempt``: the same, page requests answered on a second connection
  (QEMU's postcopy-preempt channel);
* ``qemu postcopy``: QEMU's own postcopy of the same RAM, from a QEMU that loaded the file
  to a fresh one (the load not timed): what QEMU's page placement costs a postcopy fill.

For each: time from the restore's start to the guest running (``query-status``), and
to RAM complete (QEMU's ``completed``). Postcopy also gives the page requests, their
latency at serve (from arrival to sent: median, p99) and QEMU's postcopy-blocktime (vCPU
time blocked on missing pages). ``fio`` O_DIRECT reads the bytes of page data in the file.

Goals (issue H): postcopy time to running <= 100 ms; RAM complete <= 1.2x QEMU's best
eager restore; precopy no slower than QEMU's best eager restore.

usage: python bench/serve.py [--mem-mib 4096] [--runs 3] [--dir bench-work]
Results go to bench-results/serve.json. Needs QEMU >= 10 and root (to drop caches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import drop_caches, fio  # noqa: E402
from tests.helpers import touchguest  # noqa: E402
from tests.helpers.qemu_harness import QemuVM, file_uri, require_qemu  # noqa: E402

import mappedram  # noqa: E402
from mappedram.ops import ServeOptions, serve  # noqa: E402

#: q35 puts RAM above 2 GiB at 4 GiB when the guest has more than 2.75 GiB
LOW_RAM = 2 << 30
LIMIT = 600.0


def _args(bios: Path) -> list[str]:
    return ["-bios", str(bios), "-action", "reboot=shutdown,shutdown=pause"]


def _save(work: Path, mem_mib: int, bios: Path) -> Path:
    out = work / f"serve-guest-{mem_mib}.mig"
    if out.exists():
        return out
    ram = work / "serve-src.ram"
    ram.unlink(missing_ok=True)
    with QemuVM(ram, ram_mib=mem_mib, extra_args=_args(bios), workdir=work, name="src", timeout=60,
                accel="tcg") as vm:  # fmt: skip
        vm.cmd("cont")
        deadline = time.monotonic() + LIMIT
        while not (s := touchguest.read_status_file(ram)).touching or s.loops < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the touch guest did not sweep: {s}")
            time.sleep(0.05)
        vm.configure_migration({"mapped-ram": True, "multifd": True}, {"multifd-channels": 4})
        vm.cmd("migrate", {"uri": file_uri(out)})
        vm.wait_migration(LIMIT)
    ram.unlink()
    return out


class _Destination(QemuVM):
    """An incoming QEMU with anonymous RAM (a normal guest's), not paused: it runs once loaded."""

    @property
    def args(self) -> list[str]:
        args = super().args
        at = args.index("-object")
        args[at + 1] = f"memory-backend-ram,id=m0,size={self.ram_size >> 20}M"
        args.remove("-S")
        return args

    def _prepare_ram(self) -> None:
        pass


def _watch_running(vm: QemuVM, t0: float, out: dict[str, float]) -> None:
    """Poll (from the caller's thread) until the guest runs; record when."""
    deadline = time.monotonic() + LIMIT
    while vm.cmd("query-status")["status"] != "running":
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not start")
        time.sleep(0.001)
    out["running_s"] = time.perf_counter() - t0


def _qemu_load(work: Path, path: Path, mem: int, bios: Path, multifd: bool) -> dict[str, Any]:
    with _Destination(work / "unused.ram", ram_mib=mem, incoming=True, extra_args=_args(bios), workdir=work,
                      accel="tcg") as vm:  # fmt: skip
        caps = {"mapped-ram": True, **({"multifd": True} if multifd else {})}
        vm.configure_migration(caps, {"multifd-channels": 4} if multifd else {})
        t0 = time.perf_counter()
        vm.cmd("migrate-incoming", {"uri": file_uri(path), "exit-on-error": False})
        out: dict[str, Any] = {}
        vm.wait_migration(LIMIT)
        out["complete_s"] = time.perf_counter() - t0
        _watch_running(vm, t0, out)
        return out


def _qemu_postcopy(work: Path, path: Path, mem: int, bios: Path) -> dict[str, Any]:
    """QEMU's own postcopy, QEMU to QEMU, of the same RAM: a source QEMU loads the file
    (not timed), then migrates to a fresh destination and switches to postcopy at once.
    Timed from ``migrate``: the floor of a postcopy fill into QEMU (its page placement)."""
    with (
        _Destination(work / "unused.ram", ram_mib=mem, incoming=True, extra_args=_args(bios), workdir=work,
                     accel="tcg", name="qsrc") as src,
        _Destination(work / "unused.ram", ram_mib=mem, incoming=True, extra_args=_args(bios), workdir=work,
                     accel="tcg") as dst,
    ):  # fmt: skip
        src.configure_migration({"mapped-ram": True, "multifd": True}, {"multifd-channels": 4})
        src.cmd("migrate-incoming", {"uri": file_uri(path), "exit-on-error": False})
        src.wait_migration(LIMIT)
        drop_caches()
        caps = {"postcopy-ram": True, "postcopy-blocktime": True}
        dst.configure_migration(caps, None)
        sock = work / "qemu-postcopy.sock"
        dst.cmd("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
        src.configure_migration({"mapped-ram": False, "multifd": False, "postcopy-ram": True}, None)
        t0 = time.perf_counter()
        src.cmd("migrate", {"uri": f"unix:{sock}"})
        src.cmd("migrate-start-postcopy")
        out: dict[str, Any] = {}
        _watch_running(dst, t0, out)
        info = dst.wait_migration(LIMIT)
        out["complete_s"] = time.perf_counter() - t0
        out["blocktime_ms"] = info.get("postcopy-blocktime")
        return out


def _serve(work: Path, path: Path, mem: int, bios: Path, postcopy: bool, preempt: bool = False) -> dict[str, Any]:
    with _Destination(work / "unused.ram", ram_mib=mem, incoming=True, extra_args=_args(bios), workdir=work,
                      accel="tcg") as vm:  # fmt: skip
        caps = {"postcopy-ram": True, "postcopy-blocktime": True, "postcopy-preempt": preempt}
        vm.configure_migration(caps if postcopy else {}, None)
        sock = work / "serve-bench.sock"
        vm.cmd("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
        result: dict[str, Any] = {}
        t0 = time.perf_counter()

        def run() -> None:
            try:
                opts = ServeOptions(postcopy=postcopy, postcopy_preempt=preempt, timeout=120)
                result["report"] = serve(path, f"unix:{sock}", options=opts)
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        out: dict[str, Any] = {}
        if postcopy:
            _watch_running(vm, t0, out)
        thread.join(LIMIT)
        if "error" in result:
            raise result["error"]
        info = vm.wait_migration(LIMIT)
        out["complete_s"] = time.perf_counter() - t0
        if not postcopy:
            _watch_running(vm, t0, out)
        r = result["report"]
        out["serve_s"] = r.total_seconds
        if postcopy:
            out["requests"] = r.requests
            out["pages_requested"] = r.pages_requested
            out["latency_median_us"] = (r.request_latency_us or {}).get("median")
            out["latency_p99_us"] = (r.request_latency_us or {}).get("p99")
            out["blocktime_ms"] = info.get("postcopy-blocktime")
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem-mib", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="bench-work")
    ap.add_argument("--json", default="bench-results/serve.json")
    args = ap.parse_args()
    require_qemu((10, 0, 0))
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not drop_caches():
        print("warning: cannot drop the page cache (not root): restores run warm", file=sys.stderr)
    ram_end = min(LOW_RAM, args.mem_mib << 20)
    bios = touchguest.build_bios(work / "touch.bin", ram_end=ram_end)
    path = _save(work, args.mem_mib, bios)
    with mappedram.open_file(path) as mf:
        data_bytes = sum(b.pages_present for b in mf.blocks) * mf.page_size
    modes = {
        "qemu file": lambda: _qemu_load(work, path, args.mem_mib, bios, False),
        "qemu file multifd 4": lambda: _qemu_load(work, path, args.mem_mib, bios, True),
        "serve precopy": lambda: _serve(work, path, args.mem_mib, bios, False),
        "serve postcopy": lambda: _serve(work, path, args.mem_mib, bios, True),
        "serve postcopy preempt": lambda: _serve(work, path, args.mem_mib, bios, True, preempt=True),
        "qemu postcopy (QEMU to QEMU)": lambda: _qemu_postcopy(work, path, args.mem_mib, bios),
    }
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in [*modes, "fio"]}
    for _ in range(args.runs):
        for name, run in modes.items():
            drop_caches()
            runs[name].append(run())
        drop_caches()
        runs["fio"].append(fio("read", work / "fio-read.dat", data_bytes))
    med = {m: {k: statistics.median([r[k] for r in v if r.get(k) is not None] or [float("nan")]) for k in v[0]}
           for m, v in runs.items()}  # fmt: skip
    best_eager = min(med["qemu file"]["complete_s"], med["qemu file multifd 4"]["complete_s"])
    fio_s = med["fio"]["seconds"]
    print(f"\n{args.mem_mib} MiB guest, {data_bytes / 1e9:.2f} GB of page data, cold cache; medians of {args.runs}")
    print("| restore | guest running | RAM complete | vs QEMU's best | vs fio read |")
    print("| --- | --- | --- | --- | --- |")
    for name in modes:
        m = med[name]
        print(f"| {name} | {m['running_s'] * 1e3:.1f} ms | {m['complete_s']:.2f} s | "
              f"{m['complete_s'] / best_eager:.2f}x | {fio_s / m['complete_s']:.2f}x |")  # fmt: skip
    print(f"| fio O_DIRECT read | - | {fio_s:.2f} s | - | 1.00x |")
    for name in ("serve postcopy", "serve postcopy preempt"):
        p = med[name]
        print(f"{name}: {p['requests']:.0f} requests ({p['pages_requested']:.0f} pages); latency at serve median "
              f"{p['latency_median_us']:.0f} us, p99 {p['latency_p99_us']:.0f} us; QEMU's postcopy-blocktime "
              f"{p['blocktime_ms']} ms ({p['blocktime_ms'] * 1e3 / max(p['requests'], 1):.0f} us a request)")
    q = med["qemu postcopy (QEMU to QEMU)"]
    print(f"qemu postcopy: QEMU's postcopy-blocktime {q['blocktime_ms']} ms")
    results = {"date": time.strftime("%Y-%m-%d"), "host": os.uname().nodename, "mem_mib": args.mem_mib,
               "data_bytes": data_bytes, "runs": runs, "medians": med, "best_qemu_eager_s": best_eager}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

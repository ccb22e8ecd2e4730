#!/usr/bin/env python3
"""Mutation fuzzer for the reader: mutated migration files may only raise FormatError.

Seeds are small, valid files: mapped-ram and legacy streams, and one carrying the
device state and vmdesc of a real QEMU 10 file, each also sealed (ops/seal.py). Each
input is a seed with random mutations (bit flips, byte sets, interesting integers in
big-endian fields, cuts, insertions, deletions, duplicated chunks); a sealed seed's
trailer is also rewritten with a mutated seal (keys dropped or added, versions,
algorithms, chunk sizes and lengths that lie, digests cut, padded, swapped or not hex,
blocks missing, extra or reordered), framed right so the reader gets to the seal. It is
written to a file in /dev/shm, opened, every page of every block read, and verified (also
with --data: every digest). Anything but FormatError is a crash; an
input that takes more than --timeout seconds is a hang; workers run under a memory
limit (--max-mem-mib), so a blow-up shows as a crash. Crashing inputs are saved.

usage: python tools/fuzz.py [--inputs 1000000] [--workers N] [--seed S] [--out fuzz-crashes]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


import mappedram  # noqa: E402
from mappedram import ops  # noqa: E402
from mappedram.format.encoder import encode_vmdesc  # noqa: E402
from mappedram.format.vmstate import find_vmdesc  # noqa: E402

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x1000, 0xFFF, 0x100000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 64) - 1]


class Hang(Exception):
    pass


def seeds() -> list[bytes]:
    from tests.helpers.patterns import random_pages
    from tests.helpers.streams import legacy_stream, mapped_ram_stream

    a = random_pages(6, 0.5, 1).tobytes()
    b = random_pages(2, 0.0, 2).tobytes()
    out = [
        mapped_ram_stream([("pc.ram", a), ("pc.bios", b)], parts=2),
        legacy_stream(
            [("pc.ram", a), ("/rom@etc/acpi/tables", b)], [[("pc.ram", 1, None), ("pc.ram", 2, b"\x01" * 4096)]]
        ),
    ]
    vector = ROOT / "tests" / "data" / "qemu" / "q35-64M-mapped-ram.mig.zst"
    try:
        import zstandard

        with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
            with vector.open("rb") as fin:
                zstandard.ZstdDecompressor().copy_stream(fin, tmp)
            tmp.flush()
            with mappedram.open_file(tmp.name) as f:
                assert f.vmdesc is not None
                device = (f.device_state(), encode_vmdesc(f.vmdesc.raw))
                out.append(mapped_ram_stream([("m0", a), ("pc.bios", b)], machine=f.machine_type or "pc-q35-10.0",
                                             ram_id=f.ram_section_id, device=device))  # fmt: skip
    except (ImportError, OSError):
        pass
    return out + [_sealed(seed) for seed in out]


def _sealed(data: bytes) -> bytes:
    """``data`` sealed in place (through a file in /dev/shm)."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as tmp:
        tmp.write(data)
        tmp.flush()
        ops.seal_file(tmp.name, options=ops.EngineOptions(channels=1, durable=False))
        return Path(tmp.name).read_bytes()


SEAL_VALUES: list[Any] = [None, True, 0, 1, 2, -1, 4095, 4096, 1 << 20, (1 << 20) + 1, 1 << 31, 1 << 64, "blake3",
                          "sha256", "md5", "", "00" * 32, "AB" * 32, [], {}, ["x"], 1.5]


def mutate_seal(data: bytes, rng: random.Random) -> bytes | None:
    """``data`` with its trailer's seal mutated (the trailer framed right); None without a seal."""
    tail_at = max(0, len(data) - (8 << 20))
    vmdesc = find_vmdesc(data[tail_at:], tail_at)
    seal = vmdesc.data.get("mappedram", {}).get("seal") if vmdesc is not None else None
    if vmdesc is None or not isinstance(seal, dict):
        return None
    desc = json.loads(json.dumps(vmdesc.data))
    seal = desc["mappedram"]["seal"]
    blocks = seal.get("blocks") if isinstance(seal.get("blocks"), list) else []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(9)
        if op == 0 and seal:
            seal.pop(rng.choice(sorted(seal)))
        elif op == 1:
            seal[rng.choice(["version", "algorithm", "keyed", "chunk_bytes", "state", "blocks", "extra"])] = rng.choice(
                SEAL_VALUES)
        elif op == 2 and blocks:
            b = rng.choice(blocks)
            if isinstance(b, dict) and isinstance(b.get("digests"), str):
                d = b["digests"]
                k = rng.randrange(1, 130)
                b["digests"] = rng.choice([d[:-k], d + "0" * k, d[:k] + rng.choice("Gg A-") + d[k + 1 :], d.upper()])
        elif op == 3 and blocks:
            rng.choice([lambda: blocks.pop(rng.randrange(len(blocks))),
                        lambda: blocks.insert(rng.randrange(len(blocks) + 1), dict(rng.choice(blocks))),
                        lambda: blocks.reverse()])()  # fmt: skip
        elif op == 4 and blocks:
            b = rng.choice(blocks)
            if isinstance(b, dict):
                b[rng.choice(["idstr", "used_length", "digests", "x"])] = rng.choice(SEAL_VALUES)
        elif op == 5:
            desc["mappedram"]["seal"] = rng.choice(SEAL_VALUES)
            break
        elif op == 6 and blocks:  # a digest that lies: well formed, wrong (verify --data finds it)
            b = rng.choice(blocks)
            if isinstance(b, dict) and isinstance(b.get("digests"), str) and b["digests"]:
                d, k = b["digests"], rng.randrange(len(b["digests"]))
                b["digests"] = d[:k] + ("1" if d[k] == "0" else "0") + d[k + 1 :]
        elif op == 7 and isinstance(seal.get("state"), str):
            seal["state"] = "".join(rng.choice("0123456789abcdef") for _ in range(64))
        elif op == 8:
            seal["chunk_bytes"] = rng.choice([4096, 8192, 1 << 21, 1 << 30, 3 << 20])
    return data[: vmdesc.offset] + encode_vmdesc(json.dumps(desc).encode("utf-8"))


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
        if not buf:
            buf = bytearray(data[: rng.randrange(1, 64)])
        op = rng.randrange(8)
        at = rng.randrange(len(buf))
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.randrange(256)
        elif op in (2, 3):
            size = rng.choice([">B", ">H", ">I", ">Q"])
            width = struct.calcsize(size)
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[at : at + width] = struct.pack(size, value)[: len(buf) - at]
        elif op == 4:
            del buf[at:]
        elif op == 5:
            del buf[at : at + rng.randrange(1, 64)]
        elif op == 6:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            n = rng.randrange(1, 256)
            src = rng.randrange(len(buf))
            buf[at:at] = buf[src : src + n]
    return bytes(buf)


def check(path: str) -> None:
    """Open, read every page, verify; only FormatError may escape."""
    try:
        with mappedram.open_file(path) as f:
            for b in f.blocks:
                for first in range(0, b.num_pages, 2048):
                    f.read_pages(b, first, min(2048, b.num_pages - first))
            f.device_state()
    except mappedram.FormatError:
        pass
    ops.verify(path)
    ops.verify(path, data=True)


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def worker(args: tuple[int, int, int, float, int, str]) -> dict[str, Any]:
    index, count, seed, timeout, max_mem, out = args
    resource.setrlimit(resource.RLIMIT_AS, (max_mem << 20, max_mem << 20))
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(seed * 1_000_003 + index)
    corpus = seeds()
    path = f"/dev/shm/mappedram-fuzz-{os.getpid()}.mig"
    crashes = hangs = 0
    slowest = 0.0
    try:
        for i in range(count):
            seed_data = rng.choice(corpus)
            data = (mutate_seal(seed_data, rng) if rng.random() < 0.4 else None) or seed_data
            if data is seed_data or rng.random() < 0.3:
                data = mutate(data, rng)
            with open(path, "wb") as f:
                f.write(data)
            t = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                check(path)
            except Hang:
                hangs += 1
                _save(out, "hang", index, i, data, "timeout")
            except BaseException:
                crashes += 1
                _save(out, "crash", index, i, data, traceback.format_exc())
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"inputs": count, "crashes": crashes, "hangs": hangs, "slowest": slowest}


def _save(out: str, kind: str, worker_index: int, i: int, data: bytes, why: str) -> None:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{kind}-{worker_index}-{i}")
    Path(stem + ".mig").write_bytes(data)
    Path(stem + ".txt").write_text(why)


def run(
    inputs: int, workers: int, seed: int, timeout: float = 1.0, max_mem: int = 2048, out: str = "fuzz-crashes"
) -> dict[str, Any]:
    per = [inputs // workers + (1 if k < inputs % workers else 0) for k in range(workers)]
    jobs = [(k, n, seed, timeout, max_mem, out) for k, n in enumerate(per) if n]
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(worker, jobs)
    total = {key: sum(r[key] for r in results) for key in ("inputs", "crashes", "hangs")}
    total["slowest"] = max(r["slowest"] for r in results)
    total["seconds"] = time.perf_counter() - t
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds one input may take")
    ap.add_argument("--max-mem-mib", type=int, default=2048, help="address-space limit of each worker")
    ap.add_argument("--out", default="fuzz-crashes", help="where crashing inputs are saved")
    args = ap.parse_args()
    r = run(args.inputs, args.workers, args.seed, args.timeout, args.max_mem_mib, args.out)
    print(
        f"{r['inputs']} inputs in {r['seconds']:.0f} s: {r['crashes']} crashes, {r['hangs']} hangs, "
        f"slowest {r['slowest'] * 1000:.0f} ms"
    )
    return 1 if r["crashes"] or r["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())

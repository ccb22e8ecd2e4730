"""The seal on the command line: ``seal``, ``verify --data``, ``--seal``/``--key`` on the
writers, ``--key``/``--no-verify-seal`` on the readers, ``info``; and their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mappedram
from tests.helpers.patterns import random_pages


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True, timeout=300)


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "ram.raw"
    raw.write_bytes(random_pages(1024, 0.5, 3).tobytes())
    key = tmp_path / "k.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    return raw, key


def _corrupt(path: Path) -> None:
    with mappedram.open_file(path) as mf:
        b = mf.block("pc.ram")
        assert b.layout is not None and b.bitmap is not None
        at = b.layout.pages_offset + int(b.bitmap.nonzero()[0][5]) * 4096
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x55")


def test_save_seal_verify_data_and_restore_exit_codes(tmp_path: Path) -> None:
    raw, _ = _setup(tmp_path)
    out = tmp_path / "a.mig"
    p = run("save", "--block", f"pc.ram={raw}", "-o", str(out), "--seal")
    assert p.returncode == 0 and "sealed (blake3)" in p.stdout, p.stderr
    assert "seal: blake3, 4 chunks of 1.0 MiB" in run("info", str(out)).stdout
    p = run("verify", str(out), "--data", "--channels", "2")
    assert p.returncode == 0 and "page data: every digest of the seal matches" in p.stdout, p.stderr
    p = run("restore", str(out), "--block", f"pc.ram={tmp_path / 'r.raw'}")
    assert p.returncode == 0 and "seal: every digest matches" in p.stdout, p.stderr
    _corrupt(out)
    assert run("verify", str(out)).returncode == 0  # the structure is sound
    p = run("verify", str(out), "--data")
    assert p.returncode == 1 and "1 of 4 chunks differ from the seal" in p.stderr
    assert "mismatch: block 'pc.ram' chunk 0: pages 0..255, file bytes 0x" in p.stderr, p.stderr
    js = json.loads(run("verify", str(out), "--data", "--output", "json").stdout)
    assert js["ok"] is False and js["seal"]["status"] == "mismatch" and js["seal"]["mismatches"][0]["block"] == "pc.ram"
    target = tmp_path / "r2.raw"
    p = run("restore", str(out), "--block", f"pc.ram={target}")
    assert p.returncode == 1 and "differ from the seal" in p.stderr and not target.exists()
    p = run("extract", str(out), "--block", "pc.ram", "-o", str(target), "--output", "json")
    assert p.returncode == 1 and json.loads(p.stdout)["error"] == "IntegrityError" and not target.exists()
    p = run("restore", str(out), "--block", f"pc.ram={target}", "--no-verify-seal")
    assert p.returncode == 0 and "seal: not checked" in p.stdout and target.exists()


def test_seal_command_keyed_and_key_errors(tmp_path: Path) -> None:
    raw, key = _setup(tmp_path)
    out = tmp_path / "a.mig"
    assert run("save", "--block", f"pc.ram={raw}", "-o", str(out)).returncode == 0
    assert "seal: none" in run("info", str(out)).stdout
    p = run("verify", str(out), "--data")
    assert p.returncode == 1 and "not sealed" in p.stderr
    p = run("seal", str(out), "--key", str(key), "--output", "json")
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout)
    assert js["keyed"] is True and js["replaced"] is False and js["chunks"] == 4
    assert run("verify", str(out), "--data", "--key", str(key)).returncode == 0
    p = run("verify", str(out), "--data")
    assert p.returncode == 1 and "cannot be checked without it" in p.stderr
    p = run("restore", str(out), "--block", f"pc.ram={tmp_path / 'r.raw'}")
    assert p.returncode == 2 and "--no-verify-seal" in p.stderr
    wrong = tmp_path / "w.key"
    wrong.write_bytes(os.urandom(32))
    os.chmod(wrong, 0o600)
    p = run("verify", str(out), "--data", "--key", str(wrong))
    assert p.returncode == 1 and "every chunk" in p.stderr
    os.chmod(wrong, 0o644)
    p = run("verify", str(out), "--data", "--key", str(wrong))
    assert p.returncode == 2 and f"{wrong}: the key file has mode 0644" in p.stderr
    assert run("verify", str(out), "--key", str(key)).returncode == 2  # --key without --data
    p = run("seal", str(out), "--algorithm", "sha256")
    assert p.returncode == 0 and "the old seal replaced" in p.stdout
    assert "seal: sha256, 4 chunks" in run("info", str(out)).stdout
    p = run("restore", str(out), "--block", f"pc.ram={tmp_path / 'r.raw'}", "--key", str(key), "--no-verify-seal")
    assert p.returncode == 2


def test_rewrite_convert_and_vm_save_seal(tmp_path: Path) -> None:
    raw, key = _setup(tmp_path)
    src, mapped, legacy = tmp_path / "s.mig", tmp_path / "m.mig", tmp_path / "l.mig"
    assert run("save", "--block", f"pc.ram={raw}", "-o", str(src), "--seal").returncode == 0
    assert run("rewrite", str(src), str(mapped), "--key", str(key)).returncode == 0  # --key implies --seal
    assert run("verify", str(mapped), "--data", "--key", str(key)).returncode == 0
    assert run("convert", str(src), str(legacy), "--to", "legacy", "--seal").returncode == 0
    assert run("verify", str(legacy), "--data").returncode == 0
    p = run("export", str(legacy), "-o", str(tmp_path / "core"), "--format", "raw")
    assert p.returncode == 0 and "seal: every digest matches" in p.stdout, p.stderr
    vm = tmp_path / "vm.mig"
    p = run("vm", "save", str(vm), "--guest", "software", "--mem", "16", "--warmup-iterations", "8192",
            "--step-batches", "2", "--downtime-limit", "1000", "--seal")  # fmt: skip
    assert p.returncode == 0 and "sealed (blake3)" in p.stdout, p.stderr
    p = run("vm", "restore", str(vm), "--mode", "map", "--run-iterations", "4096")
    assert p.returncode == 0 and "seal: every digest matches" in p.stdout, p.stderr
    _corrupt(vm)
    p = run("vm", "restore", str(vm), "--run-iterations", "4096")
    assert p.returncode == 1 and "differ from the seal" in p.stderr

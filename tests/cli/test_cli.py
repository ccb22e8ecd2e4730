"""The command line, run as a user would (a subprocess of the installed console script)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mappedram.cli import parse_size, parse_target
from mappedram.ops import safe_filename
from tests.helpers.vectors import INDEX, vector_meta


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mappedram", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def test_info_json_matches_index(vector):
    path, _ = vector("q35-64M-mapped-ram-offset4096.mig")
    out = json.loads(run("info", f"file:{path},offset=4096", "--output", "json").stdout)
    meta = vector_meta("q35-64M-mapped-ram-offset4096.mig")
    assert out["format"] == "mapped-ram" and out["machine_type"] == "pc-q35-10.0"
    assert out["offset"] == 4096 and out["capabilities"] == ["mapped-ram"]
    assert [(b["idstr"], b["bitmap_offset"], b["pages_offset"], b["pages_present"]) for b in out["blocks"]] == [
        (b["idstr"], b["bitmap_offset"], b["pages_offset"], b["pages_present"]) for b in meta["ram_blocks"]
    ]
    assert out["devices"][0]["idstr"] == "timer"
    assert out["switchover_start"] is True


def test_info_human(vector):
    path, _ = vector("pc-64M-legacy.mig")
    text = run("info", str(path)).stdout
    assert "format: legacy" in text and "machine type: pc-i440fx-10.0" in text
    assert "m0" in text and "8187" in text and "timer" in text


def test_verify_ok_and_bad(vector, tmp_path):
    path, _ = vector("pc-64M-mapped-ram.mig")
    ok = run("verify", str(path))
    assert "OK (mapped-ram)" in ok.stdout
    bad = tmp_path / "cut.mig"
    with open(path, "rb") as f:
        bad.write_bytes(f.read(0x100))
    proc = run("verify", str(bad), check=False)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "offset 0x" in proc.stderr and "expected" in proc.stderr
    js = json.loads(run("verify", str(bad), "--output", "json", check=False).stdout)
    assert js["ok"] is False and js["problems"][0]["offset"] is not None


def test_missing_file_and_bad_offset(tmp_path):
    proc = run("info", str(tmp_path / "nope.mig"), check=False)
    assert proc.returncode == 1 and "nope.mig" in proc.stderr and "open failed" in proc.stderr
    proc = run("info", str(tmp_path / "nope.mig"), "--offset", "12Q", check=False)
    assert proc.returncode == 2 and "invalid size" in proc.stderr


@pytest.mark.parametrize("name", ["q35-64M-mapped-ram.mig", "q35-64M-legacy.mig", "pc-64M-mapped-ram-offset4096.mig"])
def test_extract_block_is_sparse_and_exact(vector, tmp_path, name):
    path, offset = vector(name)
    out = tmp_path / "m0.raw"
    res = json.loads(run("extract", str(path), "--offset", str(offset), "--block", "m0", "-o", str(out),
                         "--output", "json").stdout)
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == INDEX["expected_ram_sha256"]
    assert res["blocks"][0]["pages_written"] == INDEX["nonzero_pages"]
    # zero pages are holes: allocation is about the non-zero half
    assert os.stat(out).st_blocks * 512 <= (INDEX["nonzero_pages"] + 64) * 4096


def test_extract_all_safe_names(vector, tmp_path):
    path, _ = vector("pc-64M-mapped-ram.mig")
    outdir = tmp_path / "blocks"
    run("extract", str(path), "--all", "-o", str(outdir))
    names = sorted(os.listdir(outdir))
    assert names == sorted(["m0.raw", "rom@etc_acpi_tables.raw", "pc.bios.raw", "pc.rom.raw",
                            "rom@etc_table-loader.raw", "rom@etc_acpi_rsdp.raw"])
    assert os.path.getsize(outdir / "pc.bios.raw") == 262144


def test_extract_unknown_block(vector, tmp_path):
    path, _ = vector("pc-64M-mapped-ram.mig")
    proc = run("extract", str(path), "--block", "nope", "-o", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "no RAM block 'nope'" in proc.stderr and "m0" in proc.stderr


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("0x1234", 0x1234), ("1M", 1 << 20), ("2k", 2048),
                                             ("3G", 3 << 30), ("7b", 7)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_target():
    assert parse_target("file:/a/b,offset=1M", None) == ("/a/b", 1 << 20)
    assert parse_target("file:/a/b", None) == ("/a/b", 0)
    assert parse_target("/a/b", "0x10") == ("/a/b", 16)


@pytest.mark.parametrize(("idstr", "name"), [
    ("pc.ram", "pc.ram.raw"), ("/rom@etc/acpi/tables", "rom@etc_acpi_tables.raw"), ("..", "block.raw"),
    ("../../etc/passwd", "etc_passwd.raw"), ("a\x00b", "a_b.raw"), ("0000:00:02.0/vga.vram", "0000_00_02.0_vga.vram.raw"),
])
def test_safe_filename(idstr, name):
    assert safe_filename(idstr) == name
    assert "/" not in name and not name.startswith(".")


def test_safe_filename_unique():
    taken: set[str] = set()
    assert [safe_filename(n, taken) for n in ["a/b", "a_b", "a:b"]] == ["a_b.raw", "a_b-2.raw", "a_b-3.raw"]


def test_save_restore_rewrite_commands(vector, tmp_path, expected_ram):
    src, _ = vector("q35-64M-legacy.mig")
    m0 = tmp_path / "m0.raw"
    out = json.loads(run("restore", str(src), "--block", f"m0={m0}", "--output", "json").stdout)
    assert out["pages_read"] == INDEX["nonzero_pages"] and "pc.bios" in out["skipped_blocks"]
    assert m0.read_bytes() == expected_ram
    saved = tmp_path / "saved.mig"
    res = json.loads(run("save", "--block", f"m0={m0}", "-o", str(saved), "--machine", "pc-q35-10.0",
                         "--channels", "2", "--output", "json").stdout)
    assert res["pages_written"] == INDEX["nonzero_pages"] and res["machine_type"] == "pc-q35-10.0"
    assert {"setup", "pages", "finalize", "sync"} <= set(res["seconds"]) and res["gbps"] > 0
    assert "OK (mapped-ram)" in run("verify", str(saved)).stdout
    conv = tmp_path / "conv.mig"
    text = run("rewrite", str(src), str(conv), "--channels", "4").stdout
    assert "pages written" in text
    back = tmp_path / "back.raw"
    run("restore", f"file:{conv}", "--block", f"m0={back}", "--direct-io", "--direct-io-fallback")
    assert back.read_bytes() == expected_ram


def test_save_bad_block_argument(tmp_path):
    proc = run("save", "--block", "m0", "-o", str(tmp_path / "x.mig"), check=False)
    assert proc.returncode == 2 and "NAME=PATH" in proc.stderr
    proc = run("save", "--block", f"m0={tmp_path / 'missing.raw'}", "-o", str(tmp_path / "x.mig"), check=False)
    assert proc.returncode == 1 and "missing.raw" in proc.stderr


@pytest.mark.parametrize(("given", "mode"), [((), "auto"), (("--direct-io",), "on"), (("--direct-io", "off"), "off"),
                                             (("--direct-io", "auto"), "auto"), (("--direct-io=on",), "on")])  # fmt: skip
def test_direct_io_modes_and_the_reason_in_the_report(tmp_path, given, mode):
    ram = tmp_path / "ram.img"
    ram.write_bytes(os.urandom(1 << 20) + bytes(1 << 20))
    out, back = tmp_path / "out.mig", tmp_path / "back.img"
    saved = json.loads(run("save", "--block", f"pc.ram={ram}", "-o", str(out), *given, "--output", "json").stdout)
    restored = json.loads(run("restore", str(out), "--block", f"pc.ram={back}", *given, "--output", "json").stdout)
    for report in (saved, restored):
        assert report["direct_io_reason"].startswith(mode + ":")
        if mode != "auto":
            assert report["direct_io"] is (mode == "on")
    assert back.read_bytes() == ram.read_bytes()
    human = run("save", "--block", f"pc.ram={ram}", "-o", str(out), *given).stdout
    assert f"direct-io {mode}:" in human


def test_direct_io_mode_refused(tmp_path):
    r = run("save", "--block", f"pc.ram={tmp_path}/x", "-o", str(tmp_path / "o"), "--direct-io", "fast", check=False)
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr

"""Incremental snapshots on the command line: ``diff --write-child``, ``flatten``, ``info``
showing the chain, ``verify --data`` of a child whose parent changed, the readers refusing
it, ``vm save --parent``; their output and exit codes (``mappedram.cli.main``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import mappedram
from mappedram import ops
from mappedram.cli import main
from tests.helpers.patterns import random_pages
from tests.helpers.streams import device_state

PAGE = 4096
PAGES = 512
BIOS = random_pages(16, 0.0, 9)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``mappedram ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: a usage error
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, *args, "--output", "json")
    try:
        return code, json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"mappedram {args[0]} printed no JSON (exit {code}):\n{out}\n{err}") from None


def _save(path: Path, ram: npt.NDArray[np.uint8]) -> Path:
    state, trailer = device_state()
    ops.save(path, [("pc.ram", ram.reshape(-1)), ("pc.bios", BIOS)], device_state=state, vmdesc=trailer[5:],
             ram_section_id=1)  # fmt: skip
    return path


def _files(tmp_path: Path) -> tuple[Path, Path, npt.NDArray[np.uint8]]:
    ram_a = random_pages(PAGES, 0.3, 1).reshape(PAGES, PAGE).copy()
    ram_b = ram_a.copy()
    nonzero = np.flatnonzero(ram_a.any(axis=1))
    ram_b[nonzero[:12], 3] ^= 0x81
    ram_b[nonzero[20:24]] = 0
    return _save(tmp_path / "a.mig", ram_a), _save(tmp_path / "b.mig", ram_b), ram_b


def _replace_parent(parent: Path) -> None:
    """Another file of the same size in the parent's place (other RAM, same blocks)."""
    other = _save(parent.with_name("other.mig"), random_pages(PAGES, 0.3, 77).reshape(PAGES, PAGE))
    assert other.stat().st_size == parent.stat().st_size
    os.replace(other, parent)


def test_diff_write_child_writes_a_child_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, ram_b = _files(tmp_path)
    assert run(capsys, "diff", os.fspath(a), os.fspath(b))[0] == 1  # they differ
    child = tmp_path / "c.mig"
    code, report = run_json(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(child))
    assert code == 0 and report["identical"] is False
    c = report["child"]
    assert c is not None and c["path"] == os.fspath(child) and c["parent"] == os.fspath(a)
    assert c["pages_changed"] == 16 and c["pages_changed_zero"] == 4 and c["mode"] in ("reflink", "sparse")
    assert len(c["parent_digest"]) == 64 and c["seal"] is None
    with mappedram.open_file(child) as mf:
        assert mf.read_pages("pc.ram", 0, PAGES) == ram_b.tobytes()
    code, out, err = run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(tmp_path / "c2.mig"),
                         "--seal")  # fmt: skip
    assert code == 0, err
    assert f"child of {a}" in out and "QEMU does not load a child: `mappedram flatten` writes the whole file" in out
    assert "sealed" in out
    assert ops.verify(tmp_path / "c2.mig", data=True).ok
    code, out, err = run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(tmp_path / "q.mig"),
                         "--quiet")  # fmt: skip
    assert code == 0 and out == "" and (tmp_path / "q.mig").exists()


def test_flatten_writes_b_and_refuses_a_whole_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = _files(tmp_path)
    child, flat = tmp_path / "c.mig", tmp_path / "flat.mig"
    assert run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(child), "-q")[0] == 0
    code, report = run_json(capsys, "flatten", os.fspath(child), os.fspath(flat))
    assert code == 0 and report["format"] == "mapped-ram" and report["file_size"] == flat.stat().st_size
    assert flat.read_bytes() == b.read_bytes()
    assert "mappedram-child" not in run_json(capsys, "info", os.fspath(flat))[1]["capabilities"]
    code, _, err = run(capsys, "flatten", os.fspath(flat), os.fspath(tmp_path / "again.mig"))
    assert code == 2 and "not a child" in err and not (tmp_path / "again.mig").exists()


def test_info_shows_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, ram_b = _files(tmp_path)
    c1, c2 = tmp_path / "c1.mig", tmp_path / "c2.mig"
    ram_b2 = ram_b.copy()
    ram_b2[np.flatnonzero(ram_b.any(axis=1))[100:103], 0] ^= 1
    b2 = _save(tmp_path / "b2.mig", ram_b2)
    assert run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(c1), "-q")[0] == 0
    assert run(capsys, "diff", os.fspath(c1), os.fspath(b2), "--write-child", os.fspath(c2), "-q")[0] == 0
    code, out, err = run(capsys, "info", os.fspath(c2))
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("chain: 3 files, newest first"))
    members = lines[at + 1 : at + 4]
    assert members[0].startswith(f"  {c2}: mapped-ram, 3 pages of its own") and members[0].endswith("child of c1.mig")
    assert "16 pages of its own" in members[1] and members[1].endswith("child of a.mig")
    assert members[2].endswith("the whole file") and "a.mig" in members[2]
    code, report = run_json(capsys, "info", os.fspath(c2))
    assert code == 0 and [m["pages_own"] for m in report["chain"]] == [3, 16, report["chain"][2]["pages_own"]]
    assert [b["pages_own"] for b in report["blocks"]] == [3, 0]
    code, out, _ = run(capsys, "info", os.fspath(a))
    assert code == 0 and "chain:" not in out


def test_verify_data_of_a_child_whose_parent_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = _files(tmp_path)
    child = tmp_path / "c.mig"
    assert run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(child), "-q")[0] == 0
    code, out, err = run(capsys, "verify", os.fspath(child), "--data")
    assert code == 1 and "not sealed" in err  # an unsealed file is not OK with --data, but its chain is right
    code, report = run_json(capsys, "verify", os.fspath(child), "--data")
    assert any(c.startswith("chain: every parent's RAM digest matches") for c in report["checks"]), report
    assert report["problems"] == []
    _replace_parent(a)
    code, out, err = run(capsys, "verify", os.fspath(child))
    assert code == 0, err  # the structure alone is right
    code, out, err = run(capsys, "verify", os.fspath(child), "--data")
    assert code == 1 and "chain: the parent" in err and "changed since" in err, (out, err)
    code, report = run_json(capsys, "verify", os.fspath(child), "--data")
    assert code == 1 and report["ok"] is False
    assert report["problems"][0]["field"] == "vmdesc mappedram.parent.digest"
    assert report["problems"][0]["error"] == "IntegrityError"
    # the readers refuse it and write nothing; --no-verify-seal reads it anyway
    dest = tmp_path / "r.raw"
    code, out, err = run(capsys, "restore", os.fspath(child), "--block", f"pc.ram={dest}")
    assert code == 1 and "changed since" in err and not dest.exists()
    code, out, err = run(capsys, "flatten", os.fspath(child), os.fspath(tmp_path / "flat.mig"))
    assert code == 1 and "changed since" in err and not (tmp_path / "flat.mig").exists()
    code, out, err = run(capsys, "restore", os.fspath(child), "--block", f"pc.ram={dest}", "--no-verify-seal")
    assert code == 0 and dest.exists(), err


@pytest.mark.parametrize("command", ["flatten", "diff"])
def test_the_hint_a_refused_chain_gives_is_an_option_of_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A chain check that fails says "--no-verify-seal reads it anyway": the command that
    printed it must take that option."""
    a, b, _ = _files(tmp_path)
    child = tmp_path / "c.mig"
    assert run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(child), "-q")[0] == 0
    _replace_parent(a)
    args = [command, os.fspath(child), os.fspath(tmp_path / "out.mig" if command == "flatten" else b)]
    code, _, err = run(capsys, *args)
    assert code == 1 and "changed since" in err
    if "--no-verify-seal" in err:
        code, _, err = run(capsys, *args, "--no-verify-seal")
        assert "unrecognized arguments" not in err, f"`{command}` hints at --no-verify-seal, which it refuses: {err}"


def test_a_missing_parent_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = _files(tmp_path)
    child = tmp_path / "c.mig"
    assert run(capsys, "diff", os.fspath(a), os.fspath(b), "--write-child", os.fspath(child), "-q")[0] == 0
    os.remove(a)
    code, _, err = run(capsys, "info", os.fspath(child))
    assert code == 1 and "a.mig" in err and "cannot be opened" in err
    code, report = run_json(capsys, "verify", os.fspath(child))
    assert code == 1 and report["problems"][0]["field"] == "vmdesc mappedram.parent.path"
    dest = tmp_path / "r.raw"
    code, _, err = run(capsys, "restore", os.fspath(child), "--block", f"pc.ram={dest}", "--no-verify-seal")
    assert code == 1 and not dest.exists()


def test_vm_save_parent_writes_a_child_that_restores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent, child, flat = tmp_path / "p.mig", tmp_path / "c.mig", tmp_path / "flat.mig"
    code, _, err = run(capsys, "vm", "save", os.fspath(parent), "--guest", "software", "--mem", "16",
                       "--warmup-iterations", "8192", "--step-batches", "2", "--downtime-limit", "1000", "-q")  # fmt: skip
    assert code == 0, err
    code, report = run_json(capsys, "vm", "save", os.fspath(child), "--parent", os.fspath(parent), "--guest",
                            "software", "--mem", "16", "--warmup-iterations", "2")  # fmt: skip
    assert code == 0 and report["ok"] is True, report
    assert report["guest"] == "soft" and report["mem_mib"] == 16 and report["parent"] == os.fspath(parent)
    assert report["pages_dirty"] == report["child"]["pages_changed"] > 0
    assert report["counter"] > report["counter_from"]
    with mappedram.open_file(child) as mf:
        assert mf.parent is not None and int(np.count_nonzero(mf.block("pc.ram").own)) == report["pages_dirty"]
    code, out, err = run(capsys, "vm", "save", os.fspath(tmp_path / "c2.mig"), "--parent", os.fspath(child),
                         "--guest", "software", "--mem", "16", "--warmup-iterations", "2")  # fmt: skip
    assert code == 0, err
    assert "save OK" in out and "pages written since" in out and "`mappedram flatten` writes the whole file" in out
    code, restored = run_json(capsys, "vm", "restore", os.fspath(child), "--run-iterations", "4096")
    assert code == 0 and restored["ok"] is True, restored
    code, _, err = run(capsys, "vm", "restore", os.fspath(child), "--mode", "map", "--run-iterations", "4096")
    assert code == 2 and "map mode" in err
    assert run(capsys, "flatten", os.fspath(child), os.fspath(flat), "-q")[0] == 0
    for mode in ("eager", "map"):
        code, restored = run_json(capsys, "vm", "restore", os.fspath(flat), "--mode", mode, "--run-iterations", "4096")
        assert code == 0 and restored["ok"] is True, (mode, restored)

"""What a person sees on a terminal: a progress bar on stderr for every long command, nothing
but errors with -q, and JSON on stdout that no progress ever mixes into.

The commands run with their stderr (and, where said, stdout) on a real pseudo-terminal,
as in a shell; the bar is tqdm's, with bytes and a rate.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.helpers.patterns import random_pages


def _run_on_tty(argv: list[str], *, stdout_tty: bool = True) -> tuple[int, str, str]:
    """Run ``mappedram argv`` with stderr (and stdout unless told) on a pty: (rc, tty text, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(
        [sys.executable, "-m", "mappedram", *argv],
        stdin=subprocess.DEVNULL,
        stdout=slave if stdout_tty else subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s from {argv}")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the pty
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode() if proc.stdout else ""
    rc = proc.wait(120)
    os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace"), out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("progress")
    raw = d / "ram.raw"
    raw.write_bytes(random_pages(8192, 0.5, 3).tobytes())  # 32 MiB
    snap = d / "snap.mig"
    rc, text, _ = _run_on_tty(["save", "--block", f"pc.ram={raw}", "-o", os.fspath(snap)])
    assert rc == 0, text
    legacy = d / "legacy.mig"
    rc, text, _ = _run_on_tty(["convert", os.fspath(snap), os.fspath(legacy), "--to", "legacy"])
    assert rc == 0, text
    return {"raw": raw, "snap": snap, "legacy": legacy, "dir": d}


def _commands(f: dict[str, Path]) -> dict[str, list[str]]:
    d = f["dir"]
    return {
        "save": ["save", "--block", f"pc.ram={f['raw']}", "-o", os.fspath(d / "again.mig")],
        "restore": ["restore", os.fspath(f["snap"]), "--block", f"pc.ram={d / 'back.raw'}"],
        "extract": ["extract", os.fspath(f["snap"]), "--block", "pc.ram", "-o", os.fspath(d / "x.raw")],
        "export": ["export", os.fspath(f["snap"]), "-o", os.fspath(d / "x.elf")],
        "rewrite": ["rewrite", os.fspath(f["legacy"]), os.fspath(d / "rw.mig")],
        "convert": ["convert", os.fspath(f["snap"]), os.fspath(d / "cv.mig"), "--to", "legacy"],
        "diff": ["diff", os.fspath(f["snap"]), os.fspath(f["legacy"])],
        "verify": ["verify", os.fspath(f["legacy"])],
        "info": ["info", os.fspath(f["legacy"])],
    }


COMMANDS = ["save", "restore", "extract", "export", "rewrite", "convert", "diff", "verify", "info"]


def _clean(f: dict[str, Path]) -> None:
    for name in ("again.mig", "back.raw", "x.raw", "x.elf", "rw.mig", "cv.mig"):
        (f["dir"] / name).unlink(missing_ok=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_terminal_shows_a_bar(files: dict[str, Path], command: str) -> None:
    _clean(files)
    rc, text, _ = _run_on_tty(_commands(files)[command])
    assert rc == 0, text
    assert f"{command}:" in text and "B/s" in text and "%|" in text, text  # tqdm: label, bar, rate


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_prints_nothing(files: dict[str, Path], command: str) -> None:
    _clean(files)
    rc, text, _ = _run_on_tty([*_commands(files)[command], "-q"])
    assert rc == 0 and text == "", repr(text)


@pytest.mark.parametrize("command", COMMANDS)
def test_json_has_no_progress_in_it(files: dict[str, Path], command: str) -> None:
    _clean(files)
    rc, text, out = _run_on_tty([*_commands(files)[command], "--output", "json"], stdout_tty=False)
    assert rc == 0, text
    json.loads(out)  # stdout is one JSON document, nothing else
    assert "%|" not in text, text  # and no bar on the terminal either


def test_quiet_still_prints_errors(files: dict[str, Path]) -> None:
    rc, text, _ = _run_on_tty(["info", os.fspath(files["dir"] / "missing.mig"), "-q"])
    assert rc != 0 and text.startswith("mappedram: ") and "missing.mig" in text, text

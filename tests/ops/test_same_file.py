"""A command that reads one file and writes another refuses when both are the same file.

The rule, for rewrite, convert, extract, restore and export alike: the output may not be
the input (the same path, or a hard link of it: the same inode), with or without an
offset; an output that is a symlink is refused anyway (tests/ops/test_security.py). The
input is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mappedram import cli
from tests.helpers.patterns import random_pages

LINKS: dict[str, Callable[[Path, Path], None]] = {
    "same-path": lambda src, out: None,
    "symlink": lambda src, out: out.symlink_to(src.name),
    "hard-link": lambda src, out: os.link(src, out),
}

COMMANDS = {
    "rewrite": lambda src, out: ["rewrite", src, out],
    "rewrite-offset": lambda src, out: ["rewrite", src, out, "--offset", "4096"],
    "convert-legacy": lambda src, out: ["convert", src, out, "--to", "legacy"],
    "convert-mapped-ram": lambda src, out: ["convert", src, out, "--to", "mapped-ram"],
    "extract": lambda src, out: ["extract", src, "--block", "pc.ram", "-o", out],
    "restore": lambda src, out: ["restore", src, "--block", f"pc.ram={out}"],
    "export": lambda src, out: ["export", src, "-o", out],
}


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("command", COMMANDS)
def test_output_that_is_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, link: str
) -> None:
    src = tmp_path / "snap.mig"
    assert cli.main(["save", "--block", f"pc.ram={_raw(tmp_path)}", "-o", os.fspath(src), "-q"]) == 0
    capsys.readouterr()
    out = src if link == "same-path" else tmp_path / "out.mig"
    LINKS[link](src, out)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    code = cli.main([os.fspath(a) for a in COMMANDS[command](src, out)])
    err = capsys.readouterr().err
    assert code == 2, err
    if link == "symlink":  # the symlink rule comes first: no output is written through a link
        assert "is a symbolic link: mappedram never writes through a symlink" in err, err
    else:
        assert "the output is the input file" in err and "give another output path" in err, err
        assert {"hard-link": "(a hard link of it)"}.get(link, "itself;") in err
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before, "the input changed"


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "ram.raw"
    raw.write_bytes(random_pages(256, 0.5, 7).tobytes())
    return raw

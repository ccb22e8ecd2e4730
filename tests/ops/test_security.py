"""Guest memory is secret: what mappedram creates is owner-only, and no planted symlink is followed.

The rule for every command: a file it creates that holds guest memory or device state is
mode 0600 (a directory, 0700) whatever the umask; an existing file written in place keeps
its owner and mode, and the report says so; an output, lock or temporary path that is a
symlink is refused, never followed and never replaced.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mappedram import cli
from tests.helpers.patterns import random_pages


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    raw = tmp_path / "ram.raw"
    raw.write_bytes(random_pages(64, 0.5, 3).tobytes())
    out = tmp_path / "snap.mig"
    assert cli.main(["save", "--block", f"pc.ram={raw}", "-o", os.fspath(out), "-q"]) == 0
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _writers(src: Path, out: Path) -> dict[str, list[str]]:
    s, o = os.fspath(src), os.fspath(out)
    return {
        "save": ["save", "--block", f"pc.ram={src.parent / 'ram.raw'}", "-o", o],
        "rewrite": ["rewrite", s, o],
        "convert": ["convert", s, o, "--to", "legacy"],
        "extract": ["extract", s, "--block", "pc.ram", "-o", o],
        "export-elf": ["export", s, "-o", o],
        "export-raw": ["export", s, "--format", "raw", "-o", o],
        "restore": ["restore", s, "--block", f"pc.ram={o}"],
    }


COMMANDS = ["save", "rewrite", "convert", "extract", "export-elf", "export-raw", "restore"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_file_created_is_owner_only(tmp_path: Path, snap: Path, umask022: None, command: str) -> None:
    out = tmp_path / "out.bin"
    assert cli.main([*_writers(snap, out)[command], "-q"]) == 0
    assert _mode(out) == 0o600, oct(_mode(out))


def test_extract_all_makes_an_owner_only_directory(tmp_path: Path, snap: Path, umask022: None) -> None:
    d = tmp_path / "blocks"
    assert cli.main(["extract", os.fspath(snap), "--all", "-o", os.fspath(d), "-q"]) == 0
    assert _mode(d) == 0o700 and all(_mode(p) == 0o600 for p in d.iterdir())


def test_restore_into_an_existing_file_keeps_it_and_says_so(
    tmp_path: Path, snap: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest.raw"
    dest.write_bytes(b"")
    dest.chmod(0o644)
    assert cli.main(["restore", os.fspath(snap), "--block", f"pc.ram={dest}"]) == 0
    assert _mode(dest) == 0o644
    assert "an existing file, written in place (its owner and mode 644 kept)" in capsys.readouterr().out


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A sticky, world-writable directory, as /tmp is."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


LOCKING = ("save", "rewrite", "convert")  # the snapshot writers, which take a lock beside their output


@pytest.mark.parametrize(("command", "planted_at"),
                         [(c, "output") for c in COMMANDS] + [(c, "lock") for c in LOCKING])  # fmt: skip
def test_a_planted_symlink_is_never_followed(
    tmp_path: Path, snap: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str], command: str, planted_at: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim, absent = outside / "victim", outside / "created"
    victim.write_bytes(b"precious")
    out = shared_dir / "out.bin"
    lock = shared_dir / ".out.bin.mappedram-lock"
    if planted_at == "output":
        out.symlink_to(victim)
        (shared_dir / "other.bin").symlink_to(absent)
    else:
        lock.symlink_to(absent)
    code = cli.main(_writers(snap, out)[command])
    err = capsys.readouterr().err
    assert code != 0, f"{command} wrote through a symlink planted at its {planted_at}"
    assert "is a symbolic link" in err and "never" in err, err
    assert victim.read_bytes() == b"precious" and not absent.exists()
    assert os.path.islink(out if planted_at == "output" else lock)  # the link itself is left alone
    if planted_at == "output":
        code = cli.main(_writers(snap, shared_dir / "other.bin")[command])
        assert code != 0 and not absent.exists()


def test_extract_all_into_a_planted_directory_link(tmp_path: Path, snap: Path, shared_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (shared_dir / "blocks").symlink_to(outside)
    assert cli.main(["extract", os.fspath(snap), "--all", "-o", os.fspath(shared_dir / "blocks")]) != 0
    assert list(outside.iterdir()) == []

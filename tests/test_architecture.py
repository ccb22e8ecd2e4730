"""Layering rules, checked on the source: format/ is pure, only engine/ does I/O and threads."""

from __future__ import annotations

import ast
from pathlib import Path

import mappedram

SRC = Path(mappedram.__file__).parent
IO_MODULES = {"os", "io", "threading", "socket", "mmap", "fcntl", "subprocess", "concurrent", "multiprocessing"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_format_is_pure():
    for path in (SRC / "format").glob("*.py"):
        roots = {n.split(".")[0] for n in _imports(path)}
        assert not roots & IO_MODULES, f"{path.name} imports {roots & IO_MODULES}"
        assert not {n for n in _imports(path) if n.startswith("mappedram.") and not n.startswith(
            ("mappedram.format", "mappedram.errors", "mappedram._runs"))}, path.name


def test_only_engine_uses_threads_and_mmap():
    for path in SRC.rglob("*.py"):
        if "engine" in path.parts:
            continue
        roots = {n.split(".")[0] for n in _imports(path)}
        assert not roots & {"threading", "mmap", "concurrent", "fcntl"}, path


def test_engine_knows_no_format():
    for path in (SRC / "engine").glob("*.py"):
        bad = {n for n in _imports(path) if n.startswith(("mappedram.format", "mappedram.image", "mappedram.layout"))}
        assert not bad, f"{path.name} imports {bad}"


def test_public_api():
    for name in mappedram.__all__:
        assert hasattr(mappedram, name), name

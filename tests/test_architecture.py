"""The rooms and their doors (docs/architecture.md), checked on the source with ``ast``.

* format/ is pure: bytes in, records out; no I/O, no threads, nothing of the package but
  itself, the errors and _runs.
* engine/ knows no VM and no operation (nor the format: it moves bytes it is told to).
* format/, layout, image and ops/ never import vm/: the built-in guests are one client of
  the operations, not a part of them.
* cli/ imports only the operations (ops/, vm.ops), the errors, and the package's version.
* Descriptors, O_DIRECT, mappings and threads are engine/'s (and vm/'s, for KVM).
* No module imports another module's private name; every ``__all__`` name exists.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import mappedram

SRC = Path(mappedram.__file__).parent
MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")
IO_MODULES = {"os", "io", "threading", "socket", "mmap", "fcntl", "subprocess", "concurrent", "multiprocessing"}
#: Calls that open descriptors, map memory, bypass the page cache or start threads.
IO_CALLS = {("os", "open"), ("os", "pread"), ("os", "pwrite"), ("os", "preadv"), ("os", "pwritev"),
            ("mmap", "mmap"), ("threading", "Thread"), ("os", "O_DIRECT"), ("fcntl", "ioctl"),
            ("fcntl", "flock")}  # fmt: skip


def _name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> str:
    """``mappedram.vm.ops`` -> ``vm``; ``mappedram.image`` -> ``image``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names imported from it) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
    return out


def _internal(path: Path) -> set[str]:
    return {m for m, _ in _imports(path) if m == "mappedram" or m.startswith("mappedram.")}


def _in(path: Path, room: str) -> bool:
    return _room(_name(path)) == room


@pytest.mark.parametrize("path", [p for p in MODULES if _in(p, "format")], ids=_name)
def test_format_is_pure(path: Path) -> None:
    roots = {m.split(".")[0] for m, _ in _imports(path)}
    assert not roots & IO_MODULES, f"{path.name} imports {roots & IO_MODULES}"
    allowed = ("mappedram.format", "mappedram.errors", "mappedram._runs")
    assert {m for m in _internal(path) if not m.startswith(allowed)} == set()


@pytest.mark.parametrize("path", [p for p in MODULES if _in(p, "engine")], ids=_name)
def test_engine_knows_no_vm_no_operation_no_format(path: Path) -> None:
    bad = {m for m in _internal(path) if _room(m) in ("vm", "ops", "cli", "format", "image", "layout")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if _room(_name(p)) in ("format", "layout", "image", "ops", "")],
                         ids=_name)  # fmt: skip
def test_only_the_cli_and_vm_know_the_built_in_guests(path: Path) -> None:
    bad = {m for m in _internal(path) if _room(m) in ("vm", "cli")}
    assert not bad, f"{_name(path)} imports {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if _in(p, "cli")], ids=_name)
def test_cli_imports_operations_and_errors_only(path: Path) -> None:
    for module, names in _imports(path):
        if not module.startswith("mappedram"):
            continue
        ok = (
            module in ("mappedram.errors", "mappedram.vm.ops")
            or module == "mappedram.ops" or module.startswith("mappedram.ops.")
            or module.startswith("mappedram.cli")
            or (module == "mappedram" and set(names) <= {"__version__", "ops"})
            or (module == "mappedram.vm" and set(names) <= {"ops", "config"})
            or module == "mappedram.vm.config"
        )  # fmt: skip
        assert ok, f"{_name(path)} imports {module} {names}"


@pytest.mark.parametrize("path", [p for p in MODULES if _room(_name(p)) not in ("engine", "vm")], ids=_name)
def test_descriptors_mappings_and_threads_are_the_engines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    used = {
        (node.value.id, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    }
    if _name(path) == "mappedram.cli":
        used.discard(("os", "open"))  # a broken stdout pipe is pointed at /dev/null: stdio, not page I/O
    assert not used & IO_CALLS, f"{_name(path)} uses {used & IO_CALLS}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_private_names_across_modules(path: Path) -> None:
    for module, names in _imports(path):
        if not module.startswith("mappedram"):
            continue
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{_name(path)} imports {private} from {module}"
        last = module.rpartition(".")[2]
        assert not last.startswith("_") or module == "mappedram._runs", f"{_name(path)} imports {module}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_every_public_name_exists(path: Path) -> None:
    module = importlib.import_module(_name(path))
    for name in getattr(module, "__all__", ()):
        assert hasattr(module, name), f"{_name(path)}.__all__ names {name!r}, which it does not define"


def test_package_api() -> None:
    for name in mappedram.__all__:
        assert hasattr(mappedram, name), name
    assert not [p for p in MODULES if p.name != "__init__.py" and "__all__" not in p.read_text()]


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md is the map: every module is on it."""
    doc = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    missing = [_name(p) for p in MODULES if p.name != "__init__.py"
               and f"{p.parent.name}/{p.name}" not in doc and f"`{p.name}`" not in doc]  # fmt: skip
    assert not missing, f"docs/architecture.md does not place {missing}"

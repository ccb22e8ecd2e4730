"""The CLI starts without loading the operations: a command imports what it runs (every
save and restore a user times includes the start-up), and lazy names still resolve."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import mappedram
from mappedram import ops

LIGHT = {"mappedram", "mappedram.errors", "mappedram.ops", "mappedram.ops.options", "mappedram.ops.converge",
         "mappedram.vm", "mappedram.vm.config"}  # fmt: skip


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return set(json.loads(out))


def test_building_the_parser_loads_no_operation() -> None:
    loaded = _modules_after("from mappedram.cli import build_parser; build_parser()")
    ours = {m for m in loaded if m.startswith("mappedram") and not m.startswith("mappedram.cli")}
    assert ours <= LIGHT, sorted(ours - LIGHT)
    assert "numpy" not in loaded


def test_a_command_loads_what_it_runs_only() -> None:
    loaded = _modules_after("from mappedram import ops\nops.save")
    assert "mappedram.ops.writer" in loaded
    assert not {"mappedram.vm.kvm", "mappedram.vm.ops", "mappedram.ops.server", "mappedram.ops.zstd"} & loaded


def test_every_public_name_resolves_to_its_module_object() -> None:
    for name in ops.__all__:
        value = getattr(ops, name)
        module = importlib.import_module(f"mappedram.ops.{ops._WHERE[name]}")
        assert value is getattr(module, name), name
    for name in mappedram.__all__:
        assert getattr(mappedram, name) is not None
    assert set(ops._WHERE) == set(ops.__all__)


def test_a_submodule_import_does_not_hide_a_function_of_the_same_package() -> None:
    code = "import mappedram.ops.server\nfrom mappedram import ops\nprint(callable(ops.serve), type(ops.serve).__name__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["True", "function"]


def test_the_cli_lists_the_seal_algorithms_the_format_knows() -> None:
    from mappedram.format.seal import ALGORITHMS

    assert ops.SEAL_ALGORITHMS == ALGORITHMS

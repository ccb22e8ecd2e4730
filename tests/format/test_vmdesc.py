"""The vmdesc trailer describes the stream as QEMU's own does, and verify says where it does not.

QEMU's own files (the vectors and libvirt's images, QEMU 10.0.2) are the oracle for the
configuration entry: ours must equal theirs for the same machine type and format. The
crafted trailers below are the failures QEMU's analyze-migration.py reports ("Unknown
section type: 5", "Subsection ... not found"): verify must name each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import mappedram
from mappedram import ops
from mappedram.format.encoder import encode_vmdesc
from mappedram.format.vmdesc import configuration_entry, configuration_entry_of, describe_configuration
from mappedram.ops import EngineOptions
from tests.helpers import DATA as TEST_DATA
from tests.helpers.vectors import VECTORS, unzstd_sparse

QEMU_FILES = {("pc", True): "pc-64M-mapped-ram", ("pc", False): "pc-64M-legacy",
              ("q35", True): "q35-64M-mapped-ram", ("q35", False): "q35-64M-legacy"}  # fmt: skip


def _trailer(path: Path) -> dict[str, Any]:
    with mappedram.open_file(path) as mf:
        assert mf.vmdesc is not None
        return dict(mf.vmdesc.data)


def _with_trailer(src: Path, dst: Path, edit: Any) -> None:
    """``dst``: ``src`` with its trailer's JSON replaced by ``edit(trailer dict)``."""
    with mappedram.open_file(src) as mf:
        assert mf.vmdesc is not None
        cut, data = mf.vmdesc.offset, json.loads(mf.vmdesc.raw)
    edit(data)
    with open(src, "rb") as f:
        head = f.read(cut)
    dst.write_bytes(head + encode_vmdesc(json.dumps(data).encode()))


@pytest.fixture(scope="module")
def qemu_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    out = tmp_path_factory.mktemp("qemu-trailers")
    files = {}
    for key, name in QEMU_FILES.items():
        files[key] = out / f"{name}.mig"
        unzstd_sparse(TEST_DATA / "qemu" / f"{name}.mig.zst", files[key])
    return files


# -- the entry QEMU writes --------------------------------------------------------------


@pytest.mark.parametrize("name", VECTORS)
def test_entry_equals_qemus_for_every_vector(name: str, vector: Any) -> None:
    path, offset = vector(name)
    with mappedram.open_file(path, offset) as mf:
        assert mf.vmdesc is not None
        assert next(iter(mf.vmdesc.data)) == "configuration"
        assert configuration_entry_of(mf.configuration) == mf.vmdesc.data["configuration"]
    assert ops.verify(path, offset).ok


def test_entry_of_two_capabilities_is_one_compressed_array() -> None:
    # vmstate_save_state_v: a VARRAY of capabilities is one entry, array_len 2, size of the first
    entry = configuration_entry("pc-q35-10.0", ("x-ignore-shared", "mapped-ram"))
    caps = entry["subsections"][0]["fields"]
    assert caps[1] == {"name": "capabilities", "array_len": 2, "type": "capability", "size": 16}
    assert list(caps[1]) == ["name", "array_len", "type", "size"]
    assert entry["fields"][1] == {"name": "name", "type": "buffer", "size": 11}
    assert "subsections" not in configuration_entry("pc-q35-10.0", ())


def test_entry_orders_subsections_as_the_stream() -> None:
    entry = configuration_entry("m", ("mapped-ram",), target_page_bits=12, uuid=bytes(16))
    names = [s["vmsd_name"] for s in entry["subsections"]]
    assert names == ["configuration/target-page-bits", "configuration/capabilities", "configuration/uuid"]
    assert entry["subsections"][2]["fields"] == [{"name": "uuid.data", "array_len": 16, "type": "uint8", "size": 1}]


def test_describe_keeps_a_right_trailer_byte_for_byte(qemu_files: dict[tuple[str, bool], Path]) -> None:
    with mappedram.open_file(qemu_files[("q35", True)]) as mf:
        assert mf.vmdesc is not None
        raw, entry = mf.vmdesc.raw, configuration_entry_of(mf.configuration)
    assert describe_configuration(raw, entry) is raw
    stripped = json.loads(raw)
    del stripped["configuration"]
    fixed = describe_configuration(json.dumps(stripped).encode(), entry)
    assert fixed == raw  # QEMU's text again: the entry first, QEMU's JSON style
    assert "configuration" not in json.loads(describe_configuration(raw, None))


# -- every writer describes what it wrote ------------------------------------------------


@pytest.mark.parametrize("to", ["mapped-ram", "legacy"])
@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("source", [True, False], ids=["from-mapped-ram", "from-legacy"])
def test_convert_describes_the_format_it_writes(
    tmp_path: Path, qemu_files: dict[tuple[str, bool], Path], machine: str, source: bool, to: str
) -> None:
    out = tmp_path / "out.mig"
    ops.convert(qemu_files[(machine, source)], out, to=to, options=EngineOptions(channels=2))
    want = _trailer(qemu_files[(machine, to == "mapped-ram")])
    got = _trailer(out)
    assert got["configuration"] == want["configuration"], (got["configuration"], want["configuration"])
    ours = [k for k in got if k != "mappedram"]
    assert ours == list(want) and got["devices"] == want["devices"]
    assert ("mappedram" in got) == (to == "mapped-ram")  # the clean-slot promise, mapped-ram only
    assert ops.verify(out).ok


@pytest.mark.parametrize("image", ["pc-64M-raw", "pc-64M-sparse", "pc-64M-sparse-parallel2"])
def test_rewrite_of_a_libvirt_image_describes_mapped_ram(
    tmp_path: Path, qemu_files: dict[tuple[str, bool], Path], image: str
) -> None:
    src, out = tmp_path / f"{image}.save", tmp_path / "out.mig"
    unzstd_sparse(TEST_DATA / "libvirt" / f"{image}.save.zst", src)
    ops.rewrite(src, out, options=EngineOptions(channels=2))
    assert _trailer(out)["configuration"] == _trailer(qemu_files[("pc", True)])["configuration"]
    assert ops.verify(out).ok


def test_save_describes_its_configuration(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    out = tmp_path / "out.mig"
    ops.save(out, {"m0": bytes(1 << 20)}, machine_type="pc-q35-10.0")
    got = _trailer(out)
    assert list(got) == ["configuration", "page_size", "devices", "mappedram"] and got["devices"] == []
    assert got["mappedram"] == {"clean-zero-slots": True}
    assert got["configuration"] == _trailer(qemu_files[("q35", True)])["configuration"]
    assert ops.verify(out).ok


# -- verify names what QEMU's tools would reject -----------------------------------------


def _problem(path: Path) -> Any:
    report = ops.verify(path)
    assert not report.ok and report.problems, report
    return report.problems[0]


def _trailer_offset(path: Path) -> int:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    at = data.rfind(b"\x06", 0, size)
    while int.from_bytes(data[at + 1 : at + 5], "big") != size - at - 5:
        at = data.rfind(b"\x06", 0, at)
    return at + 5


def test_trailer_without_configuration_entry(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    """What this project wrote before: analyze-migration.py says "Unknown section type: 5"."""
    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("q35", True)], bad, lambda d: d.pop("configuration"))
    p = _problem(bad)
    assert p.offset == _trailer_offset(bad) and "configuration/capabilities" in str(p.expected), p


def test_trailer_describes_a_subsection_the_stream_lacks(
    tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]
) -> None:
    """A legacy stream with mapped-ram's description ("Subsection configuration/capabilities not found")."""
    mapped = _trailer(qemu_files[("q35", True)])["configuration"]
    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("q35", False)], bad, lambda d: d.update(configuration=mapped))
    p = _problem(bad)
    assert p.offset == _trailer_offset(bad), p
    assert "'configuration/capabilities' is described but not in the stream" in p.message, p


def test_trailer_misses_a_subsection_the_stream_holds(
    tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]
) -> None:
    legacy = _trailer(qemu_files[("q35", False)])["configuration"]
    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("q35", True)], bad, lambda d: d.update(configuration=legacy))
    p = _problem(bad)
    assert "does not describe subsection 'configuration/capabilities'" in p.message, p


def test_trailer_with_a_wrong_field_size(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["devices"][0]["fields"][0]["size"] += 1

    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("pc", True)], bad, edit)
    p = _problem(bad)
    assert "device section 'timer'" in p.message, p


def test_trailer_with_a_wrong_device_version(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["devices"][1]["version"] += 1

    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("pc", True)], bad, edit)
    p = _problem(bad)
    assert p.field == "vmdesc version" and "devices[1]" in p.message, p


def test_trailer_missing_a_device(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("pc", True)], bad, lambda d: d["devices"].pop())
    p = _problem(bad)
    described = len(_trailer(qemu_files[("pc", True)])["devices"]) - 1
    assert f"after the {described} device sections the vmdesc trailer" in p.message and "globalstate" in p.message, p


def test_trailer_with_a_device_the_stream_lacks(tmp_path: Path, qemu_files: dict[tuple[str, bool], Path]) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["devices"].insert(3, dict(d["devices"][3], name="phantom"))

    bad = tmp_path / "bad.mig"
    _with_trailer(qemu_files[("pc", True)], bad, edit)
    p = _problem(bad)
    assert "describes device section 3 as 'phantom'" in p.message, p

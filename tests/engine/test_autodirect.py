"""``--direct-io auto``: the probe, its rule, its cache; and the three modes of resolve_direct."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mappedram.engine import autodirect
from mappedram.engine.autodirect import choose_direct_io, filesystem_key
from mappedram.errors import IOEngineError
from mappedram.ops.options import EngineOptions, direct_mode
from mappedram.ops.protocol import resolve_direct


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MAPPEDRAM_CACHE_DIR", str(d))
    autodirect.forget()
    yield d / "direct-io.json"
    autodirect.forget()


def _entry(write_direct: float, write_buffered: float, read_direct: float, read_buffered: float,
           measured: float | None = None) -> dict[str, float]:  # fmt: skip
    return {"write_direct_bps": write_direct, "write_buffered_bps": write_buffered, "read_direct_bps": read_direct,
            "read_buffered_bps": read_buffered, "measured": time.time() if measured is None else measured,
            "probe": autodirect.PROBE_VERSION}  # fmt: skip


def test_probe_measures_both_ways_and_keeps_the_result(tmp_path: Path, cache: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    first = choose_direct_io(str(work), "write")
    assert not first.cached and first.direct_bps and first.buffered_bps
    assert first.direct == (first.buffered_bps <= autodirect.PAGE_CACHE_MARGIN * first.direct_bps)
    assert first.reason.startswith("auto: O_DIRECT wrote") and "measured now" in first.reason
    assert list(work.iterdir()) == []  # the probe's files are gone
    entry = json.loads(cache.read_text())[filesystem_key(str(work))]
    assert set(entry) == {"write_direct_bps", "write_buffered_bps", "read_direct_bps", "read_buffered_bps", "measured",
                          "probe"}  # fmt: skip
    assert entry["probe"] == autodirect.PROBE_VERSION
    # the same filesystem again: no probe (in memory), then from the file (a new process)
    again = choose_direct_io(str(tmp_path), "read")
    assert again.cached and "read" in again.reason and "measured earlier" in again.reason
    autodirect.forget()
    from_file = choose_direct_io(str(work), "write")
    assert from_file.cached and from_file.direct_bps == first.direct_bps


@pytest.mark.parametrize(
    ("figures", "write", "read"),
    [
        ((2e9, 1e9, 2e9, 1e9), True, True),  # O_DIRECT faster both ways
        ((1e8, 1e9, 2e9, 1e9), False, True),  # a rotating disk's writes: the page cache
        ((1e9, 1e9, 0.95e9, 1e9), True, True),  # within the margin: O_DIRECT (no cache flooding)
        ((2.4e8, 4.6e8, 6e8, 1.04e9), True, True),  # the page cache 1.9x and 1.7x as fast: still O_DIRECT
        ((1e9, 1e9, 0.3e9, 1e9), True, False),  # the page cache 3.3x as fast
    ],
)
def test_the_rule_on_measured_figures(tmp_path: Path, cache: Path, figures: tuple[float, ...], write: bool,
                                      read: bool) -> None:  # fmt: skip
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({filesystem_key(str(tmp_path)): _entry(*figures)}))
    w, r = choose_direct_io(str(tmp_path), "write"), choose_direct_io(str(tmp_path), "read")
    assert (w.direct, r.direct) == (write, read)
    assert w.cached and r.cached
    assert w.reason.endswith("O_DIRECT" if write else "the page cache")
    assert f"{figures[0] / 1e9:.2f} GB/s" in w.reason and f"{figures[1] / 1e9:.2f} GB/s" in w.reason


@pytest.mark.parametrize("content", ["not json", "[]", '{"KEY": {"write_direct_bps": "fast"}}', "OLD", "OTHER PROBE"])
def test_a_bad_or_stale_cache_is_measured_again(tmp_path: Path, cache: Path, content: str) -> None:
    key = filesystem_key(str(tmp_path))
    cache.parent.mkdir(parents=True)
    if content == "OLD":
        content = json.dumps({key: _entry(1, 2, 1, 2, measured=time.time() - autodirect.CACHE_SECONDS - 10)})
    elif content == "OTHER PROBE":  # figures of an earlier probe (one thread, 32 MiB)
        content = json.dumps({key: {**_entry(1, 2, 1, 2), "probe": autodirect.PROBE_VERSION - 1}})
    cache.write_text(content.replace("KEY", key))
    choice = choose_direct_io(str(tmp_path), "write")
    assert not choice.cached and "measured now" in choice.reason
    assert json.loads(cache.read_text())[key]["write_direct_bps"] == choice.direct_bps


def test_an_unwritable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MAPPEDRAM_CACHE_DIR", str(tmp_path / "file" / "below"))  # a file where a directory should be
    autodirect.forget()
    try:
        assert choose_direct_io(str(tmp_path), "write").reason.startswith("auto:")
    finally:
        autodirect.forget()


def test_a_directory_the_probe_cannot_write_gets_the_page_cache(cache: Path) -> None:
    choice = choose_direct_io("/proc/self", "read")
    assert not choice.direct and choice.direct_bps is None
    assert "/proc/self" in choice.reason and choice.reason.endswith("the page cache")
    assert not cache.exists()


def test_resolve_direct_modes(tmp_path: Path, cache: Path) -> None:
    target = str(tmp_path / "out.mig")
    assert resolve_direct(target, EngineOptions(direct_io="off"), "write").direct is False
    assert resolve_direct(target, EngineOptions(direct_io=False), "write").reason.startswith("off")
    on = resolve_direct(target, EngineOptions(direct_io=True), "write")
    assert on.direct and on.reason.startswith("on")
    assert resolve_direct(target, EngineOptions(), "write").reason.startswith("auto")
    with pytest.raises(IOEngineError, match="--direct-io off or auto"):
        resolve_direct("/proc/self/x", EngineOptions(direct_io="on"), "write")
    fallback = resolve_direct("/proc/self/x", EngineOptions(direct_io="on", direct_io_fallback=True), "write")
    assert not fallback.direct and "fallback" in fallback.reason
    with pytest.raises(ValueError, match="auto, on, off"):
        direct_mode("fast")  # type: ignore[arg-type]


def test_filesystem_key_names_the_mount(tmp_path: Path) -> None:
    key = filesystem_key(str(tmp_path))
    dev = os.stat(tmp_path).st_dev
    assert key.startswith(f"{os.major(dev)}:{os.minor(dev)} ")
    assert filesystem_key("/proc") != key

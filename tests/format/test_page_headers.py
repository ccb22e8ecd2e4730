"""encode_page_headers_into: PAGE records laid out for pages read in place, named every N records."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mappedram.format.encoder import encode_page_headers_into, encode_page_records, page_headers_size

PS = 4096


def _fill(idstr: str, pages: np.ndarray, data: np.ndarray, name_every: int) -> bytes:
    out = np.zeros(page_headers_size(idstr, len(pages), PS, name_every), dtype=np.uint8)
    starts, at = encode_page_headers_into(idstr, pages.astype(np.uint64) * PS, PS, out, name_every=name_every)
    assert int(starts[-1]) == len(out)
    for i, a in enumerate(at.tolist()):
        out[a : a + PS] = data[i]
    return out.tobytes()


def test_one_name_equals_the_record_encoder() -> None:
    rng = np.random.default_rng(1)
    pages = np.arange(10, 30, dtype=np.int64)
    data = rng.integers(1, 255, size=(len(pages), PS), dtype=np.uint8)
    ours = _fill("pc.ram", pages, data, name_every=1 << 30)
    [theirs] = encode_page_records("pc.ram", 10 * PS, data, np.ones(len(pages), dtype=np.bool_))
    assert ours == theirs


@given(n=st.integers(1, 40), every=st.integers(1, 50), gaps=st.lists(st.integers(1, 5), min_size=40, max_size=40))
def test_every_run_of_name_every_records_stands_alone(n: int, every: int, gaps: list[int]) -> None:
    """Records k*every .. (k+1)*every, sent alone, are what the record encoder makes of those pages."""
    pages = np.cumsum(np.array(gaps[:n], dtype=np.int64))
    data = np.zeros((n, PS), dtype=np.uint8)
    data[:, 0] = np.arange(n) + 1
    blob = _fill("m0", pages, data, every)
    out = np.frombuffer(blob, dtype=np.uint8)
    starts, _ = encode_page_headers_into("m0", pages.astype(np.uint64) * PS, PS, out.copy(), name_every=every)
    for a in range(0, n, every):
        b = min(a + every, n)
        run = blob[int(starts[a]) : int(starts[b])]
        expected = b"".join(
            encode_page_records("m0", int(p) * PS, data[i : i + 1], np.ones(1, dtype=np.bool_))[0][: 8 + 3 + PS]
            if i == a
            else (int(p) * PS | 0x08 | 0x20).to_bytes(8, "big") + data[i].tobytes()
            for i, p in zip(range(a, b), pages[a:b].tolist())
        )
        assert run == expected


def test_too_small_an_output_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_page_headers_into("m0", np.arange(4, dtype=np.uint64) * PS, PS, np.zeros(100, np.uint8), name_every=2)

"""Hypothesis strategies shared by the property tests (one place, as attrs keeps tests/strategies.py)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from .patterns import random_pages

__all__ = ["bits", "block_list", "pages", "named_blocks", "page_rewrites", "auto_converge_params", "pass_bytes"]

#: A dirty bitmap: 1 .. 700 bools.
bits: st.SearchStrategy[npt.NDArray[np.bool_]] = st.lists(st.booleans(), min_size=1, max_size=700).map(
    lambda b: np.array(b, dtype=np.bool_)
)

#: RAM blocks for the layout planner: (idstr, used_length) with unique names and whole pages.
block_list = st.lists(
    st.tuples(st.text("abcdefgh/.@0123", min_size=1, max_size=40), st.integers(1, 5000).map(lambda n: n * 4096)),
    min_size=1,
    max_size=6,
    unique_by=lambda t: t[0],
)

#: The bytes of 1 .. 24 pages, some of them zero (random_pages's pattern).
pages = st.builds(
    lambda n, seed, frac: random_pages(n, frac, seed).tobytes(),
    st.integers(1, 24),
    st.integers(0, 2**32),
    st.sampled_from([0.0, 0.3, 0.7, 1.0]),
)

#: 1 .. 3 RAM blocks with QEMU-like names and their bytes.
named_blocks = st.lists(
    st.tuples(st.sampled_from(["pc.ram", "/rom@etc/acpi/tables", "vga.vram", "a"]), pages),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t[0],
)

#: Later passes' page writes for a block of up to 24 pages: (page, None for a zero page or a fill byte).
page_rewrites = st.lists(
    st.tuples(st.integers(0, 23), st.one_of(st.none(), st.binary(min_size=1, max_size=1))), max_size=30
)

#: QEMU's auto-converge parameters, in the ranges QEMU accepts (the initial throttle not above the maximum).
auto_converge_params = st.fixed_dictionaries(
    {
        "throttle_trigger_threshold": st.integers(1, 100),
        "cpu_throttle_initial": st.integers(1, 99),
        "cpu_throttle_increment": st.integers(1, 99),
        "cpu_throttle_tailslow": st.booleans(),
        "max_cpu_throttle": st.integers(1, 99),
    }
).filter(lambda p: p["cpu_throttle_initial"] <= p["max_cpu_throttle"])

#: Passes as (bytes dirtied, bytes sent).
pass_bytes = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 1 << 32)), min_size=1, max_size=40)

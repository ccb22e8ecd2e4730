"""RAM patterns for tests, vectorised with numpy."""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
PAGE = 4096


def mix64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def qemu_vector_pattern(size: int, seed: int, zero_permille: int) -> bytes:
    """The test vectors' RAM: page i is zero iff (h(i) >> 32) % 1000 < zero_permille, else
    w[0] = i, w[1..510] = h(i), w[511] = ~i, with h(i) = mix64(seed + (i + 1) * GOLDEN)."""
    n = size // PAGE
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(np.uint64(seed) + (i + np.uint64(1)) * GOLDEN)
    zero = ((h >> np.uint64(32)) % np.uint64(1000)) < np.uint64(zero_permille)
    words = np.repeat(h[:, None], 512, axis=1)
    words[:, 0] = i
    words[:, 511] = ~i
    words[zero] = 0
    return words.astype("<u8").tobytes()


def random_pages(num_pages: int, zero_fraction: float, seed: int) -> np.ndarray:
    """``num_pages`` pages (uint8 array of num_pages * PAGE) with about ``zero_fraction`` zero pages.

    Non-zero pages hold their index and random words; some hold a single non-zero byte at a
    random position, to catch zero detection that looks at only part of a page.
    """
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 2**63, size=(num_pages, PAGE // 8), dtype=np.uint64)
    words[:, 0] = np.arange(num_pages, dtype=np.uint64)
    data = words.view(np.uint8).reshape(num_pages, PAGE)
    zero = rng.random(num_pages) < zero_fraction
    data[zero] = 0
    single = (~zero) & (rng.random(num_pages) < 0.05)
    if single.any():
        data[single] = 0
        pos = rng.integers(0, PAGE, size=int(single.sum()))
        data[np.flatnonzero(single), pos] = 0x5A
    return data.reshape(-1)

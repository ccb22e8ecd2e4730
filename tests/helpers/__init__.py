"""Helpers shared by the tests: stream builders, RAM patterns, the QEMU harness, hypothesis strategies."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TESTS", "DATA", "ROOT"]

#: The tests' directory, its data, and the checkout.
TESTS = Path(__file__).resolve().parent.parent
DATA = TESTS / "data"
ROOT = TESTS.parent

"""Incremental snapshots: a child file and the parent it names.

A child is a mapped-ram file that lists the ``mappedram-child`` capability (QEMU refuses
it: it is not a whole guest) and whose trailer names its parent::

    "mappedram": {"parent": {"path": "base.mig", "stream_bytes": 73416795, "digest": "<64 hex>"}}

Its bitmap marks the pages it holds, the pages changed since the parent (a changed page
that became zero is marked, its slot reads as zeros); every other page is the parent's,
itself a whole file or another child. ``path`` is relative to the child's directory
unless absolute. ``stream_bytes`` is the parent's size up to its vmdesc trailer (sealing
the parent in place rewrites only the trailer). ``digest`` is :func:`content_root` of the parent's RAM as a restore
reads it: a changed parent (another file put in its place, a page rewritten, blocks of
another size) is refused, not read through.

The root is a BLAKE3 digest over the parent's block list and the unkeyed BLAKE3 seal
digests of its chunks (format/seal.py; 1 MiB, larger only for RAM above 128 GiB): the
parent is read to compute it, when the child is made and whenever a reader checks the
chain before its first destination byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import blake3

from mappedram.errors import FormatError

from .seal import Seal

__all__ = ["MAX_CHAIN", "ROOT_ALGORITHM", "ParentRef", "decode_parent", "encode_parent", "content_root"]

#: Children above one whole file at most (a longer chain is refused as a probable cycle).
MAX_CHAIN = 64
ROOT_ALGORITHM = "blake3"
_DOMAIN = b"mappedram-chain-v1 root\x00"
_KEYS = {"path", "stream_bytes", "digest"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ParentRef:
    path: str
    stream_bytes: int  # the parent's bytes before its vmdesc trailer
    digest: bytes


def encode_parent(ref: ParentRef) -> dict[str, Any]:
    return {"path": ref.path, "stream_bytes": ref.stream_bytes, "digest": ref.digest.hex()}


def decode_parent(value: Any, *, offset: int) -> ParentRef:
    """The trailer's parent entry, checked (FormatError naming the field otherwise)."""

    def fail(message: str, field: str, expected: object, actual: object) -> FormatError:
        return FormatError(f"chain: {message}", offset=offset,
                           field="vmdesc mappedram.parent" + (f".{field}" if field else ""),
                           expected=expected, actual=actual)  # fmt: skip

    if not isinstance(value, dict):
        raise fail("the parent entry is not an object", "", "an object", type(value).__name__)
    if set(value) != _KEYS:
        raise fail("the parent entry has other keys", "", sorted(_KEYS), sorted(value))
    path, size, digest = value["path"], value["stream_bytes"], value["digest"]
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise fail("the parent's path is not a file name", "path", "a non-empty string", repr(path)[:80])
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 62:
        raise fail("the parent's stream size is not a size", "stream_bytes", "a positive integer", repr(size)[:80])
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise fail("the parent's digest is not 64 hex digits", "digest", "64 lowercase hex digits", repr(digest)[:80])
    return ParentRef(path, size, bytes.fromhex(digest))


def content_root(seal: Seal) -> bytes:
    """The chain digest of the RAM ``seal`` describes (an unkeyed BLAKE3 seal)."""
    if seal.algorithm != ROOT_ALGORITHM or seal.keyed:
        raise ValueError("a content root is taken over an unkeyed blake3 seal")
    h = blake3.blake3(_DOMAIN + seal.chunk_bytes.to_bytes(8, "big"))
    for b in seal.blocks:
        name = b.idstr.encode("utf-8")
        h.update(len(name).to_bytes(2, "big") + name + b.used_length.to_bytes(8, "big") + b.digests)
    return h.digest()

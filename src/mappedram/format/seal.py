"""Integrity manifests ("seals"): digests of a file's RAM as a restore reads it, and of the rest.

A seal is stored in the vmdesc trailer, under the project's extension key
(``trailer["mappedram"]["seal"]``), which QEMU's loader skips unparsed and
analyze-migration.py ignores. This module is the pure part: the digests of bytes handed
in, the manifest to and from its JSON value, and the trailer bytes that carry it.

What is digested (version 1). RAM is cut into chunks of ``chunk_bytes`` (1 MiB: 256
pages) of each block's content *as a restore reads it*: a page that reads as zeros (a
mapped-ram page whose bit is 0, whatever its slot holds; a legacy page last sent as ZERO,
or never sent) is digested as zeros, so the digests do not depend on the format or the
layout. The other digest, ``state``, covers everything else a restore or an export uses:
the configuration section's bytes, the block list (idstr and used_length, in order), the
device state (device sections and QEMU_VM_EOF) and the trailer itself without the seal,
as canonical JSON (its ``clean-zero-slots`` flag decides what a mapped restore shows; its
device descriptions steer how ``export`` decodes the CPUs).

With algorithm A (``blake3`` or ``sha256``) and key K (none: unkeyed)::

    inner(data)     = A(data)                          (never keyed: the zero chunk's is cached)
    mac(message)    = A(message); keyed: BLAKE3's keyed hash with K, or HMAC-SHA256 with K
    chunk c of b    = mac("mappedram-seal-v1 chunk\\0" || u8 len(idstr) || idstr || be64 c
                          || be64 len(data) || inner(data))
    state           = mac("mappedram-seal-v1 state\\0" || be32 chunk_bytes
                          || be64 len(config) || config || be32 n || (u8 len || idstr || be64 used_length) * n
                          || be64 len(device) || device || be64 len(desc) || desc)

A chunk's digest names its block and place, so chunks cannot be swapped or moved between
blocks, and a wrong key fails every chunk. K is derived from the key file's bytes:
BLAKE3's derive_key mode (context :data:`KEY_CONTEXT`), or SHA-256 of the context and the
bytes for HMAC-SHA256.

The trailer's JSON must stay where analyze-migration.py finds it: it reads the file's
last 10 MiB, takes the last NUL byte and the first ``{`` after it. So the digests of a
guest of more than 128 GiB are taken over larger chunks (:func:`choose_chunk_bytes`), and
the JSON is padded with spaces so that no byte of its be32 length is ``{``
(:func:`trailer_bytes`).

References:
    QEMU migration/savevm.c (qemu_loadvm_state: the trailer is read and discarded),
    scripts/analyze-migration.py (read_migration_debug_json); BLAKE3 (keyed_hash,
    derive_key); RFC 2104 (HMAC).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3

from mappedram.errors import FormatError, UsageError

from .encoder import encode_vmdesc
from .vmdesc import EXTENSION_KEY, SEAL, set_extension

__all__ = [
    "SEAL_VERSION",
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DIGEST_SIZE",
    "CHUNK_BYTES",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "KEY_CONTEXT",
    "MIN_KEY_BYTES",
    "MAX_KEY_BYTES",
    "SealKey",
    "Digester",
    "BlockDigests",
    "Seal",
    "chunk_count",
    "choose_chunk_bytes",
    "unsealed_description",
    "encode_seal",
    "decode_seal",
    "trailer_bytes",
]

SEAL_VERSION = 1
ALGORITHMS = ("blake3", "sha256")
DEFAULT_ALGORITHM = "blake3"
#: Every digest is 32 bytes (64 hex characters).
DIGEST_SIZE = 32
#: RAM per digest: 1 MiB, 256 pages of 4 KiB.
CHUNK_BYTES = 1 << 20
#: Digests a seal holds at most at CHUNK_BYTES (128 GiB of RAM: 8 MiB of hex); a larger
#: guest gets larger chunks, so the trailer stays inside analyze-migration.py's 10 MiB window.
MAX_CHUNKS = 1 << 17
#: The largest chunk a seal may claim.
MAX_CHUNK_BYTES = 1 << 30
#: BLAKE3 derive_key context of the seal's key.
KEY_CONTEXT = "mappedram 2026 seal key v1"
#: A key file holds at least this many bytes (and at most MAX_KEY_BYTES).
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 1 << 16

_CHUNK_DOMAIN = b"mappedram-seal-v1 chunk\x00"
_STATE_DOMAIN = b"mappedram-seal-v1 state\x00"
_HEX = re.compile(r"[0-9a-f]*")
_SEAL_KEYS = {"version", "algorithm", "keyed", "chunk_bytes", "state", "blocks"}
_BLOCK_KEYS = {"idstr", "used_length", "digests"}
#: The byte analyze-migration.py looks for after the last NUL: the JSON's first.
_BRACE = 0x7B


class SealKey:
    """The bytes of a key file, from which each algorithm's key is derived.

    Its ``repr`` and ``str`` never show the bytes, so a key cannot leak into a report, a
    log or a traceback's locals by being printed."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if not MIN_KEY_BYTES <= len(material) <= MAX_KEY_BYTES:
            raise UsageError(f"a seal key must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, not {len(material)} "
                             f"(make one with: head -c 32 /dev/urandom > KEYFILE; chmod 600 KEYFILE)")  # fmt: skip
        self._material = bytes(material)

    def derive(self, algorithm: str) -> bytes:
        """The 32-byte key of ``algorithm`` (module docstring)."""
        if algorithm == "blake3":
            return blake3.blake3(self._material, derive_key_context=KEY_CONTEXT).digest()
        return hashlib.sha256(KEY_CONTEXT.encode("ascii") + b"\x00" + self._material).digest()

    def __repr__(self) -> str:
        return "SealKey(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a SealKey is not pickled")


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown seal algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


class Digester:
    """The digests of one algorithm and key (None: unkeyed). Safe to share between threads:
    each call makes its own hash object."""

    __slots__ = ("_key", "algorithm", "keyed")

    def __init__(self, algorithm: str, key: SealKey | None = None) -> None:
        _check_algorithm(algorithm)
        self.algorithm = algorithm
        self.keyed = key is not None
        self._key = None if key is None else key.derive(algorithm)

    def __repr__(self) -> str:
        return f"Digester({self.algorithm!r}, keyed={self.keyed})"

    def inner(self, data: bytes | bytearray | memoryview) -> bytes:
        """The unkeyed digest of a chunk's bytes."""
        if self.algorithm == "blake3":
            return blake3.blake3(data).digest()
        return hashlib.sha256(data).digest()

    def mac(self, message: bytes) -> bytes:
        if self._key is None:
            return blake3.blake3(message).digest() if self.algorithm == "blake3" else hashlib.sha256(message).digest()
        if self.algorithm == "blake3":
            return blake3.blake3(message, key=self._key).digest()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def chunk(self, idstr: str, index: int, length: int, inner: bytes) -> bytes:
        """The digest of chunk ``index`` of block ``idstr``: ``length`` bytes whose inner digest is ``inner``."""
        name = idstr.encode("utf-8")
        return self.mac(_CHUNK_DOMAIN + bytes([len(name)]) + name + struct.pack(">QQ", index, length) + inner)

    def state(
        self,
        chunk_bytes: int,
        configuration: bytes,
        blocks: Sequence[tuple[str, int]],
        device_state: bytes,
        description: bytes,
    ) -> bytes:
        """The digest of everything but RAM (module docstring)."""
        parts = [_STATE_DOMAIN, struct.pack(">IQ", chunk_bytes, len(configuration)), configuration,
                 struct.pack(">I", len(blocks))]  # fmt: skip
        for idstr, used_length in blocks:
            name = idstr.encode("utf-8")
            parts += [bytes([len(name)]), name, struct.pack(">Q", used_length)]
        parts += [struct.pack(">Q", len(device_state)), device_state, struct.pack(">Q", len(description)), description]
        return self.mac(b"".join(parts))


def chunk_count(used_length: int, chunk_bytes: int) -> int:
    return -(-used_length // chunk_bytes)


def choose_chunk_bytes(blocks: Sequence[tuple[str, int]], page_size: int) -> int:
    """CHUNK_BYTES, doubled until the seal holds at most MAX_CHUNKS digests."""
    size = max(CHUNK_BYTES, page_size)
    while size < MAX_CHUNK_BYTES and sum(chunk_count(n, size) for _, n in blocks) > MAX_CHUNKS:
        size *= 2
    return size


def unsealed_description(data: dict[str, Any]) -> bytes:
    """The trailer's JSON without its seal, canonical (sorted keys, no spaces): what ``state`` covers."""
    rest = dict(data)
    ext = rest.pop(EXTENSION_KEY, None)
    if isinstance(ext, dict):
        ext = {k: v for k, v in ext.items() if k != SEAL}
        if ext:
            rest[EXTENSION_KEY] = ext
    elif ext is not None:
        rest[EXTENSION_KEY] = ext
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True, slots=True)
class BlockDigests:
    idstr: str
    used_length: int
    digests: bytes  # DIGEST_SIZE bytes per chunk, in order

    def digest(self, chunk: int) -> bytes:
        return self.digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE]

    @property
    def chunks(self) -> int:
        return len(self.digests) // DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class Seal:
    """A decoded seal: every block's chunk digests and the state digest."""

    algorithm: str
    keyed: bool
    chunk_bytes: int
    state: bytes
    blocks: tuple[BlockDigests, ...]
    version: int = SEAL_VERSION

    @property
    def chunks(self) -> int:
        return sum(b.chunks for b in self.blocks)


def encode_seal(seal: Seal) -> dict[str, Any]:
    """The JSON value stored at ``trailer["mappedram"]["seal"]``: one hex string per block."""
    return {
        "version": seal.version,
        "algorithm": seal.algorithm,
        "keyed": seal.keyed,
        "chunk_bytes": seal.chunk_bytes,
        "state": seal.state.hex(),
        "blocks": [{"idstr": b.idstr, "used_length": b.used_length, "digests": b.digests.hex()} for b in seal.blocks],
    }


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hex(value: object, size: int, fail: Any, field: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or _HEX.fullmatch(value) is None:
        found = f"{type(value).__name__} of {len(value)} characters" if isinstance(value, str) else type(value).__name__
        if isinstance(value, str) and len(value) == 2 * size:
            found = "characters other than 0-9 a-f"
        raise fail(f"seal {field} is not {size} bytes of lowercase hex", field, f"{2 * size} hex digits", found)
    return bytes.fromhex(value)


def decode_seal(
    value: object, blocks: Sequence[tuple[str, int]], page_size: int, *, offset: int | None = None
) -> Seal | None:
    """Check and decode a trailer's seal against the file's block list (None: no seal).

    Raises FormatError (at ``offset``, the seal's place in the file) unless the value is a
    seal of a known version and algorithm whose chunk size suits the page size and that
    covers exactly the file's blocks, in order, each with the right length and one digest
    per chunk. Nothing is allocated before each string's length was checked against the
    file's own block sizes.
    """
    if value is None:
        return None

    def fail(message: str, field: str, expected: object, actual: object) -> FormatError:
        return FormatError(message, offset=offset, field=f"vmdesc mappedram.seal{field}", expected=expected,
                           actual=actual)  # fmt: skip

    if not isinstance(value, dict):
        raise fail("seal is not a JSON object", "", "an object", type(value).__name__)
    if set(value) != _SEAL_KEYS:
        raise fail("seal has other keys than version 1 holds", "", ", ".join(sorted(_SEAL_KEYS)),
                   ", ".join(sorted(map(str, value))) or "none")  # fmt: skip
    version = _int(value["version"])
    if version != SEAL_VERSION:
        raise fail("seal version is not supported", ".version", SEAL_VERSION, str(value["version"])[:40])
    algorithm = value["algorithm"]
    if algorithm not in ALGORITHMS:
        raise fail("seal algorithm is unknown", ".algorithm", " or ".join(ALGORITHMS), str(algorithm)[:40])
    keyed = value["keyed"]
    if not isinstance(keyed, bool):
        raise fail("seal keyed is not true or false", ".keyed", "a boolean", str(keyed)[:40])
    chunk = _int(value["chunk_bytes"])
    if chunk is None or chunk < page_size or chunk > MAX_CHUNK_BYTES or chunk & (chunk - 1) or chunk % page_size:
        raise fail("seal chunk_bytes is not a power-of-two multiple of the page size", ".chunk_bytes",
                   f"{page_size:#x} .. {MAX_CHUNK_BYTES:#x}", str(value["chunk_bytes"])[:40])  # fmt: skip
    state = _hex(value["state"], DIGEST_SIZE, fail, ".state")
    listed = value["blocks"]
    if not isinstance(listed, list) or len(listed) != len(blocks):
        count = f"{len(listed)} entries" if isinstance(listed, list) else type(listed).__name__
        raise fail("seal does not cover the file's RAM blocks", ".blocks", f"{len(blocks)} entries, one per block",
                   count)  # fmt: skip
    out = []
    for i, (entry, (idstr, used_length)) in enumerate(zip(listed, blocks)):
        where = f".blocks[{i}]"
        if not isinstance(entry, dict) or set(entry) != _BLOCK_KEYS:
            raise fail("seal block entry is not idstr, used_length and digests", where,
                       ", ".join(sorted(_BLOCK_KEYS)), str(entry)[:60])  # fmt: skip
        if entry["idstr"] != idstr:
            raise fail(f"seal lists another block than the file's block {i}", where + ".idstr", idstr,
                       str(entry["idstr"])[:60])  # fmt: skip
        if _int(entry["used_length"]) != used_length:
            raise fail(f"seal gives block {idstr!r} another length than the file", where + ".used_length",
                       used_length, str(entry["used_length"])[:40])  # fmt: skip
        n = chunk_count(used_length, chunk)
        digests = entry["digests"]
        if not isinstance(digests, str) or len(digests) != 2 * DIGEST_SIZE * n:
            found = f"{len(digests) // (2 * DIGEST_SIZE)} digests ({len(digests)} characters)" if isinstance(
                digests, str) else type(digests).__name__  # fmt: skip
            raise fail(f"seal does not hold one digest per chunk of block {idstr!r}", where + ".digests",
                       f"{n} digests ({2 * DIGEST_SIZE * n} hex digits)", found)  # fmt: skip
        out.append(BlockDigests(idstr, used_length, _hex(digests, DIGEST_SIZE * n, fail, where + ".digests")))
    return Seal(algorithm, keyed, chunk, state, tuple(out), version)


def _analyzable(length: int) -> int:
    """The least length >= ``length`` none of whose be32 bytes is ``{`` (module docstring)."""
    while _BRACE in struct.pack(">I", length):
        length += 1
    return length


def trailer_bytes(json_text: bytes, seal: Seal | None) -> bytes:
    """The whole trailer (``0x06``, be32 length, JSON) of ``json_text`` with ``seal`` set
    (None: removed), padded with spaces for analyze-migration.py."""
    text = set_extension(json_text, SEAL, None if seal is None else encode_seal(seal))
    if seal is not None:
        text += b" " * (_analyzable(len(text)) - len(text))
    return encode_vmdesc(text)

"""The seal codec (format/seal.py): digests against an independent recomputation and golden
values, the manifest both ways, every lie a hostile seal can tell, and a trailer QEMU's
analyze-migration.py still finds."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import struct

import blake3
import pytest

from mappedram.errors import FormatError, UsageError
from mappedram.format.seal import (
    CHUNK_BYTES,
    DIGEST_SIZE,
    KEY_CONTEXT,
    MAX_CHUNKS,
    BlockDigests,
    Digester,
    Seal,
    SealKey,
    choose_chunk_bytes,
    chunk_count,
    decode_seal,
    encode_seal,
    trailer_bytes,
    unsealed_description,
)

KEY = SealKey(bytes(range(32)))
DATA = bytes(range(256)) * 16  # one page
BLOCKS = [("pc.ram", 3 << 20), ("pc.bios", 64 << 10)]


def _independent_chunk(algorithm: str, key: bytes | None, idstr: str, index: int, data: bytes) -> bytes:
    b3 = algorithm == "blake3"
    inner = blake3.blake3(data).digest() if b3 else hashlib.sha256(data).digest()
    name = idstr.encode()
    msg = b"mappedram-seal-v1 chunk\x00" + bytes([len(name)]) + name + struct.pack(">QQ", index, len(data)) + inner
    if key is None:
        return blake3.blake3(msg).digest() if b3 else hashlib.sha256(msg).digest()
    return blake3.blake3(msg, key=key).digest() if b3 else hmac.new(key, msg, hashlib.sha256).digest()


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("keyed", [False, True])
def test_chunk_digest_is_the_documented_construction(algorithm: str, keyed: bool) -> None:
    key = None
    if keyed:
        key = (blake3.blake3(bytes(range(32)), derive_key_context=KEY_CONTEXT).digest() if algorithm == "blake3"
               else hashlib.sha256(KEY_CONTEXT.encode() + b"\x00" + bytes(range(32))).digest())  # fmt: skip
    d = Digester(algorithm, KEY if keyed else None)
    assert d.chunk("pc.ram", 7, len(DATA), d.inner(DATA)) == _independent_chunk(algorithm, key, "pc.ram", 7, DATA)


#: Golden values (chunk 0 of "pc.ram" holding DATA; the state of made-up parts): a change to
#: any of them breaks every seal written before it.
GOLDEN = [
    ("blake3", False, "7a3c42db9c455dc522a6a9a33abe8d8bb75e2a4b4f0b3c8ca1705fa2e1e1dca8",
     "bac6a5fab01caedd290fd011509ae6980afc31fe323bf7703e60f80de6df84ed"),
    ("blake3", True, "8dd5bf6edcd1a6e3245498547412fefbf80f368429520e1356936992b301d29f",
     "316deeceeb5cacc69d6c509a2c1f470b045b7a872644a90a898dec0666a2c9a7"),
    ("sha256", False, "c2f9304152ddac84d1747df5035b7bfe2b365d573f087afdf250fc9ce4a7ea47",
     "247e0c49fe156ab94d6f1b8b5c345e8cebc83a732dc13faf1e78bbdc09e92db9"),
    ("sha256", True, "de2f0d3b1ca20b0a485cdb417f93ebfa0debaebd162cd51ad5b72748b86c6d74",
     "9eaeb823c8faf68a9b87e29ea38f260129a3c61ab2c723cf2342cd6c7c38476a"),
]  # fmt: skip


@pytest.mark.parametrize(("algorithm", "keyed", "chunk", "state"), GOLDEN)
def test_golden_vectors(algorithm: str, keyed: bool, chunk: str, state: str) -> None:
    d = Digester(algorithm, KEY if keyed else None)
    assert d.chunk("pc.ram", 0, len(DATA), d.inner(DATA)).hex() == chunk
    assert d.state(CHUNK_BYTES, b"config", BLOCKS, b"\x00", b"{}").hex() == state


def test_digests_bind_block_place_length_key_and_algorithm() -> None:
    d = Digester("blake3")
    inner = d.inner(DATA)
    base = d.chunk("pc.ram", 0, 4096, inner)
    others = {
        d.chunk("pc.rom", 0, 4096, inner),
        d.chunk("pc.ram", 1, 4096, inner),
        d.chunk("pc.ram", 0, 4095, inner),
        Digester("blake3", KEY).chunk("pc.ram", 0, 4096, inner),
        Digester("blake3", SealKey(bytes(range(1, 33)))).chunk("pc.ram", 0, 4096, inner),
        Digester("sha256").chunk("pc.ram", 0, 4096, Digester("sha256").inner(DATA)),
    }
    assert base not in others and len(others) == 6
    s = d.state(CHUNK_BYTES, b"c", BLOCKS, b"\x00", b"{}")
    assert s != d.state(CHUNK_BYTES, b"c", BLOCKS[:1], b"\x00", b"{}")
    assert s != d.state(CHUNK_BYTES, b"c", BLOCKS, b"\x01", b"{}")
    assert s != d.state(CHUNK_BYTES, b"c", BLOCKS, b"\x00", b"{ }")
    assert s != d.state(2 * CHUNK_BYTES, b"c", BLOCKS, b"\x00", b"{}")
    # no ambiguity where one field ends and the next begins
    assert d.state(CHUNK_BYTES, b"ab", BLOCKS, b"c", b"{}") != d.state(CHUNK_BYTES, b"a", BLOCKS, b"bc", b"{}")


def test_key_is_never_shown_nor_pickled() -> None:
    material = b"\xa5" * 32
    key = SealKey(material)
    d = Digester("blake3", key)
    for text in (repr(key), str(key), repr(d), repr([key])):
        assert material.hex() not in text and "a5a5" not in text and "\\xa5" not in text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(UsageError, match="16 to 65536 bytes"):
        SealKey(b"short")


def test_chunk_size_grows_past_128_gib_only() -> None:
    assert choose_chunk_bytes([("pc.ram", 128 << 30)], 4096) == CHUNK_BYTES
    assert choose_chunk_bytes([("pc.ram", 128 << 30), ("pc.bios", 1 << 20)], 4096) == 2 * CHUNK_BYTES
    assert choose_chunk_bytes([("pc.ram", 1 << 40)], 4096) == 8 * CHUNK_BYTES
    assert sum(chunk_count(n, choose_chunk_bytes([("m", n)], 4096)) for n in [1 << 40]) <= MAX_CHUNKS
    assert chunk_count(CHUNK_BYTES + 4096, CHUNK_BYTES) == 2


def _seal(blocks: list[tuple[str, int]] = BLOCKS, keyed: bool = False) -> Seal:
    return Seal("blake3", keyed, CHUNK_BYTES, bytes(range(32)),
                tuple(BlockDigests(n, size, bytes([i]) * DIGEST_SIZE * chunk_count(size, CHUNK_BYTES))
                      for i, (n, size) in enumerate(blocks)))  # fmt: skip


def test_manifest_round_trip_and_shape() -> None:
    s = _seal(keyed=True)
    value = encode_seal(s)
    assert value == {
        "version": 1, "algorithm": "blake3", "keyed": True, "chunk_bytes": 1048576, "state": bytes(range(32)).hex(),
        "blocks": [{"idstr": "pc.ram", "used_length": 3 << 20, "digests": "00" * 96},
                   {"idstr": "pc.bios", "used_length": 64 << 10, "digests": "01" * 32}],
    }  # fmt: skip
    assert decode_seal(json.loads(json.dumps(value)), BLOCKS, 4096) == s
    assert decode_seal(None, BLOCKS, 4096) is None
    assert s.chunks == 4 and s.blocks[0].digest(2) == b"\x00" * 32


def _lie(**changes: object) -> dict[str, object]:
    value = encode_seal(_seal())
    for k, v in changes.items():
        if v is _DROP:
            value.pop(k)
        else:
            value[k] = v
    return value


_DROP = object()
_GOOD = encode_seal(_seal())
_RAM = _GOOD["blocks"][0]  # type: ignore[index]
_BIOS = _GOOD["blocks"][1]  # type: ignore[index]

LIES = [
    ("not-an-object", ["seal"], "not a JSON object", ""),
    ("extra-key", {**_GOOD, "chunks": 4}, "other keys", ""),
    ("missing-key", {k: v for k, v in _GOOD.items() if k != "state"}, "other keys", ""),
    ("version-2", _lie(version=2), "version is not supported", ".version"),
    ("version-bool", _lie(version=True), "version is not supported", ".version"),
    ("algorithm", _lie(algorithm="md5"), "algorithm is unknown", ".algorithm"),
    ("keyed", _lie(keyed="yes"), "keyed is not true or false", ".keyed"),
    ("chunk-odd", _lie(chunk_bytes=3 << 20), "power-of-two multiple", ".chunk_bytes"),
    ("chunk-small", _lie(chunk_bytes=2048), "power-of-two multiple", ".chunk_bytes"),
    ("chunk-huge", _lie(chunk_bytes=1 << 40), "power-of-two multiple", ".chunk_bytes"),
    ("state-upper", _lie(state="AB" * 32), "lowercase hex", ".state"),
    ("state-space", _lie(state="ab " * 21 + "a"), "lowercase hex", ".state"),
    ("state-short", _lie(state="ab" * 31), "lowercase hex", ".state"),
    ("state-number", _lie(state=12), "lowercase hex", ".state"),
    ("block-missing", _lie(blocks=[_RAM]), "does not cover the file's RAM blocks", ".blocks"),
    ("block-extra", _lie(blocks=[_RAM, _BIOS, _BIOS]), "does not cover the file's RAM blocks", ".blocks"),
    ("blocks-swapped", _lie(blocks=[_BIOS, _RAM]), "another block", ".blocks[0].idstr"),
    ("length", _lie(blocks=[{**_RAM, "used_length": 4 << 20}, _BIOS]), "another length", ".blocks[0].used_length"),
    ("covers-less", _lie(blocks=[{**_RAM, "digests": "00" * 64}, _BIOS]), "one digest per chunk",
     ".blocks[0].digests"),
    ("covers-more", _lie(blocks=[{**_RAM, "digests": "00" * 128}, _BIOS]), "one digest per chunk",
     ".blocks[0].digests"),
    ("bad-hex", _lie(blocks=[{**_RAM, "digests": "0g" * 96}, _BIOS]), "lowercase hex", ".blocks[0].digests"),
    ("entry-keys", _lie(blocks=[{**_RAM, "x": 1}, _BIOS]), "idstr, used_length and digests", ".blocks[0]"),
    ("blocks-object", _lie(blocks={"pc.ram": "00"}), "does not cover", ".blocks"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message", "field"), [pytest.param(v, m, f, id=i) for i, v, m, f in LIES])
def test_every_lie_is_a_format_error_naming_the_field(value: object, message: str, field: str) -> None:
    with pytest.raises(FormatError, match=message) as err:
        decode_seal(value, BLOCKS, 4096, offset=0x1234)
    assert err.value.offset == 0x1234 and err.value.field == f"vmdesc mappedram.seal{field}"
    assert err.value.expected is not None and err.value.actual is not None


def test_huge_claims_allocate_nothing() -> None:
    """A digest string of the wrong length is refused by its length alone (the block sizes are the file's)."""
    value = _lie(blocks=[{**_RAM, "digests": "0" * 10_000_001}, _BIOS])
    with pytest.raises(FormatError, match="one digest per chunk"):
        decode_seal(value, BLOCKS, 4096)


def test_unsealed_description_drops_the_seal_only() -> None:
    data = {"page_size": 4096, "devices": [], "mappedram": {"clean-zero-slots": True, "seal": {"x": 1}}}
    assert unsealed_description(data) == b'{"devices":[],"mappedram":{"clean-zero-slots":true},"page_size":4096}'
    assert unsealed_description({"page_size": 4096, "mappedram": {"seal": 1}}) == b'{"page_size":4096}'
    assert unsealed_description({"b": 1, "a": 2}) == unsealed_description({"a": 2, "b": 1})


def _analyze_migration_json(tail: bytes) -> bytes:
    """QEMU's scripts/analyze-migration.py read_migration_debug_json, on the file's last bytes."""
    nulpos = tail.rfind(b"\0")
    jsonpos = tail.find(b"{", nulpos)
    if tail[jsonpos - 5] != 0x06:
        raise AssertionError("No Debug Migration device found")
    (length,) = struct.unpack(">I", tail[jsonpos - 4 : jsonpos])
    return tail[jsonpos : jsonpos + length]


def test_trailer_stays_where_analyze_migration_finds_it() -> None:
    """A be32 length with a ``{`` byte would send analyze-migration.py to the wrong brace: padded."""
    hit = 0
    for n in range(400):
        text = json.dumps({"page_size": 4096, "devices": [], "pad": "x" * n}).encode()
        plain = text[:-1] + b', "mappedram": {"seal": ' + json.dumps(encode_seal(_seal())).encode() + b"}}"
        out = trailer_bytes(text, _seal())
        assert out[0] == 0x06 and struct.unpack(">I", out[1:5])[0] == len(out) - 5
        assert 0x7B not in out[1:5]
        data = json.loads(_analyze_migration_json(b"\x00" + out))
        assert data["mappedram"]["seal"] == encode_seal(_seal()) and data["pad"] == "x" * n
        hit += 0x7B in struct.pack(">I", len(plain))
    assert hit, "no length in the range met the case the padding is for"
    # removing the seal restores a trailer without one
    sealed = trailer_bytes(b'{"page_size": 4096, "devices": []}', _seal())
    assert json.loads(trailer_bytes(sealed[5:], None)[5:]) == {"page_size": 4096, "devices": []}

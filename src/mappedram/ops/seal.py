"""Seal files (integrity manifests) and check them: ``seal``, ``verify --data``, and the
check every reader runs before it writes a destination byte.

A seal (format/seal.py) holds a digest of each chunk of every RAM block, as a restore
reads it, and one of everything else; keyed with a key file, it also shows who sealed
the file. Chunks are read by N channels in large reads (engine/digest.py); a chunk with
no stored page is all zeros and is never read.

The function other readers call is :func:`check_seal`::

    from mappedram.ops.seal import check_seal
    check = check_seal(mf, options, key=key)   # before the first destination byte

It returns a :class:`SealCheck` (``status`` "ok", or "unsealed" for a file without a
seal and no key given) and raises :class:`~mappedram.errors.IntegrityError` on a
mismatch (and for an unsealed or unkeyed file when a key is given), or
:class:`~mappedram.errors.UsageError` for a keyed seal without a key.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import numpy as np

from mappedram._runs import bit_runs
from mappedram.engine.digest import DigestTask, digest_pieces
from mappedram.engine.fileio import (
    close_fd,
    close_quiet,
    file_identity,
    fsync,
    lock_exclusive,
    open_write,
    pwrite_full,
    read_no_follow,
    truncate,
    unlock_remove,
)
from mappedram.errors import IntegrityError, IOEngineError, UsageError
from mappedram.format.chain import ROOT_ALGORITHM, content_root
from mappedram.format.constants import QEMU_VM_VMDESCRIPTION
from mappedram.format.seal import (
    DEFAULT_ALGORITHM,
    MAX_KEY_BYTES,
    BlockDigests,
    Digester,
    Seal,
    SealKey,
    choose_chunk_bytes,
    chunk_count,
    trailer_bytes,
    unsealed_description,
)
from mappedram.image import MigrationFile, RamBlock, open_file

from .options import DEFAULTS, SEAL_ALGORITHMS, EngineOptions
from .protocol import CHUNK_PAGES, Body, Written, lock_name, refuse_symlink

__all__ = [
    "check_chain",
    "content_digest",
    "SEAL_ALGORITHMS",
    "SealKey",
    "SealOptions",
    "SEAL_CHECK",
    "NO_CHECK",
    "SealInfo",
    "SealMismatch",
    "SealCheck",
    "SealReport",
    "load_key",
    "seal_info",
    "compute_seal",
    "verify_seal",
    "check_seal",
    "checked",
    "seal_file",
    "sealed_body",
]

#: A byte that is no section type: written over the trailer's 0x06 while the trailer is replaced.
_INVALID_MARK = b"\xff"


@dataclass(frozen=True, slots=True, kw_only=True)
class SealOptions:
    """How a writer seals its file, and how a reader treats a sealed one.

    Args:
        key: the key (:func:`load_key`): a writer makes a keyed seal; a reader requires one
            made with this key (an unsealed or unkeyed file is then refused).
        algorithm: a writer's digest algorithm, ``blake3`` or ``sha256``.
        verify: a reader checks every digest of a sealed file before it writes anything.
    """

    key: SealKey | None = None
    algorithm: str = DEFAULT_ALGORITHM
    verify: bool = True


#: A reader's default: a sealed file's digests are all checked (an unkeyed seal; a keyed one needs the key).
SEAL_CHECK = SealOptions()
#: A reader that does not check the seal (``--no-verify-seal``, or a caller that checked it).
NO_CHECK = SealOptions(verify=False)


def load_key(path: str | os.PathLike[str]) -> SealKey:
    """The key in the file ``path``: a regular file (never a symlink), owned by this user,
    that neither group nor others may read or write, holding 16 to 64 KiB of bytes (all of
    them are the key, a final newline too). Anything else is a UsageError naming the file
    and its mode; the error never shows the key's bytes."""
    name = os.fspath(path)
    try:
        st, data = read_no_follow(name, MAX_KEY_BYTES)
    except IOEngineError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{name}: the key file is a symbolic link: a key file must be a regular file of your "
                             "own, mode 0600 (it is never read through a link)") from None  # fmt: skip
        raise UsageError(f"{name}: the key file cannot be read: {exc.message}") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{name}: the key file is not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_uid != os.geteuid():
        raise UsageError(f"{name}: the key file (mode {mode:04o}) belongs to uid {st.st_uid}, not to you "
                         f"(uid {os.geteuid()}): a key file must be your own, mode 0600")  # fmt: skip
    if mode & 0o066:
        raise UsageError(f"{name}: the key file has mode {mode:04o}: group or others may read or write it; "
                         f"it must be 0600 (chmod 600 {name})")  # fmt: skip
    if len(data) > MAX_KEY_BYTES:
        raise UsageError(f"{name}: the key file (mode {mode:04o}) holds more than {MAX_KEY_BYTES} bytes")
    try:
        return SealKey(data)
    except UsageError as exc:
        raise UsageError(f"{name}: the key file (mode {mode:04o}): {exc.message}") from None


# -- reports ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealInfo:
    """What ``info`` says of a file's seal (its structure was checked when the file was opened)."""

    version: int
    algorithm: str
    keyed: bool
    chunk_bytes: int
    chunks: int
    blocks: int


def seal_info(mf: MigrationFile) -> SealInfo | None:
    s = mf.seal
    if s is None:
        return None
    return SealInfo(s.version, s.algorithm, s.keyed, s.chunk_bytes, s.chunks, len(s.blocks))


@dataclass(frozen=True, slots=True)
class SealMismatch:
    """Chunks whose content differs from the seal (``kind`` "chunks"), or the state (``kind``
    "state": the configuration, block list, device state or trailer differ).

    ``file_offset``..``file_end`` is the file's bytes the chunks read (for a mapped-ram
    block the slots of the pages, whatever their bits; for a legacy block the records'
    page data, from the first to the last); ``bitmap_offset``..``bitmap_end`` the bitmap
    bytes of those pages (mapped-ram): a flipped bit there changes what is read."""

    kind: str
    message: str
    block: str | None = None
    first_chunk: int | None = None
    chunks: int | None = None
    first_page: int | None = None
    pages: int | None = None
    file_offset: int | None = None
    file_end: int | None = None
    bitmap_offset: int | None = None
    bitmap_end: int | None = None


@dataclass(frozen=True, slots=True)
class SealCheck:
    """The outcome of checking a file's data against its seal.

    ``status``: "ok" (every digest matches), "mismatch", "unsealed" (no seal), "no-key"
    (a keyed seal, no key given: it cannot be checked), "unkeyed" (a key was given, the
    seal has none), or "structure" (only the seal's structure was checked)."""

    path: str
    status: str
    message: str
    sealed: bool
    algorithm: str | None = None
    keyed: bool = False
    chunk_bytes: int | None = None
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    mismatches: list[SealMismatch] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass(frozen=True, slots=True)
class SealReport:
    """A file sealed: the seal written, and what reading its data cost."""

    path: str
    algorithm: str
    keyed: bool
    chunk_bytes: int
    chunks: int
    chunks_read: int  # chunks with stored pages (the others are zeros, not read)
    bytes_read: int
    ram_bytes: int
    replaced: bool  # the file was sealed before
    trailer_offset: int
    trailer_bytes_before: int
    trailer_bytes_after: int
    file_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.ram_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


# -- digests ---------------------------------------------------------------------------


def _digests(
    mf: MigrationFile, digester: Digester, chunk_bytes: int, options: EngineOptions
) -> tuple[list[bytes], int, int]:
    """Every block's chunk digests, concatenated per block; chunks read; bytes read."""
    ps = mf.page_size
    per = chunk_bytes // ps  # pages per chunk
    group = max(1, CHUNK_PAGES // per)  # chunks per read
    tasks: list[DigestTask] = []
    base: list[int] = []
    zero: list[tuple[int, int]] = []  # (global chunk, pages) of chunks with no stored page
    total = 0
    for b in mf.blocks:
        n = chunk_count(b.used_length, chunk_bytes)
        base.append(total)
        padded = np.zeros(n * per, dtype=np.bool_)
        padded[: b.num_pages] = b.present
        stored = padded.reshape(n, per).any(axis=1)
        del padded
        starts, lengths = bit_runs(stored)
        for s, k in zip(starts.tolist(), lengths.tolist()):
            for c in range(s, s + k, group):
                first = c * per
                pages = min(min(group, s + k - c) * per, b.num_pages - first)
                tasks.append(DigestTask(total + c, b.sources(first, pages), per))
        for c in np.flatnonzero(~stored).tolist():
            zero.append((total + c, min(per, b.num_pages - c * per)))
        total += n
    names = [b.idstr for b in mf.blocks]

    def locate(k: int) -> tuple[str, int]:
        i = bisect.bisect_right(base, k) - 1
        return names[i], k - base[i]

    def digest(k: int, data: memoryview) -> bytes:
        idstr, c = locate(k)
        return digester.chunk(idstr, c, len(data), digester.inner(data))

    options.started(sum(b.used_length for b in mf.blocks))
    out, read = digest_pieces(mf.store, tasks, total, page_size=ps, digest=digest, channels=options.channels,
                              progress=options.progress)  # fmt: skip
    inner_zero: dict[int, bytes] = {}
    for k, pages in zero:
        if pages not in inner_zero:
            inner_zero[pages] = digester.inner(bytes(pages * ps))
        idstr, c = locate(k)
        out[k] = digester.chunk(idstr, c, pages * ps, inner_zero[pages])
        if options.progress is not None:
            options.progress(pages * ps)
    ends = [*base[1:], total]
    return [b"".join(out[a:e]) for a, e in zip(base, ends)], sum(t.pieces for t in tasks), read


def _state(mf: MigrationFile, digester: Digester, chunk_bytes: int) -> bytes:
    assert mf.vmdesc is not None
    return digester.state(chunk_bytes, mf.configuration_bytes(), [(b.idstr, b.used_length) for b in mf.blocks],
                          mf.device_state(), unsealed_description(mf.vmdesc.data))  # fmt: skip


def _seal_of(mf: MigrationFile, algorithm: str, key: SealKey | None, chunk: int,
             options: EngineOptions) -> tuple[Seal, int, int]:  # fmt: skip
    if mf.vmdesc is None:
        raise UsageError(f"{mf.path}: the file has no vmdesc trailer (QEMU's suppress-vmdesc), which is where a "
                         "seal goes: rewrite it with mappedram first")  # fmt: skip
    digester = Digester(algorithm, key)
    per_block, chunks_read, read = _digests(mf, digester, chunk, options)
    blocks = tuple(BlockDigests(b.idstr, b.used_length, d) for b, d in zip(mf.blocks, per_block))
    return Seal(algorithm, key is not None, chunk, _state(mf, digester, chunk), blocks), chunks_read, read


def compute_seal(
    mf: MigrationFile, *, algorithm: str = DEFAULT_ALGORITHM, key: SealKey | None = None,
    options: EngineOptions = DEFAULTS,
) -> tuple[Seal, int, int]:  # fmt: skip
    """The seal of ``mf`` as it is now, the chunks read and the bytes read."""
    chunk = choose_chunk_bytes([(b.idstr, b.used_length) for b in mf.blocks], mf.page_size)
    return _seal_of(mf, algorithm, key, chunk, options)


def _chunk_range(mf: MigrationFile, b: RamBlock, first: int, count: int, chunk_bytes: int) -> SealMismatch:
    """The mismatch of ``count`` chunks of ``b`` from chunk ``first``: pages, file and bitmap bytes."""
    per = chunk_bytes // b.page_size
    page = first * per
    pages = min(count * per, b.num_pages - page)
    lay = b.layout
    bitmap: tuple[int | None, int | None] = (None, None)
    if lay is not None and b.slots:
        span: tuple[int | None, int | None] = (lay.pages_offset + page * b.page_size,
                                               lay.pages_offset + (page + pages) * b.page_size)  # fmt: skip
        bitmap = (lay.bitmap_offset + page // 8, lay.bitmap_offset + -(-(page + pages) // 8))
    elif lay is not None:  # a compressed block, or a chain's: the frames or files hold the pages
        span = (None, None)
    else:
        src = b.sources(page, pages)
        stored = src[src >= 0]
        span = (int(stored.min()), int(stored.max()) + b.page_size) if len(stored) else (None, None)
    where = "" if span[0] is None else f", file bytes {span[0]:#x}..{span[1]:#x}"
    what = f"chunk {first}" if count == 1 else f"chunks {first}..{first + count - 1}"
    message = f"block {b.idstr!r} {what}: pages {page}..{page + pages - 1}{where}"
    return SealMismatch("chunks", message, b.idstr, first, count, page, pages, span[0], span[1], *bitmap)


def _state_mismatch(mf: MigrationFile) -> SealMismatch:
    c = mf.configuration
    message = (f"the non-RAM state: the configuration section ({c.offset:#x}..{c.end_offset:#x}), the block list,"
               f" the device state ({mf.device_state_offset:#x}..{mf.device_state_offset + mf.device_state_length:#x})"
               " or the trailer")  # fmt: skip
    start = c.offset if c.machine_type is not None else mf.device_state_offset
    return SealMismatch("state", message, file_offset=start, file_end=mf.file_size)


def _compare(mf: MigrationFile, seal: Seal, found: Seal) -> list[SealMismatch]:
    out = []
    for b, want, got in zip(mf.blocks, seal.blocks, found.blocks):
        bad = np.frombuffer(want.digests, dtype="V32") != np.frombuffer(got.digests, dtype="V32")
        starts, lengths = bit_runs(bad)
        out += [_chunk_range(mf, b, s, k, seal.chunk_bytes) for s, k in zip(starts.tolist(), lengths.tolist())]
    if seal.state != found.state:
        out.append(_state_mismatch(mf))
    return out


def verify_seal(mf: MigrationFile, options: EngineOptions = DEFAULTS, *, key: SealKey | None = None) -> SealCheck:
    """Check every digest of ``mf``'s seal against its data (never raises for a mismatch:
    the report says). With ``key``, only a seal made with that key is "ok"."""
    t0 = time.perf_counter()
    s = mf.seal
    if s is None:
        if key is not None:
            return SealCheck(mf.path, "unsealed", "the file is not sealed, and a key was given: nothing shows "
                             "who made it (a seal can be stripped)", False)  # fmt: skip
        return SealCheck(mf.path, "unsealed", "the file is not sealed: its page data cannot be checked", False)
    head: dict[str, Any] = dict(algorithm=s.algorithm, keyed=s.keyed, chunk_bytes=s.chunk_bytes, chunks=s.chunks)
    if s.keyed and key is None:
        return SealCheck(mf.path, "no-key", f"the file is sealed with a key ({s.algorithm}): its digests cannot be "
                         "checked without it (give --key KEYFILE)", True, **head)  # fmt: skip
    if not s.keyed and key is not None:
        return SealCheck(mf.path, "unkeyed", "the seal is not keyed, and a key was given: it does not show who "
                         "made the file (anyone can recompute it)", True, **head)  # fmt: skip
    found, chunks_read, read = _seal_of(mf, s.algorithm, key, s.chunk_bytes, options)
    mismatches = _compare(mf, s, found)
    seconds = time.perf_counter() - t0
    if mismatches:
        bad = sum(m.chunks or 0 for m in mismatches)
        state = any(m.kind == "state" for m in mismatches)
        what = [f"{bad} of {s.chunks} chunks"] if bad else []
        what += ["the non-RAM state"] if state else []
        extra = " (every chunk: the wrong key, or other data)" if bad == s.chunks and key is not None else ""
        message = " and ".join(what) + f" differ from the seal{extra}"
        return SealCheck(mf.path, "mismatch", message, True, **head, chunks_read=chunks_read, bytes_read=read,
                         mismatches=mismatches, seconds=seconds)  # fmt: skip
    kind = "keyed " if s.keyed else ""
    return SealCheck(mf.path, "ok", f"every digest matches the {kind}{s.algorithm} seal ({s.chunks} chunks)", True,
                     **head, chunks_read=chunks_read, bytes_read=read, seconds=seconds)  # fmt: skip


def check_seal(mf: MigrationFile, options: EngineOptions = DEFAULTS, *, key: SealKey | None = None) -> SealCheck:
    """What every reader calls before it writes the first destination byte.

    Returns the check: "ok", or "unsealed" (no seal, no key given: nothing to check).
    Raises IntegrityError when the data differs from the seal (block, pages, file offsets
    of each mismatch), when ``key`` is given and the file is unsealed or its seal unkeyed;
    UsageError when the seal is keyed and no key is given.
    """
    check_chain(mf, options)
    check = verify_seal(mf, options, key=key)
    if check.status in ("ok",) or (check.status == "unsealed" and key is None):
        return check
    if check.status == "no-key":
        raise UsageError(f"{mf.path}: {check.message}, or --no-verify-seal to read it unchecked")
    if check.status in ("unsealed", "unkeyed"):
        raise IntegrityError(check.message, path=mf.path, field="vmdesc mappedram.seal",
                             expected="a seal made with the key given",
                             actual="no seal" if check.status == "unsealed" else "a seal without a key")  # fmt: skip
    _raise(mf, check, check.mismatches[0])


def content_digest(mf: MigrationFile, options: EngineOptions = DEFAULTS) -> tuple[bytes, int]:
    """``mf``'s chain digest (format/chain.content_root of its RAM as a restore reads it)
    and the bytes read to compute it."""
    chunk = choose_chunk_bytes([(b.idstr, b.used_length) for b in mf.blocks], mf.page_size)
    per_block, _, read = _digests(mf, Digester(ROOT_ALGORITHM), chunk, options)
    blocks = tuple(BlockDigests(b.idstr, b.used_length, d) for b, d in zip(mf.blocks, per_block))
    return content_root(Seal(ROOT_ALGORITHM, False, chunk, b"", blocks)), read  # RAM only: no state digest


def check_chain(mf: MigrationFile, options: EngineOptions = DEFAULTS) -> int:
    """Raise IntegrityError unless every parent of a chain is the file its child recorded
    (its RAM digest); nothing for a whole file. Returns the bytes read."""
    read = 0
    for child in reversed(mf.chain[:-1]):  # oldest first: a changed file is named, not its children
        assert child.parent is not None and child.parent_ref is not None
        digest, n = content_digest(child.parent, options)
        read += n
        if digest != child.parent_ref.digest:
            raise IntegrityError(
                f"chain: the parent {child.parent.path} changed since {child.path} was made from it (its RAM "
                "differs): the child's pages no longer apply to it",
                path=child.path, field="vmdesc mappedram.parent.digest",
                expected=child.parent_ref.digest.hex(), actual=digest.hex(),
            )  # fmt: skip
    return read


def _raise(mf: MigrationFile, check: SealCheck, first: SealMismatch) -> NoReturn:
    more = f"; {len(check.mismatches) - 1} more mismatches" if len(check.mismatches) > 1 else ""
    raise IntegrityError(
        f"{check.message}; first: {first.message}{more} (--no-verify-seal reads it anyway)",
        path=mf.path,
        offset=first.file_offset,
        field="seal " + ("state" if first.kind == "state" else "chunk"),
        expected=f"the {check.algorithm} digest the seal holds",
        actual="another digest",
        block=first.block,
        mismatches=[asdict(m) for m in check.mismatches],
    )


def checked(mf: MigrationFile, seal: SealOptions, options: EngineOptions) -> SealCheck | None:
    """:func:`check_seal` unless ``seal.verify`` is off (None then); the check shows no progress."""
    if not seal.verify:
        return None
    return check_seal(mf, options.replace(progress=None, on_start=None), key=seal.key)


# -- writing a seal ----------------------------------------------------------------------


def _write_trailer(fd: int, path: str, at: int, new: bytes, durable: bool) -> None:
    """Put the trailer ``new`` at ``at`` (where the old one starts) and cut the file after it.

    Crash safety, in three steps: (1) the old trailer's 0x06 becomes 0xff, so the file has
    no trailer; (2) the new trailer but its first byte is written and the file cut to its
    end; (3) its 0x06 is written. With ``durable`` each step is fsynced before the next.
    A crash before (3) is durable leaves a file with no trailer, which open_file and verify
    reject ("no vmdesc trailer ends the file"): never a file whose trailer looks sealed
    but is torn."""
    assert new[:1] == bytes([QEMU_VM_VMDESCRIPTION])
    pwrite_full(fd, _INVALID_MARK, at, path)
    if durable:
        fsync(fd, path)
    pwrite_full(fd, new[1:], at + 1, path)
    truncate(fd, at + len(new), path)
    if durable:
        fsync(fd, path)
    pwrite_full(fd, new[:1], at, path)


def _seal_open(mf: MigrationFile, fd: int, seal: SealOptions, options: EngineOptions, durable: bool) -> SealReport:
    """Seal ``mf`` (open, checked) through ``fd``, a descriptor of the same file open to write."""
    t0 = time.perf_counter()
    new, chunks_read, read = compute_seal(mf, algorithm=seal.algorithm, key=seal.key, options=options)
    assert mf.vmdesc is not None
    trailer = trailer_bytes(mf.vmdesc.raw, new)
    at = mf.vmdesc.offset
    before = mf.file_size - at
    _write_trailer(fd, mf.path, at, trailer, durable)
    return SealReport(
        path=mf.path, algorithm=new.algorithm, keyed=new.keyed, chunk_bytes=new.chunk_bytes, chunks=new.chunks,
        chunks_read=chunks_read, bytes_read=read, ram_bytes=sum(b.used_length for b in mf.blocks),
        replaced=mf.seal is not None, trailer_offset=at, trailer_bytes_before=before,
        trailer_bytes_after=len(trailer), file_size=at + len(trailer), seconds=time.perf_counter() - t0,
    )  # fmt: skip


def seal_file(
    path: str | os.PathLike[str], offset: int = 0, *, seal: SealOptions = SEAL_CHECK,
    options: EngineOptions = DEFAULTS,
) -> SealReport:  # fmt: skip
    """Seal an existing file in place (a seal it has is replaced): only its trailer, at the
    end of the file, is rewritten (see :func:`_write_trailer` for what a crash leaves).

    The file is decoded and checked first; it must be a regular file reached without a
    symlink (as every in-place write), not being saved meanwhile (the save lock is held),
    and the one the reader decoded (same inode). ``options.durable`` fsyncs each step.
    """
    target = os.fspath(path)
    refuse_symlink(target)
    lock = lock_exclusive(lock_name(target), target)
    try:
        with open_file(target, offset) as mf:
            fd = open_write(target, create=False)
            try:
                if file_identity(fd, target) != mf.file_id:
                    raise IOEngineError("the file was replaced while it was opened", path=target)
                report = _seal_open(mf, fd, seal, options, options.durable)
                if options.durable:
                    fsync(fd, target)
            except BaseException:
                close_quiet(fd)
                raise
            close_fd(fd, target)
    finally:
        unlock_remove(lock, lock_name(target))
    return report


def sealed_body(body: Body, seal: SealOptions | None, start: int, options: EngineOptions) -> Body:
    """``body`` followed by sealing what it wrote (None: ``body`` itself), inside the save
    protocol: the file is sealed before it appears under its name. ``Written.seal`` gets
    the report, ``Written.file_size`` the sealed size."""
    if seal is None:
        return body

    def run(fd: int, work: str) -> Written:
        written = body(fd, work)
        quiet = options.replace(progress=None, on_start=None)
        with open_file(work, start) as mf:
            report = _seal_open(mf, fd, seal, quiet, durable=False)
        written.file_size += report.trailer_bytes_after - report.trailer_bytes_before
        written.seconds["seal"] = report.seconds
        written.seal = report
        return written

    return run

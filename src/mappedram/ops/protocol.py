"""The save protocol: how every writer of a snapshot file puts it on disk.

Theory of operation (every writer, mapped-ram or legacy, static or live, uses this by
calling :func:`commit` with a *body* that writes the file's bytes on a descriptor):

* Rule 1, one save per target at a time: an exclusive, non-blocking flock on a lock
  file beside the target (``.<name>.mappedram-lock``); a second save fails at once. The
  lock file lives only while its save runs: the owner unlinks it, still holding it, when
  the save ends (completed or failed), and a lock taken on a file that was unlinked
  meanwhile is taken again (engine/fileio.py, lock_exclusive). Only a killed save leaves
  it behind, and the next save to that target removes it.
* Rule 2, nothing half-written at the target: the body writes a temporary file
  ``.<name>.mappedram-<pid>-<token>.tmp`` beside it (O_EXCL, mode 0600), which is fsynced,
  renamed over the target, and the directory fsynced. A failure anywhere (in the body,
  in the fsync, in the rename) unlinks the temporary file; the target keeps what it held.
* Rule 3, in place (QEMU's ``file:PATH,offset=N``): the file is truncated at the offset
  first (reference: file_connect_outgoing), and a failure truncates it back there.
* Rule 4, leftovers: temporary files that killed saves left beside the target are
  removed (with the lock held, so never a running save's) and the report says so.
* Rule 5, the body never finalises on its error path: a file whose tail (bitmaps, EOF,
  vmdesc) is missing never verifies.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mappedram.engine.autodirect import DirectChoice, Purpose, choose_direct_io
from mappedram.engine.directio import probe_direct_io
from mappedram.engine.fileio import (
    close_fd,
    close_quiet,
    fsync,
    fsync_dir,
    list_dir,
    lock_exclusive,
    open_write,
    replace,
    truncate,
    unlink_quiet,
    unlock_remove,
)
from mappedram.errors import IOEngineError, UsageError

from .options import EngineOptions, direct_mode

if TYPE_CHECKING:
    from mappedram.image import MigrationFile

    from .seal import SealReport

__all__ = [
    "TEMP_MARKER",
    "CHUNK_PAGES",
    "Written",
    "Body",
    "commit",
    "resolve_direct",
    "temp_name",
    "lock_name",
    "remove_leftovers",
    "refuse_same_file",
    "refuse_chain_file",
    "refuse_symlink",
]

#: Temporary files of saves in progress are named ``.<target>.mappedram-<pid>-<token>.tmp``.
TEMP_MARKER = ".mappedram-"
#: Pages per channel task (8 MiB of 4 KiB pages).
CHUNK_PAGES = 2048


@dataclass(slots=True)
class Written:
    """What a format writer (a body) reports to the save protocol around it."""

    pages: int = 0
    pages_written: int = 0
    bytes_written: int = 0
    channels: int = 1
    file_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    machine_type: str | None = None  # when the writer learns it as it goes
    seal: SealReport | None = None  # the file was sealed before it got its name (ops/seal.py, sealed_body)


#: ``body(fd, work_path) -> Written``: writes the whole file on ``fd`` (opened on ``work_path``).
Body = Callable[[int, str], Written]


def resolve_direct(path: str, options: EngineOptions, purpose: Purpose) -> DirectChoice:
    """Whether page I/O of a file at ``path`` (``purpose``: written or read) uses O_DIRECT.

    ``options.direct_io``: "off" (or False), the page cache; "on" (or True), O_DIRECT where the
    filesystem takes it, else with ``direct_io_fallback`` the page cache, without it an error;
    "auto", O_DIRECT where the filesystem takes it and a probe found it faster there
    (engine/autodirect.py). The choice says why."""
    mode = direct_mode(options.direct_io)
    if mode == "off":
        return DirectChoice(False, "off: the page cache, as asked")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if mode == "auto":
        return choose_direct_io(directory, purpose)
    reason = probe_direct_io(directory)
    if reason is None:
        return DirectChoice(True, "on: O_DIRECT, as asked")
    if options.direct_io_fallback:
        return DirectChoice(False, f"on, with the fallback: {reason}: the page cache instead")
    raise IOEngineError(f"{reason} (use --direct-io off or auto, or allow the fallback)", path=path)


def commit(target: str, offset: int | None, durable: bool, notes: list[str], body: Body) -> Written:
    """Run ``body`` under the save protocol (module docstring); ``seconds["sync"]`` is added."""
    in_place = offset is not None
    start = offset or 0
    refuse_symlink(target)
    lock = lock_exclusive(lock_name(target), target)
    try:
        leftovers = remove_leftovers(target)
        if leftovers:
            notes.append(f"removed {len(leftovers)} temporary file(s) of interrupted saves")
        work = target if in_place else temp_name(target)
        fd = open_write(work, exclusive=not in_place, mode=0o600)
        try:
            if in_place:
                # reference: file_connect_outgoing (truncate to the start offset, keep what lies before).
                # A new temporary file is empty already; truncating it would make ext4 flush it at close.
                truncate(fd, start, work)
            result = body(fd, work)
            t0 = time.perf_counter()
            if durable:
                fsync(fd, work)
            close_fd(fd, work)
            fd = -1
            if not in_place:
                replace(work, target)
                if durable:
                    fsync_dir(os.path.dirname(os.path.abspath(target)) or ".")
            result.seconds["sync"] = time.perf_counter() - t0
        except BaseException:
            if fd >= 0:
                close_quiet(fd)
            if in_place:
                _cut_back(target, start)
            else:
                unlink_quiet(work)
            raise
    finally:
        unlock_remove(lock, lock_name(target))
    return result


def _cut_back(path: str, size: int) -> None:
    """After a failed in-place save, drop the partial stream (bytes before ``size`` stay)."""
    try:
        fd = open_write(path, create=False)
    except IOEngineError:
        return
    try:
        truncate(fd, size, path)
    except IOEngineError:
        pass
    finally:
        close_quiet(fd)


def temp_name(target: str) -> str:
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}.tmp")


def lock_name(target: str) -> str:
    head, tail = os.path.split(os.path.abspath(target))
    return os.path.join(head, f".{tail}{TEMP_MARKER}lock")


def remove_leftovers(target: str) -> list[str]:
    """Delete temporary files that interrupted saves to ``target`` left (call with the lock held)."""
    head, tail = os.path.split(os.path.abspath(target))
    prefix = f".{tail}{TEMP_MARKER}"
    gone = []
    for name in list_dir(head):
        if name.startswith(prefix) and name.endswith(".tmp"):
            unlink_quiet(os.path.join(head, name))
            gone.append(name)
    return gone


def refuse_symlink(target: str) -> None:
    """Refuse an output path that is a symlink: no command writes through one, or replaces one
    (the rule for every output, lock and temporary file: README, Security)."""
    if os.path.islink(target):
        raise UsageError(f"{target}: is a symbolic link: mappedram never writes through a symlink, nor replaces "
                         "one (give the real path, or remove the link)")  # fmt: skip


def refuse_chain_file(mf: MigrationFile, output: str | os.PathLike[str], what: str) -> None:
    """:func:`refuse_same_file` for every file ``mf`` reads: the file, and a chain's parents."""
    for m in mf.chain:
        refuse_same_file(m.path, output, what)


def refuse_same_file(source: str | os.PathLike[str], output: str | os.PathLike[str], what: str) -> None:
    """Refuse to write ``output`` when it is the file ``source`` (the same inode: the same
    path, a symlink to it or a hard link of it). Reading a file while writing it, in place
    or truncated at an offset first, would destroy the data being read: every command
    that reads one file and writes another refuses, whatever the options."""
    try:
        out = os.stat(output)
        src = os.stat(source)
    except OSError:
        return  # no such output yet (or no source: the reader says so)
    if os.path.samestat(out, src):
        if os.path.realpath(output) == os.path.realpath(source):
            how = " (through a symlink)" if os.path.abspath(output) != os.path.abspath(source) else ""
        else:
            how = " (a hard link of it)"
        raise UsageError(
            f"{os.fspath(output)}: the output is the input file {os.fspath(source)} itself{how}; "
            f"{what} cannot write into the file it reads: give another output path"
        )

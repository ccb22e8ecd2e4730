"""The commands a migration source sends besides sections, and the return path's messages.

A source that serves a live QEMU destination (rather than writing a file) speaks a little
more of QEMU's protocol: commands on the main stream (open the return path, ping, advise
and run postcopy, a packaged blob), and messages the destination sends back on the return
path (pong, page requests, shut). This module encodes the one and decodes the other;
the sockets are :mod:`mappedram.engine.netchannel`'s.

References:
    QEMU migration/savevm.c (qemu_savevm_command_send, qemu_savevm_send_ping,
    qemu_savevm_send_open_return_path, qemu_savevm_send_postcopy_advise,
    qemu_savevm_send_packaged, qemu_savevm_send_postcopy_listen,
    qemu_savevm_send_postcopy_run, loadvm_process_command), migration/migration.c
    (enum mig_rp_message_type, migrate_send_rp_message, source_return_path_thread),
    migration/savevm.h (enum qemu_vm_cmd, MAX_VM_CMD_PACKAGED_SIZE).
"""

from __future__ import annotations

from dataclasses import dataclass

from mappedram.errors import BadMagicError, TruncatedError

from .constants import TARGET_PAGE_SIZE
from .encoder import encode_command
from .structs import BE16, BE32, BE64, be32, be64

__all__ = [
    "MIG_CMD_OPEN_RETURN_PATH",
    "MIG_CMD_PING",
    "MIG_CMD_POSTCOPY_ADVISE",
    "MIG_CMD_POSTCOPY_LISTEN",
    "MIG_CMD_POSTCOPY_RUN",
    "MIG_CMD_POSTCOPY_RAM_DISCARD",
    "MIG_CMD_PACKAGED",
    "MAX_VM_CMD_PACKAGED_SIZE",
    "MIG_RP_MSG_SHUT",
    "MIG_RP_MSG_PONG",
    "MIG_RP_MSG_REQ_PAGES_ID",
    "MIG_RP_MSG_REQ_PAGES",
    "MIG_RP_MSG_RECV_BITMAP",
    "MIG_RP_MSG_RESUME_ACK",
    "MIG_RP_MSG_SWITCHOVER_ACK",
    "RP_HEADER_SIZE",
    "RP_MESSAGE_NAMES",
    "RpMessage",
    "rp_body_length",
    "decode_rp_message",
    "encode_rp_message",
    "encode_open_return_path",
    "encode_ping",
    "encode_postcopy_advise",
    "encode_postcopy_listen",
    "encode_postcopy_run",
    "encode_packaged",
    "encode_postcopy_ram_discard",
    "POSTCOPY_RAM_DISCARD_VERSION",
]

# migration/savevm.h: enum qemu_vm_cmd (MIG_CMD_SWITCHOVER_START = 11 is in constants)
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
#: The largest blob MIG_CMD_PACKAGED carries (migration/savevm.c).
MAX_VM_CMD_PACKAGED_SIZE = (1 << 32) - 1  # UINT32_MAX since QEMU 7.1 (16 MiB before)

# migration/migration.h: enum mig_rp_message_type
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_SWITCHOVER_ACK = 7

RP_MESSAGE_NAMES = {
    MIG_RP_MSG_SHUT: "SHUT",
    MIG_RP_MSG_PONG: "PONG",
    MIG_RP_MSG_REQ_PAGES_ID: "REQ_PAGES_ID",
    MIG_RP_MSG_REQ_PAGES: "REQ_PAGES",
    MIG_RP_MSG_RECV_BITMAP: "RECV_BITMAP",
    MIG_RP_MSG_RESUME_ACK: "RESUME_ACK",
    MIG_RP_MSG_SWITCHOVER_ACK: "SWITCHOVER_ACK",
}

#: A return-path message starts with be16 type, be16 length of what follows.
RP_HEADER_SIZE = 4


@dataclass(frozen=True, slots=True)
class RpMessage:
    """One return-path message: its type, and the fields its type carries.

    ``value`` is SHUT's status (0: the destination finished without error) or PONG's
    ping number; ``start`` and ``length`` are a page request's byte range in the block
    ``idstr`` (None for REQ_PAGES: the block of the previous REQ_PAGES_ID).
    """

    kind: int
    value: int | None = None
    start: int | None = None
    length: int | None = None
    idstr: str | None = None

    @property
    def name(self) -> str:
        return RP_MESSAGE_NAMES.get(self.kind, f"type {self.kind}")


def rp_body_length(header: bytes) -> int:
    """The length of the body that follows a return-path message header."""
    if len(header) != RP_HEADER_SIZE:
        raise TruncatedError("return-path message header cut short", field="header", expected=4, actual=len(header))
    kind, length = BE16.unpack_from(header, 0)[0], BE16.unpack_from(header, 2)[0]
    _check_length(kind, length)
    return int(length)


# Fixed body lengths (migration.c rp_cmd_args); -1: variable (REQ_PAGES_ID, RECV_BITMAP).
_RP_LENGTHS = {
    MIG_RP_MSG_SHUT: 4,
    MIG_RP_MSG_PONG: 4,
    MIG_RP_MSG_REQ_PAGES_ID: -1,
    MIG_RP_MSG_REQ_PAGES: 12,
    MIG_RP_MSG_RECV_BITMAP: -1,
    MIG_RP_MSG_RESUME_ACK: 4,
    MIG_RP_MSG_SWITCHOVER_ACK: 0,
}


def _check_length(kind: int, length: int) -> None:
    expected = _RP_LENGTHS.get(kind)
    if expected is None:
        raise BadMagicError("unknown return-path message", field="type", expected="1..7", actual=kind)
    if expected >= 0 and length != expected:
        raise BadMagicError(
            f"return-path message {RP_MESSAGE_NAMES[kind]} has the wrong length",
            field="len",
            expected=expected,
            actual=length,
        )


# reference: source_return_path_thread (how the source reads what the destination sends)
def decode_rp_message(header: bytes, body: bytes) -> RpMessage:
    """Decode one return-path message from its header and body."""
    length = rp_body_length(header)
    kind = BE16.unpack_from(header, 0)[0]
    if len(body) != length:
        raise TruncatedError("return-path message cut short", field="body", expected=length, actual=len(body))
    if kind in (MIG_RP_MSG_SHUT, MIG_RP_MSG_PONG, MIG_RP_MSG_RESUME_ACK):
        return RpMessage(kind, value=BE32.unpack(body)[0])
    if kind == MIG_RP_MSG_REQ_PAGES:
        return RpMessage(kind, start=BE64.unpack_from(body, 0)[0], length=BE32.unpack_from(body, 8)[0])
    if kind == MIG_RP_MSG_REQ_PAGES_ID:
        if length < 13:
            raise TruncatedError("REQ_PAGES_ID without a block name", field="len", expected=">= 13", actual=length)
        n = body[12]
        if length != 13 + n:
            raise BadMagicError(
                "REQ_PAGES_ID's block name does not fill it", field="len", expected=13 + n, actual=length
            )
        return RpMessage(
            kind,
            start=BE64.unpack_from(body, 0)[0],
            length=BE32.unpack_from(body, 8)[0],
            idstr=body[13:].decode("utf-8", "replace"),
        )
    return RpMessage(kind)


def encode_rp_message(message: RpMessage) -> bytes:
    """A return-path message as the destination sends it (migrate_send_rp_message); for tests."""
    if message.kind in (MIG_RP_MSG_SHUT, MIG_RP_MSG_PONG, MIG_RP_MSG_RESUME_ACK):
        body = be32(message.value or 0)
    elif message.kind in (MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID):
        body = be64(message.start or 0) + be32(message.length or 0)
        if message.kind == MIG_RP_MSG_REQ_PAGES_ID:
            name = (message.idstr or "").encode()
            body += bytes([len(name)]) + name
    else:
        body = b""
    return BE16.pack(message.kind) + BE16.pack(len(body)) + body


# reference: qemu_savevm_send_open_return_path
def encode_open_return_path() -> bytes:
    return encode_command(MIG_CMD_OPEN_RETURN_PATH)


# reference: qemu_savevm_send_ping
def encode_ping(value: int) -> bytes:
    return encode_command(MIG_CMD_PING, be32(value))


# reference: qemu_savevm_send_postcopy_advise: ram_pagesize_summary(), qemu_target_page_size()
def encode_postcopy_advise(pagesize_summary: int = TARGET_PAGE_SIZE, target_page_size: int = TARGET_PAGE_SIZE) -> bytes:
    return encode_command(MIG_CMD_POSTCOPY_ADVISE, be64(pagesize_summary) + be64(target_page_size))


# reference: qemu_savevm_send_postcopy_listen
def encode_postcopy_listen() -> bytes:
    return encode_command(MIG_CMD_POSTCOPY_LISTEN)


# reference: qemu_savevm_send_postcopy_run
def encode_postcopy_run() -> bytes:
    return encode_command(MIG_CMD_POSTCOPY_RUN)


#: The version byte that opens a MIG_CMD_POSTCOPY_RAM_DISCARD (postcopy_ram_discard_version).
POSTCOPY_RAM_DISCARD_VERSION = 0


# reference: qemu_savevm_send_postcopy_ram_discard
def encode_postcopy_ram_discard(idstr: str, ranges: list[tuple[int, int]]) -> bytes:
    """Tell the destination to drop (start, length) byte ranges of a block. QEMU 10 needs one
    before POSTCOPY_LISTEN: LISTEN straight after ADVISE leaves the destination in the
    DISCARD state, and POSTCOPY_RUN then fails ("CMD_POSTCOPY_RUN in wrong postcopy state (2)")."""
    name = idstr.encode("utf-8")
    if not 0 < len(name) < 256 or not ranges:
        raise ValueError("a discard names a block and at least one range")
    body = bytes([POSTCOPY_RAM_DISCARD_VERSION, len(name)]) + name + b"\x00"
    body += b"".join(be64(start) + be64(length) for start, length in ranges)
    if len(body) > 0xFFFF:
        raise ValueError(f"a discard command holds at most {(0xFFFF - 3 - len(name)) // 16} ranges, not {len(ranges)}")
    return encode_command(MIG_CMD_POSTCOPY_RAM_DISCARD, body)


# reference: qemu_savevm_send_packaged (be32 length, then the blob, outside the command's be16 len)
def encode_packaged(blob: bytes) -> bytes:
    if len(blob) > MAX_VM_CMD_PACKAGED_SIZE:
        raise ValueError(f"a package holds at most {MAX_VM_CMD_PACKAGED_SIZE} bytes, not {len(blob)}")
    return encode_command(MIG_CMD_PACKAGED, be32(len(blob))) + blob

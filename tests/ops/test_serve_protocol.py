"""``ops.serve`` against a destination scripted in the test: a thread that accepts on a socket,
reads what serve sends, and answers as QEMU's return path would (PONG, REQ_PAGES_ID /
REQ_PAGES, SHUT). It drives cases a real QEMU cannot be made to produce on demand (the
real-QEMU tests are in tests/interop/test_serve.py).

Every wait is bounded by LIMIT; no assertion depends on speed.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mappedram.errors import MigrationError, UsageError
from mappedram.format.constants import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from mappedram.format.postcopy import (
    MIG_RP_MSG_PONG,
    MIG_RP_MSG_REQ_PAGES,
    MIG_RP_MSG_REQ_PAGES_ID,
    MIG_RP_MSG_SHUT,
    RpMessage,
    encode_open_return_path,
    encode_ping,
    encode_postcopy_advise,
    encode_rp_message,
)
from mappedram.image import open_file
from mappedram.layout import PING_OPENED, PING_PACKAGE, PING_RUN, PING_STARTED, StreamPlan, plan_stream
from mappedram.ops import EngineOptions, ServeOptions, ServeReport, save, serve
from mappedram.ops.server import live_spec
from tests.helpers.streams import device_state

#: The longest any wait here may take.
LIMIT = 30.0
PAGE = 4096
MACHINE = "pc-q35-10.0"

# -- the file served ------------------------------------------------------------------------------

RAM_PAGES = 40
RAM_ZERO = {0, 5, 6, 17, 39}
SMALL_PAGES = 3
SMALL_ZERO = {1}


@dataclass
class Served:
    """A file made with ops.save, its pages, and the stream plan serve sends for it."""

    path: Path
    pages: dict[str, list[bytes]]  # block -> each page's bytes

    def plan(self, postcopy: bool) -> StreamPlan:
        with open_file(self.path) as mf:
            return plan_stream([(b.idstr, b.used_length) for b in mf.blocks], live_spec(mf), postcopy=postcopy)

    def nonzero(self) -> set[tuple[str, int]]:
        return {(name, i) for name, pages in self.pages.items() for i, p in enumerate(pages) if any(p)}

    def zero(self) -> set[tuple[str, int]]:
        return {(name, i) for name, pages in self.pages.items() for i, p in enumerate(pages) if not any(p)}


def _block(n: int, zero: set[int], seed: int) -> bytearray:
    """``n`` pages of random bytes, the pages in ``zero`` all zero."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
    data[:, 0] = np.arange(n) % 255 + 1  # never a zero page by chance
    for z in zero:
        data[z] = 0
    return bytearray(data.tobytes())


def make_file(directory: Path, *, ram_pages: int = RAM_PAGES, ram_zero: set[int] = RAM_ZERO) -> Served:
    ram = _block(ram_pages, ram_zero, 1)
    small = _block(SMALL_PAGES, SMALL_ZERO, 2)
    blob, trailer = device_state()
    path = directory / "vm.mapped"
    save(path, {"pc.ram": ram, "small": small}, machine_type=MACHINE, device_state=blob, vmdesc=trailer[5:])
    pages = {
        "pc.ram": [bytes(ram[i * PAGE : (i + 1) * PAGE]) for i in range(ram_pages)],
        "small": [bytes(small[i * PAGE : (i + 1) * PAGE]) for i in range(SMALL_PAGES)],
    }
    return Served(path, pages)


@pytest.fixture
def served(tmp_path: Path) -> Served:
    return make_file(tmp_path)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for the destination's unix socket (short enough for sun_path)."""
    if len(os.fsencode(tmp_path)) < 90:
        yield tmp_path
        return
    short = tempfile.mkdtemp(prefix="mr-")
    try:
        yield Path(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


# -- the scripted destination ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One page record as the destination parsed it; ``data`` None for a ZERO record."""

    idstr: str
    page: int
    data: bytes | None

    @property
    def key(self) -> tuple[str, int]:
        return self.idstr, self.page


class Wire:
    """The destination's end of the socket: exact reads, the page-record parser, rp messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0
        self.last_block: str | None = None

    def exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"stream ended after {len(out)} of {n} bytes")
            out += chunk
        self.received += n
        return bytes(out)

    def rest(self) -> bytes:
        """Everything until serve shuts its side (or closes)."""
        out = bytearray()
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        self.received += len(out)
        return bytes(out)

    def expect(self, data: bytes, what: str) -> None:
        got = self.exact(len(data))
        assert got == data, f"{what}: got {got[:64].hex()}..., expected {data[:64].hex()}..."

    def record(self) -> Record | None:
        """The next page record; None at the EOS that ends the section."""
        (word,) = struct.unpack(">Q", self.exact(8))
        flags, addr = word & (PAGE - 1), word & ~(PAGE - 1)
        if flags == RAM_SAVE_FLAG_EOS:
            assert addr == 0
            return None
        base = flags & ~RAM_SAVE_FLAG_CONTINUE
        assert base in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO), f"record flags {flags:#x}"
        if flags & RAM_SAVE_FLAG_CONTINUE:
            assert self.last_block is not None, "CONTINUE before any named record"
            idstr = self.last_block
        else:
            n = self.exact(1)[0]
            idstr = self.exact(n).decode()
        self.last_block = idstr
        if base == RAM_SAVE_FLAG_PAGE:
            return Record(idstr, addr // PAGE, self.exact(PAGE))
        assert self.exact(1) == b"\x00", "ZERO record with a non-zero fill byte"
        return Record(idstr, addr // PAGE, None)

    def records(self, count: int | None = None) -> list[Record]:
        """``count`` records, or all up to the EOS (consumed)."""
        out: list[Record] = []
        while count is None or len(out) < count:
            rec = self.record()
            if rec is None:
                assert count is None, f"EOS after {len(out)} of {count} records"
                break
            out.append(rec)
        return out

    def send(self, kind: int, **fields: object) -> None:
        self.sock.sendall(encode_rp_message(RpMessage(kind, **fields)))  # type: ignore[arg-type]

    def pong(self, value: int) -> None:
        self.send(MIG_RP_MSG_PONG, value=value)

    def shut(self, status: int) -> None:
        self.send(MIG_RP_MSG_SHUT, value=status)

    def req(self, start_page: int, pages: int = 1, idstr: str | None = None) -> None:
        if idstr is None:
            self.send(MIG_RP_MSG_REQ_PAGES, start=start_page * PAGE, length=pages * PAGE)
        else:
            self.send(MIG_RP_MSG_REQ_PAGES_ID, start=start_page * PAGE, length=pages * PAGE, idstr=idstr)


Script = Callable[[Wire], None]


class Destination:
    """A listener and a thread running ``script`` on the one connection it accepts."""

    def __init__(self, directory: Path, script: Script, *, kind: str = "unix") -> None:
        self.script = script
        self.error: BaseException | None = None
        self.wire: Wire | None = None
        if kind == "unix":
            path = directory / "dest.sock"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(os.fspath(path))
            self.address = f"unix:{path}"
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(1)
        self.listener.settimeout(LIMIT)
        self.thread = threading.Thread(target=self._run, name="scripted-destination", daemon=True)

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(LIMIT)
                self.wire = Wire(sock)
                self.script(self.wire)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Destination:
        self.thread.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.thread.join(LIMIT)
        self.listener.close()
        if exc is not None:  # serve failed unexpectedly: say what the destination saw, keep serve's error
            if self.error is not None:
                exc.add_note(f"the scripted destination failed too: {self.error!r}")
            return
        assert not self.thread.is_alive(), "the scripted destination did not finish"
        if self.error is not None:
            raise AssertionError(f"the scripted destination failed: {self.error!r}") from self.error


def until_eof(w: Wire) -> None:
    """Read and drop whatever serve still sends, until it closes."""
    w.rest()


def open_stream(w: Wire, plan: StreamPlan) -> None:
    """Read the opening (checked), answer PING 1, read the head."""
    assert plan.opening.startswith(b"QEVM\x00\x00\x00\x03")
    assert plan.opening.endswith(encode_open_return_path() + encode_ping(PING_OPENED))
    w.expect(plan.opening, "opening")
    w.pong(PING_OPENED)
    w.expect(plan.head, "head")


def open_postcopy(w: Wire, plan: StreamPlan) -> None:
    """Through the package (its pings answered as QEMU does) and the PART header."""
    assert plan.head.startswith(encode_postcopy_advise())
    open_stream(w, plan)
    w.expect(plan.package, "package")
    at = 0
    for ping in (PING_PACKAGE, PING_RUN, PING_STARTED):
        at = plan.package.index(encode_ping(ping), at)
        w.pong(ping)
    w.expect(plan.part_head, "PART header")


def precopy_body(w: Wire, plan: StreamPlan) -> list[Record]:
    """Everything after the head of a precopy stream: the pages, then the checked tail."""
    w.expect(plan.part_head, "PART header")
    records = w.records()
    w.expect(plan.part_end[8:], "PART footer")
    tail = w.rest()
    assert tail == plan.precopy_tail
    return records


def check_pages(served: Served, records: list[Record]) -> None:
    """Every page of a PAGE record holds the file's bytes; a ZERO record is for a zero page."""
    for r in records:
        expected = served.pages[r.idstr][r.page]
        if r.data is None:
            assert not any(expected), f"ZERO record for {r.key}, which holds data"
        else:
            assert r.data == expected, f"wrong bytes for {r.key}"


def run_serve(address: str, served: Served, options: ServeOptions, **kw: object) -> ServeReport:
    return serve(served.path, address, options=options, **kw)  # type: ignore[arg-type]


# -- precopy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "channels", "read_pages"), [("unix", 4, 3), ("unix", 1, 2048), ("tcp", 3, 5), ("unix", 8, 1)]
)
def test_precopy_sends_every_data_page_once(
    served: Served, sock_dir: Path, kind: str, channels: int, read_pages: int
) -> None:
    """Every page that holds data arrives once, in block and page order, with its bytes; zero
    pages are not sent; SHUT(0) gives an ok report."""
    plan = served.plan(postcopy=False)
    got: dict[str, list[Record]] = {}

    def script(w: Wire) -> None:
        open_stream(w, plan)
        got["records"] = precopy_body(w, plan)
        w.shut(0)

    started: list[int] = []
    progress: list[int] = []
    engine = EngineOptions(channels=channels, on_start=started.append, progress=progress.append)
    with Destination(sock_dir, script, kind=kind) as dest:
        report = run_serve(
            dest.address, served, ServeOptions(timeout=LIMIT, read_pages=read_pages), engine=engine
        )
    records = got["records"]
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)), "a page was sent twice"
    assert set(keys) == served.nonzero()
    assert all(r.data is not None for r in records)
    check_pages(served, records)
    order = {"pc.ram": 0, "small": 1}
    assert keys == sorted(keys, key=lambda k: (order[k[0]], k[1]))

    assert report.ok
    assert report.destination_status == 0
    assert report.mode == "precopy"
    assert report.machine_type == MACHINE
    assert report.ram_bytes == (RAM_PAGES + SMALL_PAGES) * PAGE
    assert report.pages_sent == len(served.nonzero())
    assert report.pages_zero == len(served.zero())
    assert report.pages_requested == 0 and report.requests == 0
    assert report.channels == channels
    assert dest.wire is not None and report.bytes_sent == dest.wire.received
    assert started == [len(served.nonzero()) * PAGE]
    assert sum(progress) == len(served.nonzero()) * PAGE
    d = report.to_dict()
    assert d["ok"] is True and d["mode"] == "precopy"


def test_precopy_only_zero_pages(tmp_path: Path, sock_dir: Path) -> None:
    """A file whose RAM is all zero: no page records at all, and the stream still completes."""
    path = tmp_path / "zero.mapped"
    save(path, {"pc.ram": bytearray(8 * PAGE)}, machine_type=MACHINE)
    with open_file(path) as mf:
        plan = plan_stream([(b.idstr, b.used_length) for b in mf.blocks], live_spec(mf), postcopy=False)
    got: list[list[Record]] = []

    def script(w: Wire) -> None:
        open_stream(w, plan)
        got.append(precopy_body(w, plan))
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = serve(path, dest.address, options=ServeOptions(timeout=LIMIT))
    assert got == [[]]
    assert report.ok and report.pages_sent == 0 and report.pages_zero == 8


def test_precopy_destination_reports_failure(served: Served, sock_dir: Path) -> None:
    """SHUT(1) after the whole stream: MigrationError saying the destination failed."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        open_stream(w, plan)
        precopy_body(w, plan)
        w.shut(1)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="fail") as info:
        run_serve(dest.address, served, ServeOptions(timeout=LIMIT))
    assert "status 1" in str(info.value)
    assert info.value.destination == dest.address
    assert info.value.exit_code == 3


def test_precopy_destination_fails_at_once(served: Served, sock_dir: Path) -> None:
    """SHUT(1) instead of the first PONG: MigrationError naming the wait, nothing more sent."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        w.expect(plan.opening, "opening")
        w.shut(1)
        assert w.rest() == b""  # serve sent nothing after the opening

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="fail") as info:
        run_serve(dest.address, served, ServeOptions(timeout=LIMIT))
    assert "first ping" in str(info.value)


def test_precopy_destination_closes_without_shut(served: Served, sock_dir: Path) -> None:
    """The destination reads everything and closes without SHUT: MigrationError."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        open_stream(w, plan)
        precopy_body(w, plan)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="without saying") as info:
        run_serve(dest.address, served, ServeOptions(timeout=LIMIT))
    assert info.value.stage == "finish"


def test_precopy_destination_closes_early(served: Served, sock_dir: Path) -> None:
    """The destination closes right after the opening: MigrationError, not a hang."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        w.expect(plan.opening, "opening")

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="closed the connection"):
        run_serve(dest.address, served, ServeOptions(timeout=LIMIT))


def test_precopy_destination_closes_mid_stream(tmp_path: Path, sock_dir: Path) -> None:
    """The destination goes away while pages are sent (more than the socket buffers): MigrationError."""
    big = make_file(tmp_path, ram_pages=8192, ram_zero={3})
    plan = big.plan(postcopy=False)

    def script(w: Wire) -> None:
        open_stream(w, plan)
        w.expect(plan.part_head, "PART header")
        w.records(10)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="closed the connection"):
        run_serve(dest.address, big, ServeOptions(timeout=LIMIT, read_pages=64))


def test_precopy_destination_never_answers(served: Served, sock_dir: Path) -> None:
    """No answer to the first ping: MigrationError naming that wait, after the time limit."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        w.expect(plan.opening, "opening")
        until_eof(w)  # silent until serve gives up and closes

    t0 = time.monotonic()
    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="first ping") as info:
        run_serve(dest.address, served, ServeOptions(timeout=1))
    assert "did not answer within 1 s" in str(info.value)
    assert info.value.stage == "configuration"
    assert time.monotonic() - t0 < LIMIT


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x09\x00\x00", b"\x00\x01\x00\x05" + bytes(5), b"\x00\x03\x00\x0e" + bytes(12) + b"\x05x"],
    ids=["unknown type", "SHUT of 5 bytes", "REQ_PAGES_ID name length lies"],
)
def test_malformed_return_path_message(served: Served, sock_dir: Path, garbage: bytes) -> None:
    """A return-path message that does not decode: MigrationError (not a FormatError)."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        w.expect(plan.opening, "opening")
        w.sock.sendall(garbage)
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="return path"):
        run_serve(dest.address, served, ServeOptions(timeout=LIMIT))


def test_nothing_listens(served: Served, sock_dir: Path) -> None:
    """No destination at all: MigrationError at the connect stage once connect_retry is over."""
    with pytest.raises(MigrationError) as info:
        run_serve(f"unix:{sock_dir / 'none.sock'}", served, ServeOptions(timeout=LIMIT, connect_retry=0.1))
    assert info.value.stage == "connect"


# -- postcopy -----------------------------------------------------------------------------------------


def postcopy_rest(w: Wire, plan: StreamPlan) -> list[Record]:
    """The background records up to the EOS, then the checked end of the stream."""
    records = w.records()
    w.expect(plan.part_end[8:], "PART footer")
    assert plan.postcopy_tail == bytes.fromhex("0300000001" "0000000000000010" "7e00000001" "00")
    assert w.rest() == plan.postcopy_tail  # SECTION_END + EOS + footer + EOF, then serve shuts its side
    return records


def test_postcopy_requests_first_each_page_once(served: Served, sock_dir: Path) -> None:
    """Requested pages (a zero page, a page asked for twice, REQ_PAGES without an id) come before
    any background page; every page arrives at most once; zero pages asked for are ZERO records;
    a request after the whole stream is ignored."""
    plan = served.plan(postcopy=True)
    got: dict[str, list[Record]] = {}
    # (idstr or None for REQ_PAGES, first page, pages) -> the records each request should bring
    asks: list[tuple[str | None, int, int, list[tuple[str, int, bool]]]] = [
        ("pc.ram", 10, 2, [("pc.ram", 10, True), ("pc.ram", 11, True)]),
        ("small", 1, 1, [("small", 1, False)]),  # a zero page: a ZERO record
        (None, 0, 1, [("small", 0, True)]),  # REQ_PAGES: the block of the previous REQ_PAGES_ID
        ("pc.ram", 10, 1, []),  # asked for before: nothing
        ("pc.ram", 4, 3, [("pc.ram", 4, True), ("pc.ram", 5, False), ("pc.ram", 6, False)]),  # 5, 6 are zero
        (None, 11, 2, [("pc.ram", 12, True)]),  # 11 sent already, 12 new
    ]
    distinct = sum(len(a[3]) for a in asks)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        first: list[Record] = []
        for idstr, start, count, expect in asks:
            w.req(start, count, idstr)
            recs = w.records(len(expect))  # nothing else may come before them
            assert [(r.idstr, r.page, r.data is not None) for r in recs] == expect
            first += recs
        got["first"] = first
        got["rest"] = postcopy_rest(w, plan)
        w.req(0, 1, "pc.ram")  # after the whole stream (a zero page never sent): ignored
        w.req(7, 2, None)
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = run_serve(
            dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=distinct, send_pages=2)
        )
    first, rest = got["first"], got["rest"]
    records = first + rest
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)), "a page was sent twice (QEMU fails on a page placed twice)"
    requested = {r.key for r in first}
    assert {r.key for r in rest} == served.nonzero() - requested
    assert all(r.data is not None for r in rest)
    assert {r.key for r in records if r.data is None} == {("small", 1), ("pc.ram", 5), ("pc.ram", 6)}
    check_pages(served, records)

    assert report.ok and report.mode == "postcopy"
    assert report.pages_requested == distinct
    assert report.requests == len(asks)
    assert report.pages_sent == len(served.nonzero()) + 3
    assert report.seconds_to_run is not None
    assert report.request_latency_us is not None and report.request_latency_us["max"] >= 0
    assert any("zero pages" in n for n in report.notes)
    assert dest.wire is not None and report.bytes_sent == dest.wire.received


def test_postcopy_requests_while_streaming(tmp_path: Path, sock_dir: Path) -> None:
    """Requests sent all at once while serve streams in the background (background_after=0):
    every data page exactly once, and ZERO records only for zero pages asked for."""
    big = make_file(tmp_path, ram_pages=2048, ram_zero={0, 1, 2, 700, 701, 2047})
    plan = big.plan(postcopy=True)
    got: list[list[Record]] = []
    wanted = [("pc.ram", 2040, 8), ("pc.ram", 1000, 3), ("pc.ram", 0, 3), (None, 699, 4), ("small", 0, 3),
              ("pc.ram", 1000, 3), (None, 5, 1)]  # fmt: skip

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        for idstr, start, count in wanted:
            w.req(start, count, idstr)
        got.append(postcopy_rest(w, plan))
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = run_serve(dest.address, big, ServeOptions(postcopy=True, timeout=LIMIT, send_pages=4, read_pages=128))
    records = got[0]
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)), "a page was sent twice"
    asked = set()
    block = None
    for idstr, start, count in wanted:
        block = idstr or block
        assert block is not None
        asked |= {(block, p) for p in range(start, start + count)}
    assert {r.key for r in records if r.data is not None} == big.nonzero()
    assert {r.key for r in records if r.data is None} <= big.zero() & asked
    check_pages(big, records)
    assert report.ok
    assert report.pages_sent == len(records)


def test_postcopy_requests_before_run(served: Served, sock_dir: Path) -> None:
    """Requests that arrive while the package loads (before PONG 3) are answered first, right
    after the PART header."""
    plan = served.plan(postcopy=True)
    got: list[list[Record]] = []

    def script(w: Wire) -> None:
        open_stream(w, plan)
        w.expect(plan.package, "package")
        w.req(3, 1, "pc.ram")
        w.req(1, 1, "small")
        for ping in (PING_PACKAGE, PING_RUN, PING_STARTED):
            w.pong(ping)
        w.expect(plan.part_head, "PART header")
        first = w.records(2)
        assert [(r.key, r.data is None) for r in first] == [(("pc.ram", 3), False), (("small", 1), True)]
        got.append(first + postcopy_rest(w, plan))
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=2))
    keys = [r.key for r in got[0]]
    assert len(keys) == len(set(keys))
    assert {r.key for r in got[0] if r.data is not None} == served.nonzero()
    check_pages(served, got[0])
    assert report.ok and report.pages_requested == 2 and report.requests == 2


def test_postcopy_progress_covers_requested_pages(served: Served, sock_dir: Path) -> None:
    """The progress a postcopy serve reports adds up to the total it announced, requested
    pages included."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        w.req(10, 1, "pc.ram")
        w.records(1)
        postcopy_rest(w, plan)
        w.shut(0)

    started: list[int] = []
    progress: list[int] = []
    engine = EngineOptions(on_start=started.append, progress=progress.append)
    with Destination(sock_dir, script) as dest:
        report = run_serve(
            dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=1), engine=engine
        )
    assert report.ok
    assert started == [len(served.nonzero()) * PAGE]
    assert sum(progress) == started[0]


@pytest.mark.parametrize(
    ("asks", "said"),
    [
        ([("nope", 0, 1)], "'nope'"),
        ([("small", 2, 2)], "'small'"),  # pages 2..3 of a 3-page block
        ([("small", 3, 1)], "'small'"),  # just past the end
        ([("pc.ram", 0, 1), (None, RAM_PAGES, 1)], "'pc.ram'"),  # REQ_PAGES past the end
        ([("pc.ram", RAM_PAGES - 1, 1 << 19)], "'pc.ram'"),  # 2 GiB
        ([(None, 0, 1)], "before naming a block"),
    ],
    ids=["unknown block", "range past the end", "start at the end", "REQ_PAGES past the end", "huge", "no block"],
)
def test_postcopy_bad_request(
    served: Served, sock_dir: Path, asks: list[tuple[str | None, int, int]], said: str
) -> None:
    """A request for an unknown block or past a block's end: MigrationError."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        for idstr, start, count in asks:
            w.req(start, count, idstr)
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match=said) as info:
        run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=1 << 40))
    assert info.value.stage == "postcopy"


@pytest.mark.parametrize(
    ("start", "length"), [(100, PAGE), (PAGE, 100), (PAGE, 0)], ids=["start unaligned", "length unaligned", "empty"]
)
def test_postcopy_unaligned_request(served: Served, sock_dir: Path, start: int, length: int) -> None:
    """A request that is not whole pages: MigrationError."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        w.send(MIG_RP_MSG_REQ_PAGES_ID, start=start, length=length, idstr="pc.ram")
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="asked for bytes"):
        run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=1 << 40))


def test_postcopy_no_answer_to_the_package(served: Served, sock_dir: Path) -> None:
    """The destination reads the package but never answers PING 3: MigrationError naming the wait."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_stream(w, plan)
        w.expect(plan.package, "package")
        w.pong(PING_PACKAGE)
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="device state") as info:
        run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=1))
    assert info.value.stage == "package"


def test_postcopy_no_requests_before_background(served: Served, sock_dir: Path) -> None:
    """background_after=1 and the destination never asks: MigrationError after the time limit."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="ask for pages"):
        run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=1, background_after=1))


def test_postcopy_destination_fails(served: Served, sock_dir: Path) -> None:
    """SHUT(1) in the middle of postcopy: MigrationError saying the destination failed."""
    plan = served.plan(postcopy=True)

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        w.req(10, 1, "pc.ram")
        w.records(1)
        w.shut(1)
        until_eof(w)

    with Destination(sock_dir, script) as dest, pytest.raises(MigrationError, match="fail") as info:
        run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT, background_after=1 << 40))
    assert "status 1" in str(info.value)


def test_postcopy_slow_requests_before_background(served: Served, sock_dir: Path) -> None:
    """A destination asking for a page every second, with a 2.5 s time limit: each wait is well
    under the limit, so serve keeps answering until background_after pages were asked for."""
    plan = served.plan(postcopy=True)
    pages = [10, 11, 12, 13]

    def script(w: Wire) -> None:
        open_postcopy(w, plan)
        for k, p in enumerate(pages):
            if k:
                time.sleep(1.0)
            w.req(p, 1, "pc.ram")
            assert w.records(1)[0].key == ("pc.ram", p)
        postcopy_rest(w, plan)
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = run_serve(
            dest.address, served, ServeOptions(postcopy=True, timeout=2.5, background_after=len(pages))
        )
    assert report.ok


# -- the destination's address -------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["tcp:192.0.2.1:4444", "tcp:198.51.100.20:1", "tcp:[2001:db8::1]:4444"])
def test_tcp_to_another_host_needs_insecure(served: Served, to: str) -> None:
    """A non-loopback TCP destination without ``insecure`` is a UsageError before anything is
    opened or connected (the file need not even exist)."""
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="insecure"):
        run_serve(to, served, ServeOptions(timeout=LIMIT))
    with pytest.raises(UsageError, match="insecure"):
        serve(served.path.parent / "does-not-exist", to, options=ServeOptions(timeout=LIMIT))
    assert time.monotonic() - t0 < LIMIT


@pytest.mark.parametrize("to", ["", "unix:", "tcp:host", "tcp:127.0.0.1:0", "file:/tmp/x", "exec:true"])
def test_bad_address_is_usage_error(served: Served, to: str) -> None:
    """An address serve cannot parse is a UsageError."""
    with pytest.raises(UsageError):
        run_serve(to, served, ServeOptions(timeout=LIMIT))


def test_unencodable_host_is_usage_error(served: Served) -> None:
    """tcp:a..b:4444 (an empty DNS label): a mappedram error, not UnicodeError."""
    with pytest.raises(UsageError):
        run_serve("tcp:a..b:4444", served, ServeOptions(timeout=LIMIT))


def test_tcp_loopback_by_name(served: Served, sock_dir: Path) -> None:
    """tcp:localhost:PORT is loopback: served without ``insecure``."""
    plan = served.plan(postcopy=False)

    def script(w: Wire) -> None:
        open_stream(w, plan)
        precopy_body(w, plan)
        w.shut(0)

    with Destination(sock_dir, script, kind="tcp") as dest:
        to = dest.address.replace("127.0.0.1", "localhost")
        report = run_serve(to, served, ServeOptions(timeout=LIMIT))
    assert report.ok and report.destination == to


def test_postcopy_pages_asked_for_while_devices_load(served: Served, sock_dir: Path) -> None:
    """QEMU loads the package's devices before it answers ping 3, and loading may touch guest
    RAM (virtio_load reads the rings): a page asked for then must come without waiting for
    PONG 3, or neither side ever moves. The destination here holds PONG 3 until it has it."""
    plan = served.plan(postcopy=True)
    got: list[list[Record]] = []
    ring = max(p for i, p in served.nonzero() if i == "pc.ram")  # a device's ring, say: a page with data

    def script(w: Wire) -> None:
        open_stream(w, plan)
        w.expect(plan.package, "package")
        w.pong(PING_PACKAGE)
        w.req(ring, 1, "pc.ram")
        w.expect(plan.part_head, "PART header")
        first = w.records(1)
        assert first[0].key == ("pc.ram", ring) and first[0].data == served.pages["pc.ram"][ring]
        w.pong(PING_RUN)  # only now is the device state loaded
        w.pong(PING_STARTED)
        got.append(first + postcopy_rest(w, plan))
        w.shut(0)

    with Destination(sock_dir, script) as dest:
        report = run_serve(dest.address, served, ServeOptions(postcopy=True, timeout=LIMIT))
    keys = [r.key for r in got[0]]
    assert len(keys) == len(set(keys))
    assert {r.key for r in got[0] if r.data is not None} == served.nonzero()
    assert report.ok and report.requests == 1

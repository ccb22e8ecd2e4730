"""``engine.netchannel`` over real sockets (unix and loopback TCP), with and without TLS (against
Python's ``ssl`` as the server, certificates made by the ``openssl`` command for each run), and
``engine.executor.ReadAhead``.

Every wait is bounded by LIMIT; no assertion depends on how fast anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mappedram.engine.executor import ReadAhead
from mappedram.engine.netchannel import (
    Connection,
    ConnectionLost,
    FrameReceiver,
    TlsError,
    is_loopback,
    parse_address,
    tls_client_context,
)
from mappedram.errors import UsageError

#: The longest any wait in these tests may take.
LIMIT = 30.0


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    """A path for a unix socket in tmp_path (or a short private directory if tmp_path is too
    long for sun_path)."""
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) < 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="mr-")
    try:
        yield Path(short) / "s.sock"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def unix_listener(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a listener of the same test before
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen(4)
    sock.settimeout(LIMIT)
    return sock


def tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(LIMIT)
    return sock


@contextlib.contextmanager
def connected(kind: str, path: Path, *, timeout: float = LIMIT) -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection (the client) and the server's end of it, both closed afterwards."""
    listener = unix_listener(path) if kind == "unix" else tcp_listener()
    address = f"unix:{path}" if kind == "unix" else f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    try:
        conn = Connection.connect(address, timeout=timeout)
        peer, _ = listener.accept()
        peer.settimeout(LIMIT)
        try:
            yield conn, peer
        finally:
            conn.close()
            peer.close()
    finally:
        listener.close()


def recv_all(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def later(delay: float, fn: Callable[[], object]) -> threading.Thread:
    """``fn()`` on a thread after ``delay`` seconds."""

    def run() -> None:
        time.sleep(delay)
        fn()

    return in_thread(run)


KINDS = ["unix", "tcp"]

# -- parse_address, is_loopback ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/tmp/x.sock", ("unix", "/tmp/x.sock")),
        ("unix:relative/x.sock", ("unix", "relative/x.sock")),
        ("unix:/odd:name", ("unix", "/odd:name")),
        ("tcp:127.0.0.1:4444", ("tcp", ("127.0.0.1", 4444))),
        ("tcp:localhost:1", ("tcp", ("localhost", 1))),
        ("tcp:example.org:65535", ("tcp", ("example.org", 65535))),
        ("tcp:[::1]:4444", ("tcp", ("::1", 4444))),
        ("tcp:::1:4444", ("tcp", ("::1", 4444))),
    ],
)
def test_parse_address(address: str, expected: tuple[str, object]) -> None:
    """QEMU's unix:PATH and tcp:HOST:PORT (IPv6 in brackets or not)."""
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "unix",
        "unix:",
        "UNIX:/tmp/x",
        "tcp",
        "tcp:",
        "tcp:host",
        "tcp:host:",
        "tcp::80",
        "tcp:[]:80",
        "tcp:host:0",
        "tcp:host:65536",
        "tcp:host:-1",
        "tcp:host:80x",
        "tcp:host: 80",
        "tcp:host:²",
        "tcp:[::1]",
        "fd:3",
        "exec:cat",
        "file:/tmp/x",
        "rdma:host:80",
        "/tmp/x.sock",
    ],
)
def test_parse_address_refuses(address: str) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_address(address)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("::1", True),
        ("192.0.2.1", False),
        ("198.51.100.7", False),
        ("0.0.0.0", False),
        ("2001:db8::1", False),
        ("::ffff:192.0.2.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Loopback addresses and localhost are; TEST-NET and the wildcard are not."""
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    assert is_loopback(host) is loopback


def test_is_loopback_unresolvable() -> None:
    """A host that does not resolve is not loopback (an error is no permission)."""
    assert is_loopback("") is False
    assert is_loopback("a\x00b") is False


@pytest.mark.parametrize("host", ["a..b", "a" * 64, "x." + "a" * 64 + ".org"])
def test_is_loopback_unencodable_name(host: str) -> None:
    """A host name DNS cannot even encode is not loopback: False, not an exception."""
    assert is_loopback(host) is False


def test_connect_unencodable_name() -> None:
    """A TCP host name that cannot be resolved (nor even encoded) is ConnectionLost."""
    with pytest.raises(ConnectionLost):
        Connection.connect("tcp:a..b:4444", timeout=LIMIT, retry_for=0)


# -- connect -----------------------------------------------------------------------------------


def test_connect_unix_retries_until_the_socket_appears(sock_path: Path) -> None:
    """retry_for keeps trying while the socket file does not exist yet."""
    made: list[socket.socket] = []

    def late() -> None:
        time.sleep(0.3)
        made.append(unix_listener(sock_path))

    t = in_thread(late)
    try:
        conn = Connection.connect(f"unix:{sock_path}", timeout=LIMIT, retry_for=LIMIT)
        t.join(LIMIT)
        assert made
        peer, _ = made[0].accept()
        conn.send(b"hello")
        assert recv_all(peer, 5) == b"hello"
        peer.close()
        conn.close()
    finally:
        t.join(LIMIT)
        for s in made:
            s.close()


def test_connect_unix_retries_while_nothing_listens(sock_path: Path) -> None:
    """A socket file that is bound but not listening yet (ECONNREFUSED) is retried too."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(sock_path))
    sock.settimeout(LIMIT)
    with pytest.raises(ConnectionLost) as info:
        Connection.connect(f"unix:{sock_path}", timeout=LIMIT, retry_for=0)
    assert not info.value.timed_out
    t = later(0.3, lambda: sock.listen(1))
    try:
        conn = Connection.connect(f"unix:{sock_path}", timeout=LIMIT, retry_for=LIMIT)
        conn.close()
    finally:
        t.join(LIMIT)
        sock.close()


def test_connect_tcp_retries_until_it_listens() -> None:
    """TCP: a port that refuses (bound, not listening) is retried until it listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(LIMIT)
    port = sock.getsockname()[1]
    t = later(0.3, lambda: sock.listen(1))
    try:
        conn = Connection.connect(f"tcp:127.0.0.1:{port}", timeout=LIMIT, retry_for=LIMIT)
        t.join(LIMIT)
        peer, _ = sock.accept()
        conn.send(b"x")
        assert recv_all(peer, 1) == b"x"
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        peer.close()
        conn.close()
    finally:
        t.join(LIMIT)
        sock.close()


def test_connect_to_nothing_fails_fast(sock_path: Path) -> None:
    """With retry_for=0 a missing socket or a refusing port raises ConnectionLost at once."""
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost, match="nothing listens") as info:
        Connection.connect(f"unix:{sock_path}", timeout=LIMIT, retry_for=0)
    assert not info.value.timed_out
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ConnectionLost, match="nothing listens"):
            Connection.connect(f"tcp:127.0.0.1:{sock.getsockname()[1]}", timeout=LIMIT, retry_for=0)
    finally:
        sock.close()
    assert time.monotonic() - t0 < LIMIT / 2  # not the retry or connect time limit


def test_connect_gives_up_after_retry_for(sock_path: Path) -> None:
    """Nothing ever listens: ConnectionLost once retry_for has passed."""
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        Connection.connect(f"unix:{sock_path}", timeout=LIMIT, retry_for=0.3)
    assert 0.3 <= time.monotonic() - t0 < LIMIT


def test_connect_odd_targets(tmp_path: Path) -> None:
    """A path too long for a unix socket, a regular file, and a bad address."""
    with pytest.raises(ConnectionLost):
        Connection.connect("unix:/" + "x" * 200, timeout=LIMIT, retry_for=0)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with pytest.raises(ConnectionLost):
        Connection.connect(f"unix:{plain}", timeout=LIMIT, retry_for=0)
    with pytest.raises(ValueError):
        Connection.connect("vsock:1:2", timeout=LIMIT)


# -- send, recv_exact ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_send_recv_exact(kind: str, sock_path: Path) -> None:
    """send sends all (any buffer type) and counts it; recv_exact gets exactly n bytes,
    however the peer splits them."""
    with connected(kind, sock_path) as (conn, peer):
        data = os.urandom(3 << 20)
        got: list[bytes] = []
        t = in_thread(lambda: got.append(recv_all(peer, len(data) + 6)))
        conn.send(data)
        conn.send(bytearray(b"abc"))
        conn.send(memoryview(struct.pack(">HH", 1, 2)).cast("B")[1:])
        t.join(LIMIT)
        assert got == [data + b"abc" + b"\x01\x00\x02"]
        assert conn.bytes_sent == len(data) + 6

        def dribble() -> None:
            for b in b"0123456789":
                peer.sendall(bytes([b]))
                time.sleep(0.005)

        t = in_thread(dribble)
        assert conn.recv_exact(4) == b"0123"
        assert conn.recv_exact(6) == b"456789"
        t.join(LIMIT)


@pytest.mark.parametrize("kind", KINDS)
def test_recv_exact_clean_close_and_cut_message(kind: str, sock_path: Path) -> None:
    """b"" when the peer closes before a message; ConnectionLost when it closes inside one."""
    with connected(kind, sock_path) as (conn, peer):
        peer.sendall(b"abcd" + b"xy")
        peer.shutdown(socket.SHUT_WR)
        assert conn.recv_exact(4) == b"abcd"
        with pytest.raises(ConnectionLost, match="middle of a message") as info:
            conn.recv_exact(4)
        assert not info.value.timed_out
    with connected(kind, sock_path) as (conn, peer):
        peer.close()
        assert conn.recv_exact(4) == b""
        assert conn.recv_exact(4, idle_ok=True) == b""


@pytest.mark.parametrize("kind", KINDS)
def test_recv_exact_times_out(kind: str, sock_path: Path) -> None:
    """A peer that sends nothing: ConnectionLost(timed_out=True) after the time limit, also
    with idle_ok once a message has begun."""
    with connected(kind, sock_path, timeout=0.2) as (conn, peer):
        with pytest.raises(ConnectionLost) as info:
            conn.recv_exact(1)
        assert info.value.timed_out
        peer.sendall(b"ab")
        with pytest.raises(ConnectionLost) as info:
            conn.recv_exact(4, idle_ok=True)
        assert info.value.timed_out


@pytest.mark.parametrize("kind", KINDS)
def test_send_to_a_closed_peer(kind: str, sock_path: Path) -> None:
    """A peer that closes: send raises ConnectionLost (not timed out) within a few sends."""
    with connected(kind, sock_path) as (conn, peer):
        peer.close()
        deadline = time.monotonic() + LIMIT
        with pytest.raises(ConnectionLost) as info:
            while time.monotonic() < deadline:
                conn.send(b"z" * 65536)
                time.sleep(0.01)
        assert not info.value.timed_out
        assert conn.address in str(info.value)


def test_send_to_a_reset_peer(sock_path: Path) -> None:
    """TCP: a peer that resets (SO_LINGER 0) makes recv_exact and send raise ConnectionLost."""
    del sock_path
    listener = tcp_listener()
    try:
        conn = Connection.connect(f"tcp:127.0.0.1:{listener.getsockname()[1]}", timeout=LIMIT)
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        with pytest.raises(ConnectionLost):
            conn.recv_exact(4)
        with pytest.raises(ConnectionLost):
            deadline = time.monotonic() + LIMIT
            while time.monotonic() < deadline:
                conn.send(b"z" * 4096)
                time.sleep(0.01)
        conn.close()
        conn.close()  # twice is fine
    finally:
        listener.close()


@pytest.mark.parametrize("kind", KINDS)
def test_send_to_a_peer_that_never_reads(kind: str, sock_path: Path) -> None:
    """64 MiB to a peer that reads nothing: ConnectionLost(timed_out=True) about the time limit."""
    with connected(kind, sock_path, timeout=0.5) as (conn, _peer):
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost) as info:
            conn.send(bytes(64 << 20))
        assert info.value.timed_out
        assert time.monotonic() - t0 < LIMIT


def test_send_to_a_slow_but_steady_reader(sock_path: Path) -> None:
    """A peer that reads steadily but slower than the whole send's duration is no stall: the
    send completes (the time limit is on a send that makes no progress)."""
    size = 48 << 20
    with connected("unix", sock_path, timeout=2.0) as (conn, peer):
        got = [0]

        def reader() -> None:
            while got[0] < size:
                chunk = peer.recv(256 << 10)
                if not chunk:
                    return
                got[0] += len(chunk)
                time.sleep(0.02)  # at most ~12 MiB/s: the send takes seconds, progressing all along

        t = in_thread(reader)
        try:
            conn.send(bytes(size))
        finally:
            conn.close()
            t.join(LIMIT)
        assert got[0] == size


def test_send_is_whole_per_call(sock_path: Path) -> None:
    """Several threads sending: each call's bytes arrive together."""
    n, each = 8, 256 << 10
    with connected("unix", sock_path) as (conn, peer):
        got: list[bytes] = []
        t = in_thread(lambda: got.append(recv_all(peer, n * each)))
        senders = [in_thread(lambda i=i: conn.send(bytes([i]) * each)) for i in range(n)]  # type: ignore[misc]
        for s in senders:
            s.join(LIMIT)
        t.join(LIMIT)
        data = got[0]
        assert len(data) == n * each
        pieces = [data[k : k + each] for k in range(0, len(data), each)]
        assert sorted(p[0] for p in pieces) == list(range(n))
        assert all(p == bytes([p[0]]) * each for p in pieces)


def test_shutdown_write(sock_path: Path) -> None:
    """shutdown_write: the peer reads end of stream and can still answer."""
    with connected("unix", sock_path) as (conn, peer):
        conn.send(b"last")
        conn.shutdown_write()
        assert recv_all(peer, 10) == b"last"
        peer.sendall(b"ok")
        assert conn.recv_exact(2) == b"ok"


# -- FrameReceiver ----------------------------------------------------------------------------


class Frames:
    """Collects what a FrameReceiver hands over; ``ended`` is set by on_end."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes]] = []
        self.end: list[BaseException | None] = []
        self.ended = threading.Event()

    def on_frame(self, header: bytes, body: bytes) -> None:
        self.frames.append((header, body))

    def on_end(self, exc: BaseException | None) -> None:
        self.end.append(exc)
        self.ended.set()


def be16_length(header: bytes) -> int:
    return int(struct.unpack_from(">H", header, 2)[0])


def frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


@pytest.mark.parametrize("kind", KINDS)
def test_frame_receiver_in_order_then_end(kind: str, sock_path: Path) -> None:
    """Frames (empty bodies too) arrive in order, split anyhow; a clean close is on_end(None)."""
    with connected(kind, sock_path) as (conn, peer):
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        sent = [frame(i % 7, os.urandom(i * 37 % 300)) for i in range(200)]
        wire = b"".join(sent)
        for k in range(0, len(wire), 333):
            peer.sendall(wire[k : k + 333])
        peer.close()
        assert got.ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert got.end == [None]
        assert [h + b for h, b in got.frames] == sent


def test_frame_receiver_idle_wait_has_no_limit(sock_path: Path) -> None:
    """The wait for a message's first byte outlasts the connection's time limit."""
    with connected("unix", sock_path, timeout=0.1) as (conn, peer):
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        assert not got.ended.wait(0.5)  # five time limits without a byte: still waiting
        peer.sendall(frame(1, b"abcd"))
        peer.close()
        assert got.ended.wait(LIMIT)
        assert got.end == [None]
        assert got.frames == [(b"\x00\x01\x00\x04", b"abcd")]
        assert rx.join(LIMIT)


def test_frame_receiver_body_length_raises(sock_path: Path) -> None:
    """A body_length that raises ends the receiver with on_end(that exception), after the
    frames before it."""

    class Refused(Exception):
        pass

    def body_length(header: bytes) -> int:
        if header[:2] == b"\xff\xff":
            raise Refused(header.hex())
        return be16_length(header)

    with connected("unix", sock_path) as (conn, peer):
        got = Frames()
        rx = FrameReceiver(conn, 4, body_length, got.on_frame, got.on_end)
        rx.start()
        peer.sendall(frame(1, b"one") + b"\xff\xff\x00\x00" + frame(2, b"never"))
        assert got.ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert len(got.end) == 1 and isinstance(got.end[0], Refused)
        assert got.frames == [(b"\x00\x01\x00\x03", b"one")]


def test_frame_receiver_on_frame_raises(sock_path: Path) -> None:
    """An on_frame that raises ends the receiver with on_end(that exception)."""
    with connected("unix", sock_path) as (conn, peer):
        end: list[BaseException | None] = []
        ended = threading.Event()

        def on_frame(header: bytes, body: bytes) -> None:
            raise KeyError(body)

        def on_end(exc: BaseException | None) -> None:
            end.append(exc)
            ended.set()

        rx = FrameReceiver(conn, 4, be16_length, on_frame, on_end)
        rx.start()
        peer.sendall(frame(1, b"x") + frame(1, b"y"))
        assert ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert len(end) == 1 and isinstance(end[0], KeyError) and end[0].args == (b"x",)


@pytest.mark.parametrize("cut", [2, 4, 6], ids=["in the header", "before the body", "in the body"])
def test_frame_receiver_message_cut_short(cut: int, sock_path: Path) -> None:
    """A peer that closes inside a message: on_end(ConnectionLost)."""
    with connected("unix", sock_path) as (conn, peer):
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        peer.sendall(frame(3, b"full") + frame(3, b"cut!")[:cut])
        peer.close()
        assert got.ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert len(got.end) == 1 and isinstance(got.end[0], ConnectionLost)
        assert got.frames == [(b"\x00\x03\x00\x04", b"full")]


def test_frame_receiver_ends_when_the_owner_closes(sock_path: Path) -> None:
    """The owner closing the connection ends the receiver cleanly (on_end(None))."""
    with connected("unix", sock_path) as (conn, _peer):
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        conn.close()
        assert got.ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert got.end == [None]


# -- ReadAhead ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [2, 4, 8])
def test_read_ahead_order_when_later_tasks_finish_first(channels: int) -> None:
    """Results come in task order although each task ends only after the next one did."""
    n = channels
    finished = [threading.Event() for _ in range(n)]
    order: list[int] = []
    lock = threading.Lock()

    def produce(i: int) -> str:
        if i + 1 < n:
            assert finished[i + 1].wait(LIMIT), f"task {i + 1} never finished"
        with lock:
            order.append(i)
        finished[i].set()
        return f"r{i}"

    with ReadAhead(list(range(n)), produce, channels=channels, window=n) as reads:
        assert len(reads) == n
        out = []
        while not reads.done:
            out.append(reads.next(timeout=LIMIT))
    assert out == [f"r{i}" for i in range(n)]
    assert order == list(range(n))[::-1]


def test_read_ahead_order_with_sleeps() -> None:
    """Many tasks, each sleeping less the later it is: still handed out in order."""
    n = 40

    def produce(i: int) -> int:
        time.sleep((n - i) * 0.0005)
        return i * i

    with ReadAhead(list(range(n)), produce, channels=4, window=6) as reads:
        out = []
        while not reads.done:
            out.append(reads.next())
        with pytest.raises(IndexError):
            reads.next()
    assert out == [i * i for i in range(n)]


@pytest.mark.parametrize(("channels", "window"), [(1, 1), (4, 2), (4, 4), (8, 3), (2, 9)])
def test_read_ahead_window(channels: int, window: int) -> None:
    """Never more than ``window`` tasks are taken beyond what the consumer has asked for."""
    n = 50
    lock = threading.Lock()
    taking = 0  # results the consumer has asked for (counted before each next())
    started = 0
    worst = 0

    def produce(i: int) -> int:
        nonlocal started, worst
        with lock:
            started += 1
            worst = max(worst, started - taking)
        time.sleep(0.0005 * (i % 3))
        return i

    with ReadAhead(list(range(n)), produce, channels=channels, window=window) as reads:
        out = []
        while not reads.done:
            with lock:
                taking += 1
            out.append(reads.next(timeout=LIMIT))
    assert out == list(range(n))
    assert worst <= window


def test_read_ahead_stalled_consumer() -> None:
    """A consumer that asks for nothing: the workers stop once ``window`` results wait."""
    window = 3
    lock = threading.Lock()
    started = 0
    reached = threading.Event()

    def produce(i: int) -> int:
        nonlocal started
        with lock:
            started += 1
            if started >= window:
                reached.set()
        return i

    with ReadAhead(list(range(30)), produce, channels=6, window=window) as reads:
        assert reached.wait(LIMIT)
        time.sleep(0.2)  # room for a worker that would overrun the window (no effect on a correct one)
        with lock:
            assert started == window
        assert reads.next(timeout=LIMIT) == 0


def test_read_ahead_reraises() -> None:
    """A produce error comes out of next() in its task's place."""

    def produce(i: int) -> int:
        if i == 2:
            raise OSError(5, "disk says no")
        return i

    with ReadAhead(list(range(6)), produce, channels=3, window=6) as reads:
        assert reads.next(timeout=LIMIT) == 0
        assert reads.next(timeout=LIMIT) == 1
        with pytest.raises(OSError, match="disk says no"):
            reads.next(timeout=LIMIT)
        assert reads.next(timeout=LIMIT) == 3


def test_read_ahead_next_timeout_zero() -> None:
    """next(timeout=0) is None while nothing is ready, then the result once it is."""
    go = threading.Event()

    def produce(i: int) -> int:
        assert go.wait(LIMIT)
        return i + 100

    with ReadAhead([0, 1], produce, channels=2, window=2) as reads:
        assert reads.next(timeout=0) is None
        assert reads.next(timeout=0.01) is None
        assert not reads.done
        go.set()
        assert reads.next() == 100
        assert reads.next(timeout=LIMIT) == 101
        assert reads.done


def test_read_ahead_no_tasks() -> None:
    """Nothing to do: done at once, and close returns."""
    reads: ReadAhead[int, int]
    with ReadAhead([], lambda i: i, channels=3, window=2) as reads:
        assert reads.done
        with pytest.raises(IndexError):
            reads.next()


def test_read_ahead_close_with_pending_tasks() -> None:
    """close() returns with tasks not started (they are dropped) and one still running."""
    release = threading.Event()
    running = threading.Event()
    lock = threading.Lock()
    produced: list[int] = []

    def produce(i: int) -> int:
        with lock:
            produced.append(i)
        if i == 2:
            running.set()
            assert release.wait(LIMIT)
        return i

    reads = ReadAhead(list(range(1000)), produce, channels=2, window=3)
    assert reads.next(timeout=LIMIT) == 0
    assert running.wait(LIMIT)
    closed = threading.Event()

    def close() -> None:
        reads.close()
        closed.set()

    t = in_thread(close)
    release.set()
    assert closed.wait(LIMIT)
    t.join(LIMIT)
    with lock:
        assert len(produced) < 1000
    reads.close()  # again: returns


def test_read_ahead_close_from_exit_on_error() -> None:
    """Leaving the context on an exception stops the workers."""
    with pytest.raises(RuntimeError, match="consumer"), ReadAhead(list(range(100)), lambda i: i, channels=4, window=2) as reads:
        reads.next(timeout=LIMIT)
        raise RuntimeError("consumer failed")


# -- TLS -------------------------------------------------------------------------------------------

from tests.helpers.tls import Pki, make_pki  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Pki, *, verify_client: bool = True) -> ssl.SSLContext:
    """A TLS server as QEMU's destination is one (verify-peer=on: a client certificate signed by the CA)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server / "server-cert.pem", pki.server / "server-key.pem")
    if verify_client:
        ctx.load_verify_locations(pki.server / "ca-cert.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class Peer:
    address: str
    errors: list[BaseException]


@contextlib.contextmanager
def tls_peer(
    pki: Pki, handler: Callable[[ssl.SSLSocket], object], *, kind: str = "tcp", path: Path | None = None,
    verify_client: bool = True,
) -> Iterator[Peer]:
    """A TLS server on a thread: it accepts one connection, does the handshake and runs
    ``handler`` on it (on that one thread: its SSLSocket is never shared). What it raised is
    in ``errors``; the thread is joined on exit (close the client first)."""
    ctx = server_context(pki, verify_client=verify_client)
    listener = unix_listener(path) if kind == "unix" else tcp_listener()
    assert kind == "tcp" or path is not None
    address = f"unix:{path}" if kind == "unix" else f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    peer = Peer(address, [])

    def run() -> None:
        try:
            raw, _ = listener.accept()
            raw.settimeout(LIMIT)
            with ctx.wrap_socket(raw, server_side=True) as tls:
                handler(tls)
        except BaseException as exc:
            peer.errors.append(exc)

    t = in_thread(run)
    try:
        yield peer
    finally:
        t.join(LIMIT)
        listener.close()
    assert not t.is_alive(), "the TLS peer did not end"


def tls_connect(peer: Peer, creds: Path, *, timeout: float = LIMIT, hostname: str | None = None) -> Connection:
    if hostname is None and peer.address.startswith("unix:"):
        hostname = "localhost"
    return Connection.connect(peer.address, timeout=timeout, tls=tls_client_context(creds), server_hostname=hostname)


def wait_closed(sock: ssl.SSLSocket) -> None:
    """The server's handler waits here until the client closes (or LIMIT)."""
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_tls_round_trip(pki: Pki, kind: str, sock_path: Path) -> None:
    """Over TLS (unix and TCP): send is whole and counts plaintext, recv_exact gets exactly n
    bytes however the peer's records split them; the peer closing is b"" (no close_notify)."""
    data = os.urandom(3 << 20)

    def handler(tls: ssl.SSLSocket) -> None:
        got = recv_all(tls, len(data) + 3)
        tls.sendall(hashlib.sha256(got).digest())
        for b in b"0123456789":  # one record a byte
            tls.sendall(bytes([b]))

    with tls_peer(pki, handler, kind=kind, path=sock_path) as peer:
        conn = tls_connect(peer, pki.client)
        try:
            assert conn.tls_version == "TLSv1.3"
            conn.send(data[:1000])
            conn.send(memoryview(data)[1000:])
            conn.send(bytearray(b"abc"))
            assert conn.bytes_sent == len(data) + 3
            assert conn.recv_exact(32) == hashlib.sha256(data + b"abc").digest()
            assert conn.recv_exact(4) == b"0123"
            assert conn.recv_exact(6) == b"456789"
            assert conn.recv_exact(4) == b""
            assert conn.recv_exact(4, idle_ok=True) == b""
        finally:
            conn.close()
    assert not peer.errors, peer.errors


def test_tls_by_host_name(pki: Pki) -> None:
    """tcp:localhost:PORT is checked against the certificate's DNS:localhost; a given
    server_hostname is what is checked."""

    def handler(tls: ssl.SSLSocket) -> None:
        tls.sendall(recv_all(tls, 2))

    with tls_peer(pki, handler) as peer:
        conn = tls_connect(peer, pki.client, hostname="localhost")
        try:
            conn.send(b"ok")
            assert conn.recv_exact(2) == b"ok"
        finally:
            conn.close()
    assert not peer.errors, peer.errors


def test_tls_concurrent_send_and_receive(pki: Pki) -> None:
    """64 MiB sent on this thread while a FrameReceiver reads the peer's messages, which it
    sends between its reads: every byte arrives (the peer's hash of what it got is ours),
    every message arrives whole and in order."""
    size, piece = 64 << 20, 1 << 20
    data = os.urandom(size)

    def body(i: int) -> bytes:
        return struct.pack(">I", i) + hashlib.sha256(struct.pack(">I", i)).digest() * 2

    def handler(tls: ssl.SSLSocket) -> None:
        h = hashlib.sha256()
        got = i = 0
        while got < size:
            tls.sendall(frame(1, body(i)))
            i += 1
            chunk = tls.recv(min(256 << 10, size - got))
            if not chunk:
                raise AssertionError(f"the client closed after {got} bytes")
            h.update(chunk)
            got += len(chunk)
        tls.sendall(frame(2, h.digest() + struct.pack(">I", i)))
        wait_closed(tls)

    with tls_peer(pki, handler) as peer:
        conn = tls_connect(peer, pki.client)
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        try:
            for k in range(0, size, piece):
                conn.send(memoryview(data)[k : k + piece])
            assert conn.bytes_sent == size
            deadline = time.monotonic() + LIMIT
            while not (got.frames and got.frames[-1][0][:2] == b"\x00\x02"):
                assert time.monotonic() < deadline and not got.ended.is_set(), got.end
                time.sleep(0.01)
        finally:
            conn.close()
        assert got.ended.wait(LIMIT) and rx.join(LIMIT)
    assert not peer.errors, peer.errors
    assert got.end == [None]
    *messages, (_, last) = got.frames
    digest, count = last[:32], struct.unpack(">I", last[32:])[0]
    assert digest == hashlib.sha256(data).digest()
    assert count == len(messages) > 1
    assert [(h[:2], b) for h, b in messages] == [(b"\x00\x01", body(i)) for i in range(count)]


def test_tls_hostname_mismatch_is_refused(pki: Pki) -> None:
    """A certificate that is not for the name checked: TlsError at connect, with OpenSSL's reason."""
    with tls_peer(pki, wait_closed) as peer:
        with pytest.raises(TlsError, match="certificate verify failed") as info:
            tls_connect(peer, pki.client, hostname="not-this-host.example")
    assert "not-this-host.example" in str(info.value) and peer.address in str(info.value)
    assert not info.value.timed_out


def test_tls_unknown_ca_is_refused(pki: Pki) -> None:
    """A server certificate not signed by the CA of the creds directory: TlsError at connect."""
    with tls_peer(pki, wait_closed) as peer:
        with pytest.raises(TlsError, match="certificate verify failed"):
            tls_connect(peer, pki.unknown_ca)


@pytest.mark.parametrize(("creds", "said"), [("client_rogue", "unknown ca"), ("client_no_cert", "certificate required")])
def test_tls_client_certificate_refused_by_the_peer(pki: Pki, creds: str, said: str) -> None:
    """A server that verifies its peer refuses a client certificate of another CA, or none;
    under TLS 1.3 the client learns it at its first read after the handshake: TlsError."""
    with tls_peer(pki, wait_closed) as peer:
        with pytest.raises(TlsError, match=said):
            conn = tls_connect(peer, getattr(pki, creds))
            try:
                conn.recv_exact(1)
            finally:
                conn.close()
    assert peer.errors and isinstance(peer.errors[0], ssl.SSLError)


def test_tls_peer_gone_before_sending_anything(pki: Pki) -> None:
    """A TLS peer that completes the handshake and goes without a byte of data nor a
    close_notify (QEMU refusing a client certificate after a TLS 1.3 handshake): TlsError
    saying so, not a clean end; one that sent data first ends cleanly (b"")."""
    with tls_peer(pki, lambda tls: None) as peer:
        conn = tls_connect(peer, pki.client)
        try:
            with pytest.raises(TlsError, match=r"before sending anything.*verify-peer"):
                conn.recv_exact(4, idle_ok=True)
        finally:
            conn.close()
    with tls_peer(pki, lambda tls: tls.sendall(b"ab")) as peer:
        conn = tls_connect(peer, pki.client)
        try:
            assert conn.recv_exact(2) == b"ab"
            assert conn.recv_exact(4, idle_ok=True) == b""
        finally:
            conn.close()


def plain_peer(action: Callable[[socket.socket], object]) -> tuple[socket.socket, threading.Thread]:
    listener = tcp_listener()

    def run() -> None:
        peer, _ = listener.accept()
        peer.settimeout(LIMIT)
        with peer:
            action(peer)

    return listener, in_thread(run)


@pytest.mark.parametrize("how", ["answers", "closes", "says nothing"])
def test_tls_to_a_plaintext_peer(how: str) -> None:
    """A peer that does not speak TLS: one that answers the ClientHello with a migration
    stream's header, one that closes, one that waits for more: TlsError, not a hang."""
    hold = threading.Event()

    def action(peer: socket.socket) -> None:
        peer.recv(4096)
        if how == "answers":
            peer.sendall(b"QEVM\x00\x00\x00\x03" + bytes(64))
            hold.wait(LIMIT)
        elif how == "says nothing":
            hold.wait(LIMIT)

    listener, t = plain_peer(action)
    ctx = ssl.create_default_context()
    try:
        with pytest.raises(TlsError, match="TLS handshake") as info:
            Connection.connect(f"tcp:127.0.0.1:{listener.getsockname()[1]}", timeout=0.5, tls=ctx)
        assert info.value.timed_out is (how == "says nothing")
    finally:
        hold.set()
        t.join(LIMIT)
        listener.close()


def test_tls_unix_needs_a_host_name(sock_path: Path, pki: Pki) -> None:
    """TLS over a unix socket checks the certificate against a name given (QEMU's tls-hostname): none, no TLS."""
    listener = unix_listener(sock_path)
    try:
        with pytest.raises(TlsError, match="no host name"):
            Connection.connect(f"unix:{sock_path}", timeout=LIMIT, tls=tls_client_context(pki.client))
    finally:
        listener.close()


def _server_session(raw: socket.socket, ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """The server's side of a handshake driven by hand (to send part of a record later)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if not data:
                raise ConnectionError("the client closed in the handshake") from None
            incoming.write(data)
    raw.sendall(outgoing.read())
    return obj, incoming, outgoing


def test_tls_idle_wait_has_no_limit_but_a_record_begun_has(pki: Pki) -> None:
    """FrameReceiver over TLS: the wait for a message outlasts the time limit (the session
    tickets TLS 1.3 sends after the handshake are no message); a record the peer began but
    stopped in is a stall: ConnectionLost(timed_out=True)."""
    listener = tcp_listener()
    ctx = server_context(pki)
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            raw, _ = listener.accept()
            raw.settimeout(LIMIT)
            with raw:
                obj, _, outgoing = _server_session(raw, ctx)
                time.sleep(0.6)  # three time limits of the client
                obj.write(frame(1, b"abcd"))
                raw.sendall(outgoing.read())
                obj.write(frame(2, b"efgh"))
                cipher = outgoing.read()
                raw.sendall(cipher[:-4])  # the record, but its last bytes
                done.wait(LIMIT)
        except BaseException as exc:
            errors.append(exc)

    t = in_thread(run)
    try:
        conn = Connection.connect(f"tcp:127.0.0.1:{listener.getsockname()[1]}", timeout=0.2,
                                  tls=tls_client_context(pki.client))  # fmt: skip
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        try:
            assert got.ended.wait(LIMIT)
            assert got.frames == [(b"\x00\x01\x00\x04", b"abcd")]
            assert len(got.end) == 1 and isinstance(got.end[0], ConnectionLost) and got.end[0].timed_out
        finally:
            conn.close()
            rx.join(LIMIT)
    finally:
        done.set()
        t.join(LIMIT)
        listener.close()
    assert not errors, errors


def _key_update(obj: ssl.SSLObject) -> Callable[[], None] | None:
    """A function asking OpenSSL for a TLS 1.3 KeyUpdate with update_requested on ``obj``
    (SSL_key_update, by ctypes: Python has no call for it), or None where that cannot be
    done safely (the SSL pointer is read from CPython's object and checked first)."""
    import _ssl
    import ctypes

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        is_server, key_update = lib.SSL_is_server, lib.SSL_key_update
    except (OSError, AttributeError):
        return None
    is_server.argtypes, is_server.restype = [ctypes.c_void_p], ctypes.c_int
    key_update.argtypes, key_update.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def pointer(o: ssl.SSLObject) -> int | None:
        # CPython's PySSLSocket: PyObject_HEAD, the socket's weakref, then SSL *ssl
        return ctypes.c_void_p.from_address(id(o._sslobj) + 24).value  # type: ignore[attr-defined]

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    p, q = pointer(obj), pointer(probe)
    if not (p and q and is_server(p) == 1 and is_server(q) == 0):
        return None

    def update() -> None:
        assert key_update(p, 1) == 1  # SSL_KEY_UPDATE_REQUESTED

    return update


def test_tls_key_update_while_sending(pki: Pki) -> None:
    """The peer asks for TLS 1.3 key updates (update_requested) while 64 MiB are being sent:
    the answer OpenSSL makes on the receiver's thread goes to the socket in order with the
    sender's records (out of order, the peer could not decrypt what follows), and every
    byte and message arrives."""
    size, piece, updates_wanted = 64 << 20, 1 << 20, 16
    data = os.urandom(size)
    listener = tcp_listener()
    ctx = server_context(pki)
    result: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            raw, _ = listener.accept()
            raw.settimeout(LIMIT)
            with raw:
                obj, incoming, outgoing = _server_session(raw, ctx)
                update = _key_update(obj)
                if update is None:
                    result["skip"] = True
                    return
                h = hashlib.sha256()
                got = updates = 0
                while got < size:
                    if updates < updates_wanted and got >= updates * (size // updates_wanted):
                        update()
                        obj.do_handshake()  # the KeyUpdate now, alone: the client answers it as it reads it
                        raw.sendall(outgoing.read())
                        updates += 1
                    obj.write(frame(1, struct.pack(">I", updates)))
                    raw.sendall(outgoing.read())
                    chunk = raw.recv(256 << 10)
                    if not chunk:
                        raise AssertionError(f"the client closed after {got} bytes")
                    incoming.write(chunk)
                    while True:
                        try:
                            plain = obj.read(1 << 20)
                        except ssl.SSLWantReadError:
                            break
                        h.update(plain)
                        got += len(plain)
                    raw.sendall(outgoing.read())
                obj.write(frame(2, h.digest() + struct.pack(">I", updates)))
                raw.sendall(outgoing.read())
                done.wait(LIMIT)
        except BaseException as exc:
            result["error"] = exc

    t = in_thread(run)
    try:
        conn = Connection.connect(f"tcp:127.0.0.1:{listener.getsockname()[1]}", timeout=LIMIT,
                                  tls=tls_client_context(pki.client))  # fmt: skip
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        try:
            with contextlib.suppress(ConnectionLost):  # the peer gave up: result says why
                for k in range(0, size, piece):
                    conn.send(memoryview(data)[k : k + piece])
            deadline = time.monotonic() + LIMIT
            while not (got.frames and got.frames[-1][0][:2] == b"\x00\x02"):
                if "skip" in result or "error" in result or got.ended.is_set() or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        finally:
            conn.close()
            rx.join(LIMIT)
    finally:
        done.set()
        t.join(LIMIT)
        listener.close()
    if "skip" in result:
        pytest.skip("SSL_key_update cannot be called on this Python's ssl objects")
    assert "error" not in result, result["error"]
    assert got.frames and got.frames[-1][0][:2] == b"\x00\x02", (got.end, len(got.frames))
    last = got.frames[-1][1]
    assert last[:32] == hashlib.sha256(data).digest()
    assert struct.unpack(">I", last[32:])[0] == updates_wanted


def test_tls_close_unblocks_the_receiver(pki: Pki) -> None:
    """The owner closing a TLS connection ends its FrameReceiver cleanly (on_end(None))."""
    with tls_peer(pki, wait_closed) as peer:
        conn = tls_connect(peer, pki.client, timeout=0.2)
        got = Frames()
        rx = FrameReceiver(conn, 4, be16_length, got.on_frame, got.on_end)
        rx.start()
        assert not got.ended.wait(0.5)
        conn.close()
        assert got.ended.wait(LIMIT)
        assert rx.join(LIMIT)
        assert got.end == [None]


def test_tls_send_to_a_peer_that_never_reads(pki: Pki) -> None:
    """64 MiB over TLS to a peer that reads nothing: ConnectionLost(timed_out=True)."""
    hold = threading.Event()
    with tls_peer(pki, lambda tls: hold.wait(LIMIT)) as peer:
        conn = tls_connect(peer, pki.client, timeout=0.5)
        try:
            with pytest.raises(ConnectionLost) as info:
                conn.send(bytes(64 << 20))
            assert info.value.timed_out
        finally:
            conn.close()
            hold.set()


def test_tls_peer_resets(pki: Pki) -> None:
    """A TLS peer that resets the connection: recv_exact and send raise ConnectionLost."""

    def handler(tls: ssl.SSLSocket) -> None:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with tls_peer(pki, handler) as peer:
        conn = tls_connect(peer, pki.client)
        try:
            with pytest.raises(ConnectionLost):
                if conn.recv_exact(4) == b"":  # the reset may come after the tickets and a clean end
                    deadline = time.monotonic() + LIMIT
                    while time.monotonic() < deadline:
                        conn.send(b"z" * 4096)
                        time.sleep(0.01)
        finally:
            conn.close()


# -- tls_client_context: QEMU's creds directory ------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tls_creds_directory_checks(pki: Pki, tmp_path: Path) -> None:
    """The directory and its CA certificate must exist; the client's pair goes together; a
    file OpenSSL cannot load is named. Each is a UsageError naming the file."""
    with pytest.raises(UsageError, match="does not exist"):
        tls_client_context(tmp_path / "none")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UsageError, match=r"ca-cert\.pem") as info:
        tls_client_context(bare)
    assert info.value.fields["path"] == os.fspath(bare / "ca-cert.pem")
    half = _copy(pki.client, tmp_path / "half")
    (half / "client-key.pem").unlink()
    with pytest.raises(UsageError, match=r"client-key\.pem: missing"):
        tls_client_context(half)
    garbage = _copy(pki.client_no_cert, tmp_path / "garbage")
    (garbage / "ca-cert.pem").write_text("not a certificate\n")
    with pytest.raises(UsageError, match=r"ca-cert\.pem: OpenSSL cannot load") as info:
        tls_client_context(garbage)
    assert "not a certificate" not in str(info.value)
    mismatched = _copy(pki.client, tmp_path / "mismatched")
    shutil.copyfile(pki.server / "server-key.pem", mismatched / "client-key.pem")
    with pytest.raises(UsageError, match=r"client-key\.pem") as info:
        tls_client_context(mismatched)
    assert "PRIVATE KEY" not in str(info.value)
    assert tls_client_context(pki.client_no_cert).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_tls_key_open_to_others_is_refused(pki: Pki, tmp_path: Path, mode: int) -> None:
    """A client key its group or others may read (or write): refused, naming the file and
    its mode, never its contents."""
    creds = _copy(pki.client, tmp_path / "creds")
    key = creds / "client-key.pem"
    key.chmod(mode)
    with pytest.raises(UsageError, match=rf"client-key\.pem: .*mode {mode:04o}") as info:
        tls_client_context(creds)
    secret = key.read_text()
    assert secret.strip() not in str(info.value) and "PRIVATE KEY" not in str(info.value)
    assert info.value.fields["path"] == os.fspath(key)
    key.chmod(0o400)
    tls_client_context(creds)

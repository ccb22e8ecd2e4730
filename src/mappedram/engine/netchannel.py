"""Stream sockets to a migration destination, and a thread that reads what it sends back.

A :class:`Connection` is one stream socket (``unix:PATH`` or ``tcp:HOST:PORT``, QEMU's
own address syntax) with a time limit on every wait: a send that makes no progress, or a
read that gets nothing, for ``timeout`` seconds raises :class:`ConnectionLost`, as does a
peer that closes or resets the connection. :class:`FrameReceiver` reads length-framed
messages on a thread of its own and hands each to a callback; it knows no message types
(the framing is given to it as two numbers and a function).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable

__all__ = ["Connection", "ConnectionLost", "FrameReceiver", "parse_address", "is_loopback"]


#: The most one socket send is offered (its time limit applies to each).
_SEND_CHUNK = 4 << 20


class ConnectionLost(Exception):
    """The peer closed or reset the connection, or made no progress within the time limit."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` -> ("unix", PATH); ``tcp:HOST:PORT`` -> ("tcp", (HOST, PORT)); ValueError otherwise."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        host = host.strip("[]")
        if sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host, int(port))
    raise ValueError(f"address {address!r}: expected unix:PATH or tcp:HOST:PORT")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return False
    import ipaddress

    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class Connection:
    """A connected stream socket with a time limit on every wait."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, address: str, timeout: float) -> None:
        self.sock = sock
        self.address = address
        self.timeout = timeout
        self.bytes_sent = 0
        self._send_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(
        cls, address: str, *, timeout: float, retry_for: float = 0.0, tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Connection:
        """Connect to ``address``; keep trying for ``retry_for`` seconds while nothing listens there yet."""
        kind, where = parse_address(address)
        deadline = time.monotonic() + retry_for
        while True:
            family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
            try:
                if kind == "unix":
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(timeout)
                    sock.connect(where)
                else:
                    assert isinstance(where, tuple)
                    sock = socket.create_connection(where, timeout=timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                with contextlib.suppress(NameError):
                    sock.close()
                if time.monotonic() >= deadline:
                    raise ConnectionLost(f"nothing listens at {address} ({exc.strerror})") from None
                time.sleep(0.01)
            except TimeoutError:
                raise ConnectionLost(f"connecting to {address} timed out after {timeout} s", timed_out=True) from None
            except OSError as exc:
                raise ConnectionLost(f"cannot connect to {address}: {exc.strerror or exc}") from None
            except (UnicodeError, ValueError) as exc:
                raise ConnectionLost(f"cannot connect to {address}: {exc}") from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or (where[0] if kind == "tcp" else None))
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise ConnectionLost(f"TLS handshake with {address} failed: {exc}") from None
        return cls(sock, address, timeout)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (several threads may call this; each call is sent whole).

        The time limit is on a stall: each ``send`` that moves nothing for ``timeout``
        seconds is one (a peer that keeps reading, however slowly, is waited for)."""
        view = memoryview(data).cast("B")
        with self._send_lock:
            done = 0
            while done < len(view):
                try:
                    done += self.sock.send(view[done : done + _SEND_CHUNK])
                except TimeoutError:
                    raise ConnectionLost(
                        f"{self.address} took nothing for {self.timeout} s", timed_out=True
                    ) from None
                except OSError as exc:
                    raise ConnectionLost(_lost(self.address, exc)) from None
            self.bytes_sent += len(view)

    def recv_exact(self, n: int, *, idle_ok: bool = False) -> bytes:
        """Exactly ``n`` bytes; b"" when the peer closed cleanly before the first of them.

        ``idle_ok``: wait as long as it takes for the first byte (the time limit then
        applies only once a message has begun)."""
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except TimeoutError:
                if idle_ok and not out and not self._closed:
                    continue
                raise ConnectionLost(f"{self.address} sent nothing for {self.timeout} s", timed_out=True) from None
            except OSError as exc:
                if self._closed:
                    return b""
                raise ConnectionLost(_lost(self.address, exc)) from None
            if not chunk:
                if not out:
                    return b""
                raise ConnectionLost(f"{self.address} closed the connection in the middle of a message")
            out += chunk
        return bytes(out)

    def shutdown_write(self) -> None:
        """Tell the peer nothing more is coming (its reads see end of stream)."""
        with contextlib.suppress(OSError):
            if isinstance(self.sock, ssl.SSLSocket):
                return  # unwrap would wait for the peer's close_notify
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()


def _lost(address: str, exc: OSError) -> str:
    if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
        return f"{address} closed the connection ({os.strerror(exc.errno)})"
    return f"{address}: {exc.strerror or exc}"


class FrameReceiver:
    """Reads messages of ``header_size`` bytes plus a body of ``body_length(header)`` bytes
    on a thread, calling ``on_frame(header, body)`` for each, until the peer closes
    (``on_end(None)``) or something fails (``on_end(exc)``). The wait for a message has
    no time limit (the peer may be silent while it runs); a message cut short is an error.
    """

    def __init__(
        self,
        conn: Connection,
        header_size: int,
        body_length: Callable[[bytes], int],
        on_frame: Callable[[bytes, bytes], None],
        on_end: Callable[[BaseException | None], None],
    ) -> None:
        self.conn = conn
        self.header_size = header_size
        self.body_length = body_length
        self.on_frame = on_frame
        self.on_end = on_end
        self._thread = threading.Thread(target=self._run, name="return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                header = self.conn.recv_exact(self.header_size, idle_ok=True)
                if not header:
                    break
                n = self.body_length(header)
                body = self.conn.recv_exact(n) if n else b""
                if n and len(body) != n:
                    raise ConnectionLost(f"{self.conn.address} closed the connection in the middle of a message")
                self.on_frame(header, body)
        except BaseException as exc:  # handed to the owner
            self.on_end(exc)
            return
        self.on_end(None)

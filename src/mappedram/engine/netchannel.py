"""Stream sockets to a migration destination, and a thread that reads what it sends back.

A :class:`Connection` is one stream socket (``unix:PATH`` or ``tcp:HOST:PORT``, QEMU's
own address syntax) with a time limit on every wait: a send that makes no progress, or a
read that gets nothing, for ``timeout`` seconds raises :class:`ConnectionLost`, as does a
peer that closes or resets the connection. :class:`FrameReceiver` reads length-framed
messages on a thread of its own and hands each to a callback; it knows no message types
(the framing is given to it as two numbers and a function).

With TLS (:func:`tls_client_context`: QEMU's ``tls-creds-x509`` client directory) the
connection is one OpenSSL session driven through memory buffers (``ssl.MemoryBIO``): the
sender encrypts on its thread and the receiver decrypts on its own, each holding the
session's lock only while OpenSSL runs (OpenSSL's objects must not be used by two threads
at once); the socket's I/O is done here, outside that lock, and every piece of ciphertext
goes to the socket in the order OpenSSL made it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mappedram.errors import UsageError

__all__ = [
    "Connection",
    "ConnectionLost",
    "TlsError",
    "FrameReceiver",
    "parse_address",
    "is_loopback",
    "tls_client_context",
    "TLS_CA_CERT",
    "TLS_CLIENT_CERT",
    "TLS_CLIENT_KEY",
]


#: The most one socket send is offered (its time limit applies to each).
_SEND_CHUNK = 4 << 20
#: Plaintext encrypted per step of a TLS send (the receiver's flush may go between steps).
_TLS_CHUNK = 1 << 20
#: The most ciphertext one socket read of a TLS connection takes.
_TLS_RECV = 256 << 10

#: Said of a TLS peer that went before sending any data: under TLS 1.3 the client's handshake
#: is done before the server has checked the client's certificate, and QEMU then just drops it.
_REFUSED_HINT = (
    "a destination with verify-peer=on does that when it refuses the client's certificate (its log says why)"
)

#: The files of a QEMU ``tls-creds-x509`` directory a client endpoint reads (QEMU's names:
#: crypto/tlscredsx509.h); the CA certificate is required, the client's pair optional.
TLS_CA_CERT = "ca-cert.pem"
TLS_CLIENT_CERT = "client-cert.pem"
TLS_CLIENT_KEY = "client-key.pem"


class ConnectionLost(Exception):
    """The peer closed or reset the connection, or made no progress within the time limit."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class TlsError(ConnectionLost):
    """The TLS session failed: its handshake (a certificate refused, a host name it is not
    for, a peer that does not speak TLS) or a record later (an alert, a bad record)."""


def tls_client_context(creds_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS client context from a directory laid out as QEMU's ``tls-creds-x509`` with
    ``endpoint=client``: ``ca-cert.pem`` (the CA the destination's certificate must be
    signed by; required) and, when present, ``client-cert.pem`` with ``client-key.pem``
    (what a destination with ``verify-peer=on`` asks for). The peer's certificate and its
    host name are always checked; TLS 1.2 at least.

    Raises UsageError naming the file: the directory or the CA certificate missing, one of
    the client's pair without the other, a key that its group or others may read, a file
    OpenSSL cannot load (the error never carries a file's contents)."""
    where = Path(creds_dir)
    if not where.is_dir():
        raise UsageError(f"{where}: the TLS credentials directory does not exist (or is not a directory)",
                         path=os.fspath(where))  # fmt: skip
    ca = where / TLS_CA_CERT
    if not ca.is_file():
        raise UsageError(f"{ca}: missing: a TLS credentials directory holds the CA certificate as {TLS_CA_CERT}",
                         path=os.fspath(ca))  # fmt: skip
    cert, key = where / TLS_CLIENT_CERT, where / TLS_CLIENT_KEY
    if cert.exists() != key.exists():
        have, lack = (cert, key) if cert.exists() else (key, cert)
        raise UsageError(f"{lack}: missing: {have.name} is there, and the client's certificate and key go together",
                         path=os.fspath(lack))  # fmt: skip
    if key.exists():
        try:
            mode = stat.S_IMODE(key.stat().st_mode)
        except OSError as exc:
            raise UsageError(f"{key}: {exc.strerror or exc}", path=os.fspath(key)) from None
        if mode & 0o077:
            raise UsageError(
                f"{key}: the private key is open to its group or others (mode {mode:04o}): make it 0600 "
                f"(chmod 600 {key})",
                path=os.fspath(key),
            )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    loading = ca
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
        if key.exists():
            loading = key
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key), password=_no_passphrase)
    except ssl.SSLError as exc:
        what = f"{cert} and {key}" if loading == key else str(ca)
        raise UsageError(f"{what}: OpenSSL cannot load it: {_ssl_reason(exc)}", path=os.fspath(loading)) from None
    except OSError as exc:
        raise UsageError(f"{exc.filename or loading}: {exc.strerror or exc}", path=os.fspath(loading)) from None
    return ctx


def _no_passphrase() -> bytes:
    return b""  # an encrypted key fails to load (serve asks no one for a passphrase)


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for ``exc``, without CPython's source location."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "the peer closed the connection in the TLS handshake (as one that does not speak TLS does)"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if text.startswith("[") and "] " in text:
        text = text.partition("] ")[2]
    head, sep, tail = text.rpartition(" (_ssl.c:")
    if sep and tail.endswith(")"):
        text = head
    return text or str(exc.reason or exc)


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
    """A connected stream socket with a time limit on every wait; TLS over it when
    connected with a context (``sock`` is then the raw socket, carrying ciphertext)."""

    def __init__(self, sock: socket.socket, address: str, timeout: float, *, tls: _TlsSession | None = None) -> None:
        self.sock = sock
        self.address = address
        self.timeout = timeout
        self.bytes_sent = 0  # plaintext
        self._send_lock = threading.Lock()  # one send() call at a time: each call's bytes arrive together
        self._closed = False
        self._tls = tls

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use (``"TLSv1.3"``), or None without TLS."""
        return self._tls.obj.version() if self._tls is not None else None

    @classmethod
    def connect(
        cls, address: str, *, timeout: float, retry_for: float = 0.0, tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Connection:
        """Connect to ``address``; keep trying for ``retry_for`` seconds while nothing listens yet.

        With ``tls``, then do the TLS handshake, checking the peer's certificate against
        ``server_hostname`` (default: the host of a ``tcp:`` address; a ``unix:`` address
        has none, as QEMU's ``tls-hostname`` must be given for one). A handshake that fails
        is TlsError (a ConnectionLost) with OpenSSL's reason."""
        kind, where = parse_address(address)
        hostname = server_hostname or (where[0] if isinstance(where, tuple) else None)
        if tls is not None and not hostname:
            raise TlsError(f"TLS to {address}: no host name to check the destination's certificate against")
        deadline = time.monotonic() + retry_for
        while True:
            family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
            unix: socket.socket | None = None
            try:
                if kind == "unix":
                    unix = socket.socket(family, socket.SOCK_STREAM)
                    unix.settimeout(timeout)
                    unix.connect(where)
                    sock = unix
                else:
                    assert isinstance(where, tuple)
                    sock = socket.create_connection(where, timeout=timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                break
            except BaseException as exc:
                if unix is not None:
                    unix.close()
                if not isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
                    _raise_connect(address, timeout, exc)
                    raise
                if time.monotonic() >= deadline:
                    raise ConnectionLost(f"nothing listens at {address} ({exc.strerror})") from None
                time.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        conn = cls(sock, address, timeout)
        if tls is not None:
            assert hostname
            try:
                conn._tls = _TlsSession(tls, hostname)
            except (ssl.SSLError, ValueError, UnicodeError) as exc:
                conn.close()
                raise TlsError(f"TLS to {address}: host name {hostname!r}: {exc}") from None
            try:
                conn._handshake()
            except BaseException:
                conn.close()
                raise
        return conn

    # -- the socket, raw ------------------------------------------------------------------

    def _send_raw(self, view: memoryview) -> None:
        """All of ``view`` to the socket; the time limit is on each send that moves nothing."""
        done = 0
        while done < len(view):
            try:
                done += self.sock.send(view[done : done + _SEND_CHUNK])
            except TimeoutError:
                raise ConnectionLost(f"{self.address} took nothing for {self.timeout} s", timed_out=True) from None
            except OSError as exc:
                raise ConnectionLost(_lost(self.address, exc)) from None

    # -- TLS ------------------------------------------------------------------------------

    def _handshake(self) -> None:
        tls = self._tls
        assert tls is not None
        while True:
            done, failed = False, None
            with tls.lock:
                try:
                    tls.obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    failed = exc
                cipher = tls.outgoing.read()
            if cipher:
                try:
                    with tls.wire_lock:
                        self._send_raw(memoryview(cipher))
                except ConnectionLost as exc:
                    if failed is None:  # else the reason is what OpenSSL said (its alert went or not)
                        raise TlsError(f"TLS handshake with {self.address} failed: {exc}",
                                       timed_out=exc.timed_out) from None  # fmt: skip
            if failed is not None:
                raise TlsError(f"TLS handshake with {self.address} failed: {_ssl_reason(failed)}") from None
            if done:
                return
            try:
                data = self.sock.recv(_TLS_RECV)
            except TimeoutError:
                raise TlsError(f"TLS handshake with {self.address}: the peer sent nothing for {self.timeout} s",
                               timed_out=True) from None  # fmt: skip
            except OSError as exc:
                raise TlsError(f"TLS handshake with {self.address} failed: {_lost(self.address, exc)}") from None
            with tls.lock:
                tls.feed(data)

    def _flush(self) -> None:
        """Ciphertext OpenSSL made while reading (TLS 1.3 post-handshake messages) to the
        socket, in order with the sender's (both take it from the session under the wire lock)."""
        tls = self._tls
        assert tls is not None
        with tls.wire_lock:
            with tls.lock:
                cipher = tls.outgoing.read()
            if cipher:
                self._send_raw(memoryview(cipher))

    def _send_tls(self, view: memoryview) -> None:
        tls = self._tls
        assert tls is not None
        done = 0
        while done < len(view):
            piece = view[done : done + _TLS_CHUNK]
            with tls.wire_lock:
                with tls.lock:
                    try:
                        n = tls.obj.write(piece)
                    except ssl.SSLError as exc:
                        raise TlsError(f"TLS with {self.address} failed: {_ssl_reason(exc)}") from None
                    cipher = tls.outgoing.read()
                try:
                    self._send_raw(memoryview(cipher))
                except ConnectionLost as exc:
                    if exc.timed_out or tls.received or self._closed:
                        raise
                    raise TlsError(f"{exc}: the TLS session ended before the peer sent anything; "
                                   f"{_REFUSED_HINT}") from None  # fmt: skip
            done += n

    def _recv_tls(self, n: int, idle_ok: bool) -> bytes:
        tls = self._tls
        assert tls is not None
        out = bytearray()
        while len(out) < n:
            eof = False
            with tls.lock:
                try:
                    chunk: bytes | None = tls.obj.read(n - len(out))
                    tls.received = tls.received or bool(chunk)
                except ssl.SSLWantReadError:
                    chunk = None
                except ssl.SSLZeroReturnError:  # close_notify
                    chunk, eof = b"", True
                except ssl.SSLEOFError:  # closed without close_notify
                    if not tls.received and not self._closed:
                        raise TlsError(f"{self.address} ended the TLS session before sending anything; "
                                       f"{_REFUSED_HINT}") from None  # fmt: skip
                    chunk, eof = b"", True
                except ssl.SSLError as exc:
                    if self._closed:
                        return b""
                    raise TlsError(f"TLS with {self.address} failed: {_ssl_reason(exc)}") from None
                pending = tls.outgoing.pending
            if eof or chunk == b"":  # (OpenSSL may have queued an alert for the peer that went: not sent)
                if not out or self._closed:
                    return b""
                raise ConnectionLost(f"{self.address} closed the connection in the middle of a message")
            if pending:
                # the sender learns of a peer gone from its own sends, this reader from its next read
                with contextlib.suppress(ConnectionLost):
                    self._flush()
            if chunk is not None:
                out += chunk
                continue
            if self._closed:
                return b""
            try:
                data = self.sock.recv(_TLS_RECV)
            except TimeoutError:
                # the first byte may take forever, but not the rest of a record once it began
                if idle_ok and not out and not self._closed and tls.at_record_boundary:
                    continue
                raise ConnectionLost(f"{self.address} sent nothing for {self.timeout} s", timed_out=True) from None
            except OSError as exc:
                if self._closed:
                    return b""
                if not tls.received:
                    raise TlsError(f"{_lost(self.address, exc)} before sending anything over TLS; "
                                   f"{_REFUSED_HINT}") from None  # fmt: skip
                raise ConnectionLost(_lost(self.address, exc)) from None
            with tls.lock:
                tls.feed(data)
        return bytes(out)

    # -- the interface --------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (several threads may call this; each call is sent whole).

        The time limit is on a stall: each ``send`` that moves nothing for ``timeout``
        seconds is one (a peer that keeps reading, however slowly, is waited for)."""
        view = memoryview(data).cast("B")
        with self._send_lock:
            if self._tls is not None:
                self._send_tls(view)
            else:
                self._send_raw(view)
            self.bytes_sent += len(view)

    def recv_exact(self, n: int, *, idle_ok: bool = False) -> bytes:
        """Exactly ``n`` bytes; b"" when the peer closed cleanly before the first of them.

        ``idle_ok``: wait as long as it takes for the first byte (the time limit then
        applies only once a message has begun)."""
        if self._tls is not None:
            return self._recv_tls(n, idle_ok)
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
        """Tell the peer nothing more is coming (its reads see end of stream). With TLS
        nothing is done: a TLS close_notify ends the session, and the peer still answers."""
        if self._tls is not None:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close the socket; a thread blocked reading it returns b"" (one sending: ConnectionLost)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()


class _TlsSession:
    """One OpenSSL session over memory buffers: ``lock`` is held while OpenSSL runs on it,
    ``wire_lock`` while ciphertext taken from ``outgoing`` goes to the socket (so it goes in
    order); ``lock`` is never held during socket I/O. It also follows the TLS records'
    framing of what came in, to tell a peer idle between records from one stalled in one."""

    def __init__(self, context: ssl.SSLContext, hostname: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.lock = threading.Lock()
        self.wire_lock = threading.Lock()
        self.received = False  # whether the peer has sent any data (plaintext) yet
        self._header = bytearray()
        self._body_left = 0

    @property
    def at_record_boundary(self) -> bool:
        return not self._header and self._body_left == 0

    def feed(self, data: bytes) -> None:
        """Ciphertext from the socket (b"": the peer closed it); caller holds ``lock``."""
        if not data:
            self.incoming.write_eof()
            return
        self.incoming.write(data)
        at, n = 0, len(data)
        while at < n:
            if self._body_left:
                step = min(self._body_left, n - at)
                self._body_left -= step
                at += step
                continue
            step = min(5 - len(self._header), n - at)
            self._header += data[at : at + step]
            at += step
            if len(self._header) == 5:
                self._body_left = int.from_bytes(self._header[3:5], "big")
                self._header.clear()


def _raise_connect(address: str, timeout: float, exc: BaseException) -> None:
    """Raise the ConnectionLost of a connect that failed otherwise than "nothing listens
    yet"; other exceptions (KeyboardInterrupt) are left to the caller to re-raise."""
    if isinstance(exc, TimeoutError):
        raise ConnectionLost(f"connecting to {address} timed out after {timeout} s", timed_out=True) from None
    if isinstance(exc, OSError):
        raise ConnectionLost(f"cannot connect to {address}: {exc.strerror or exc}") from None
    if isinstance(exc, (UnicodeError, ValueError)):
        raise ConnectionLost(f"cannot connect to {address}: {exc}") from None


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

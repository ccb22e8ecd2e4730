"""Serve a file to a live QEMU destination: mappedram as the migration source.

A QEMU started with ``-incoming defer`` (then ``migrate-incoming unix:PATH``, or
``tcp:HOST:PORT``) listens for a migration stream. :func:`serve` connects and sends one,
built from any file mappedram reads: the header and configuration, the RAM section with
its block list, every page that holds data (read from the file in large runs by parallel
readers; a destination's fresh RAM is zero, as QEMU's own mapped-ram load assumes), the
device state and EOF. It opens the return path first, so the destination says when it
is done (MIG_RP_MSG_SHUT) and a failure is told, not guessed.

With ``postcopy`` (the destination has the postcopy-ram capability on) the device state
goes first, in QEMU's MIG_CMD_PACKAGED blob: the destination starts the guest at once,
asks for each page the guest touches (MIG_RP_MSG_REQ_PAGES), and serve answers every
request before it goes on streaming the rest in the background. Each page is sent once.

References:
    QEMU migration/migration.c (migration_thread, postcopy_start,
    source_return_path_thread, migrate_handle_rp_req_pages), migration/savevm.c,
    migration/ram.c (ram_save_queue_pages, get_queued_page, ram_save_host_page),
    docs/devel/migration/postcopy.rst.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mappedram.engine.directio import aligned_buffer
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
from mappedram.errors import MigrationError, UnsupportedError, UsageError
from mappedram.format.constants import CAP_X_IGNORE_SHARED
from mappedram.format.encoder import (
    encode_page_headers_into,
    encode_page_records_into,
    page_headers_size,
    page_records_size,
)
from mappedram.format.postcopy import (
    MIG_RP_MSG_PONG,
    MIG_RP_MSG_REQ_PAGES,
    MIG_RP_MSG_REQ_PAGES_ID,
    MIG_RP_MSG_SHUT,
    RP_HEADER_SIZE,
    RpMessage,
    decode_rp_message,
    rp_body_length,
)
from mappedram.image import MigrationFile, open_file
from mappedram.layout import PING_OPENED, PING_RUN, StreamPlan, StreamSpec, plan_stream

from .options import DEFAULTS, EngineOptions
from .qemu import QemuDestination, Qmp
from .relay import streamed_spec
from .seal import SEAL_CHECK, SealOptions, checked

__all__ = ["ServeOptions", "ServeReport", "serve", "serve_qemu", "live_spec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """How :func:`serve` talks to the destination.

    Args:
        postcopy: start the guest first and send pages as it asks (the destination must
            have the postcopy-ram capability on).
        timeout: the longest serve waits for the destination at any one step (connect,
            a send that makes no progress, an answer), in seconds.
        connect_retry: keep trying to connect for this long while nothing listens yet.
        read_pages: pages per read of the background readers.
        send_pages: postcopy: pages per background send, between which requests are answered.
        background_after: postcopy: stream in the background only once the destination
            has asked for this many pages (0: at once); for tests and demonstrations.
        insecure: allow a TCP destination that is not on this host without TLS (the RAM
            crosses the network in the clear).
        postcopy_preempt: with ``postcopy``, answer page requests on a second connection
            (QEMU's postcopy-preempt channel; the destination must have the
            postcopy-preempt capability on, or it cannot tell the channels apart).
        seal: how a sealed file is checked before the first byte is sent (every digest, by
            default; ``NO_CHECK`` skips it); a mismatch raises IntegrityError.
        qmp: the destination's QMP socket, when known: serve then waits for QEMU to report
            the migration completed, and a failure carries QEMU's own error.
        tls_creds: TLS, as QEMU's TLS migration (the destination has a ``tls-creds-x509``
            object with ``endpoint=server`` and its ``tls-creds`` migration parameter set):
            a directory laid out as QEMU's for ``endpoint=client``, ``ca-cert.pem`` (the CA
            that signed the destination's certificate) and, for a destination with
            ``verify-peer=on``, ``client-cert.pem`` and ``client-key.pem`` (mode 0600).
            With TLS a ``tcp:`` destination on any host is allowed.
        tls_hostname: the name the destination's certificate must be for (QEMU's
            ``tls-hostname``); default the host of a ``tcp:`` address. Required for TLS
            over a ``unix:`` socket, as QEMU requires it.
    """

    postcopy: bool = False
    timeout: float = 60.0
    connect_retry: float = 10.0
    read_pages: int = 1024
    send_pages: int = 64
    background_after: int = 0
    insecure: bool = False
    qmp: str | None = None
    tls_creds: str | None = None
    tls_hostname: str | None = None
    postcopy_preempt: bool = False
    seal: SealOptions = SEAL_CHECK


@dataclass(slots=True)
class ServeReport:
    """What :func:`serve` sent and what the destination said.

    ``seconds_to_run`` (postcopy) is from the start of serve until the destination had
    read the whole device state (its answer to the ping just before POSTCOPY_RUN);
    ``request_latency_us`` is, per page request that serve answered with pages, the time
    from its arrival to those pages having been handed to the socket (median, p99, max);
    ``pages_sent`` counts PAGE and ZERO records, ``bytes_sent`` both connections' bytes.
    """

    path: str
    destination: str
    mode: str
    machine_type: str
    ram_bytes: int
    pages_sent: int
    pages_zero: int
    pages_requested: int
    requests: int  # page requests received (some for pages already on their way: see the notes)
    bytes_sent: int
    channels: int
    seconds: dict[str, float]
    seconds_to_run: float | None = None
    request_latency_us: dict[str, float] | None = None
    destination_status: int | None = None
    qemu: dict[str, Any] | None = None  # the destination's pid, QMP socket, log and run state, when known
    tls: str | None = None  # the TLS version of the connection, None for none
    preempt: bool = False  # page requests were answered on the postcopy-preempt channel
    seal: str | None = None  # the seal check before serving ("ok", "unsealed"), None when skipped
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.destination_status == 0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["total_seconds"] = self.total_seconds
        return d


def live_spec(mf: MigrationFile) -> StreamSpec:
    """What a live stream of ``mf`` carries besides pages (:func:`~.relay.streamed_spec`);
    an x-ignore-shared file, which lacks the pages of its shared blocks, is refused."""
    if CAP_X_IGNORE_SHARED in mf.capabilities:
        raise UnsupportedError(
            "x-ignore-shared files hold no pages of shared blocks: they cannot be served",
            field="capabilities",
            actual=list(mf.capabilities),
            path=mf.path,
        )
    return streamed_spec(mf)


def serve(
    path: str | os.PathLike[str],
    to: str,
    *,
    offset: int = 0,
    options: ServeOptions = ServeOptions(),
    engine: EngineOptions = DEFAULTS,
) -> ServeReport:
    """Send the file at ``path`` to the QEMU destination listening at ``to`` (``unix:PATH``
    or ``tcp:HOST:PORT``); return once the destination says it has loaded it.

    The file is checked whole before the first byte is sent, and never modified. Raises
    MigrationError when the destination refuses the stream, closes the connection, or does
    not answer within ``options.timeout``.
    """
    _check_destination(to, options)
    t0 = time.perf_counter()
    qmp = Qmp(options.qmp, timeout=options.timeout) if options.qmp else None
    try:
        if qmp is not None:
            qmp.connect()
        with open_file(path, offset) as mf:
            if mf.configuration.machine_type is None:
                raise UsageError(f"{mf.path}: the stream has no configuration section (no machine type to serve)")
            blocks = [(b.idstr, b.used_length) for b in mf.blocks]
            plan = plan_stream(blocks, live_spec(mf), postcopy=options.postcopy)
            check = checked(mf, options.seal, engine)  # a sealed file is checked whole before a byte is sent
            try:
                report = _Session(mf, to, plan, options, engine, t0).run()
                report.seal = None if check is None else check.status
            except MigrationError as exc:
                if qmp is not None and exc.qemu_error is None:
                    exc.qemu_error = _qmp_error(qmp)
                    exc.fields["qemu_error"] = exc.qemu_error
                raise
        if qmp is not None:
            info = _wait_completed(qmp, options.timeout, to)
            report.qemu = {"qmp": options.qmp, "status": qmp.cmd("query-status").get("status"),
                           "migration": info.get("status")}  # fmt: skip
        return report
    finally:
        if qmp is not None:
            qmp.close()


def serve_qemu(
    path: str | os.PathLike[str],
    qemu_args: list[str],
    *,
    offset: int = 0,
    options: ServeOptions = ServeOptions(),
    engine: EngineOptions = DEFAULTS,
) -> ServeReport:
    """Start QEMU (``qemu_args`` plus ``-incoming defer`` and a private QMP socket), set its
    capabilities, serve it the file, and wait until it reports the migration completed.
    QEMU keeps running afterwards (the report names its pid, QMP socket and log); a QEMU
    whose load failed is killed, and the error carries what it said."""
    dest = QemuDestination(qemu_args, timeout=options.timeout)
    try:
        dest.start()
        to = dest.listen(postcopy=options.postcopy, preempt=options.postcopy_preempt)
        try:
            report = serve(path, to, offset=offset, options=options, engine=engine)
            dest.wait_completed(options.timeout)
        except MigrationError as exc:
            exc.qemu_error = exc.qemu_error or dest.error_text()
            exc.fields["qemu_error"] = exc.qemu_error
            raise
        report.qemu = dest.describe()
        dest.detach()
        return report
    except BaseException:
        dest.kill()
        raise


def _qmp_error(qmp: Qmp) -> str | None:
    try:
        info = qmp.migration()
    except MigrationError:
        return None
    desc = info.get("error-desc")
    return str(desc) if desc else None


def _wait_completed(qmp: Qmp, timeout: float, to: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.migration()
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise MigrationError(f"the destination's migration {status}", destination=to, stage="finish",
                                 qemu_error=info.get("error-desc"))  # fmt: skip
        if time.monotonic() > deadline:
            raise MigrationError(f"the destination did not complete within {timeout} s (status {status!r})",
                                 destination=to, stage="finish")  # fmt: skip
        time.sleep(0.005)


def _check_destination(to: str, options: ServeOptions) -> None:
    if options.postcopy_preempt and not options.postcopy:
        raise UsageError("postcopy_preempt (--postcopy-preempt) is a channel of postcopy: give postcopy too")
    try:
        kind, where = parse_address(to)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if options.tls_creds is None:
        if options.tls_hostname is not None:
            raise UsageError("tls_hostname (--tls-hostname) is for TLS: give the TLS credentials (--tls-creds) too")
        if kind == "tcp" and not options.insecure:
            assert isinstance(where, tuple)
            if not is_loopback(where[0]):
                raise UsageError(
                    f"{to}: guest RAM would cross the network in the clear; serve with TLS (--tls-creds), "
                    f"to a unix socket or a loopback address, or pass --insecure"
                )
        return
    tls_client_context(options.tls_creds)  # the directory, its files and the key's mode, before anything else
    if kind == "unix" and not options.tls_hostname:
        raise UsageError(
            f"{to}: TLS over a unix socket needs the name the destination's certificate is for "
            f"(tls_hostname, --tls-hostname; QEMU's tls-hostname), as QEMU needs it"
        )


#: A page request as the return-path thread queues it: block index, first page, pages, arrival time.
_Request = tuple[int, int, int, float]
#: A background read: block index and its page numbers; the result adds their bytes.
_Task = tuple[int, npt.NDArray[np.int64]]
#: A background chunk: block index, page numbers, the pooled buffer of their records, each
#: record's start (and the total), each page's data offset.
_Chunk = tuple[int, npt.NDArray[np.int64], Any, npt.NDArray[np.int64], npt.NDArray[np.int64]]


class _Session:
    """One connection to one destination: the sender (the calling thread) and the return path."""

    def __init__(
        self, mf: MigrationFile, to: str, plan: StreamPlan, options: ServeOptions, engine: EngineOptions, t0: float
    ) -> None:
        self.mf = mf
        self.to = to
        self.plan = plan
        self.options = options
        self.engine = engine
        self.t0 = t0
        self.ps = mf.page_size
        self.blocks = mf.blocks
        self.index = {b.idstr: i for i, b in enumerate(mf.blocks)}
        self.sent = [np.zeros(b.num_pages, dtype=np.bool_) for b in mf.blocks]
        self.requests: queue.Queue[_Request] = queue.Queue()
        self.events: queue.Queue[RpMessage | BaseException | None] = queue.Queue()
        self.last_request_block: int | None = None
        self.pages_sent = 0
        self.pages_requested = 0
        self.request_count = 0
        self.requests_in_flight = 0
        self.zero_records = 0
        self.latencies: list[float] = []
        self.pongs: set[int] = set()
        self.shut: int | None = None
        self.rp_ended = False
        self.conn: Connection | None = None
        self.preempt: Connection | None = None  # the postcopy-preempt channel, when asked for
        self.pool: queue.Queue[Any] = queue.Queue()
        # Claims of pages to send (the sent bitmaps, the counters) and the state of the answering
        # (requests answered on the return-path thread while the background goes on).
        self.cond = threading.Condition()
        self.answering = False
        self.finished = False
        self.in_flight = 0

    # -- the return path (its own thread) ------------------------------------------------

    def _on_frame(self, header: bytes, body: bytes) -> None:
        msg = decode_rp_message(header, body)
        if msg.kind in (MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID):
            now = time.perf_counter()
            if msg.kind == MIG_RP_MSG_REQ_PAGES_ID:
                block = self.index.get(msg.idstr or "")
                if block is None:
                    raise MigrationError(
                        f"the destination asked for pages of block {msg.idstr!r}, which the file does not have",
                        destination=self.to,
                        stage="postcopy",
                    )
                self.last_request_block = block
            elif self.last_request_block is None:
                raise MigrationError(
                    "the destination asked for pages before naming a block", destination=self.to, stage="postcopy"
                )
            b = self.blocks[self.last_request_block]
            start, length = msg.start or 0, msg.length or 0
            if start % self.ps or length % self.ps or start + length > b.used_length or length == 0:
                raise MigrationError(
                    f"the destination asked for bytes {start:#x}+{length:#x} of block {b.idstr!r} "
                    f"({b.used_length:#x} bytes, {self.ps}-byte pages)",
                    destination=self.to,
                    stage="postcopy",
                )
            self._on_request((self.last_request_block, start // self.ps, length // self.ps, now))
            return
        self.events.put(msg)

    def _on_request(self, request: _Request) -> None:
        """Answer a page request on the return-path thread itself, so the background stream
        goes on while the page is read; before the PART section is open it waits in a queue."""
        with self.cond:
            if not self.answering:
                if not self.finished:
                    self.requests.put(request)
                return
            self.in_flight += 1
        try:
            self._answer(request)
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    def _on_end(self, exc: BaseException | None) -> None:
        self.events.put(exc)

    # -- waiting for the destination -----------------------------------------------------

    def _handle(self, event: RpMessage | BaseException | None, stage: str) -> None:
        if isinstance(event, BaseException):
            self.rp_ended = True
            if isinstance(event, MigrationError):
                raise event
            raise MigrationError(f"the return path failed: {event}", destination=self.to, stage=stage) from event
        if event is None:
            self.rp_ended = True
            return
        if event.kind == MIG_RP_MSG_PONG and event.value is not None:
            self.pongs.add(event.value)
        elif event.kind == MIG_RP_MSG_SHUT:
            self.shut = event.value

    def _wait(self, done: Callable[[], bool], what: str, stage: str) -> None:
        """Handle return-path events until ``done()``; an error if the destination goes away first."""
        deadline = time.monotonic() + self.options.timeout
        while not done():
            if self.shut is not None and self.shut != 0:
                raise MigrationError(
                    f"the destination refused the stream: it reported failure (status {self.shut}) while serve "
                    f"waited for {what}",
                    destination=self.to,
                    stage=stage,
                )
            if self.rp_ended:
                raise MigrationError(
                    f"the destination closed the connection while serve waited for {what}: it refused the stream "
                    f"or went away (its query-migrate or its log says why)",
                    destination=self.to,
                    stage=stage,
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(
                    f"the destination did not answer within {self.options.timeout} s (waiting for {what})",
                    destination=self.to,
                    stage=stage,
                )
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self._handle(event, stage)

    def _poll_events(self, stage: str) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self._handle(event, stage)
            if self.rp_ended or (self.shut is not None and self.shut != 0):
                self._wait(lambda: False, "the rest of the stream to be taken", stage)

    def _connect(self) -> Connection:
        tls = tls_client_context(self.options.tls_creds) if self.options.tls_creds is not None else None
        try:
            return Connection.connect(
                self.to, timeout=self.options.timeout, retry_for=self.options.connect_retry, tls=tls,
                server_hostname=self.options.tls_hostname,
            )  # fmt: skip
        except TlsError as exc:
            raise MigrationError(str(exc), destination=self.to, stage="tls") from None
        except ConnectionLost as exc:
            raise MigrationError(str(exc), destination=self.to, stage="connect") from None

    def _send(self, data: bytes | bytearray | memoryview, stage: str, conn: Connection | None = None) -> None:
        conn = conn or self.conn
        assert conn is not None
        try:
            conn.send(data)
        except ConnectionLost as exc:
            # the destination may have said why before it went away
            self._drain_quietly(stage)
            if self.shut:
                text = f"the destination refused the stream: it reported failure (status {self.shut}) and closed"
            else:
                text = "the destination closed the connection: it refused the stream or went away"
            raise MigrationError(f"{text} while serve was sending ({exc})", destination=self.to, stage=stage) from None

    def _drain_quietly(self, stage: str) -> None:
        """Take in what the destination said before it went away (a SHUT). A specific error
        the return path raised (a request for a block the file lacks, a page it could not
        read) is raised instead of the sender's own; a connection that ended is noted."""
        while True:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                return
            if isinstance(event, MigrationError):
                self.rp_ended = True
                raise event
            if isinstance(event, BaseException) or event is None:
                self.rp_ended = True
                continue
            self._handle(event, stage)

    # -- the stream ------------------------------------------------------------------------

    def run(self) -> ServeReport:
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        self.conn = self._connect()
        receiver = FrameReceiver(self.conn, RP_HEADER_SIZE, rp_body_length, self._on_frame, self._on_end)
        receiver.start()
        seconds_to_run: float | None = None
        try:
            seconds["open"] = time.perf_counter() - self.t0
            t = time.perf_counter()
            self._send(self.plan.opening, "configuration")
            self._wait(lambda: PING_OPENED in self.pongs, "its answer to the first ping", "configuration")
            self._send(self.plan.head, "ram-setup")
            seconds["setup"] = time.perf_counter() - t
            t = time.perf_counter()
            tasks = self._tasks()
            if self.options.postcopy:
                if self.options.postcopy_preempt:
                    # QEMU's postcopy_preempt_establish_channel: the second connection; requests
                    # are answered on it from now on, never queued behind the background stream
                    self.preempt = self._connect()
                    self._open_answering()
                # the PART section opens right after the package, as QEMU's source goes on
                # at once: loading devices may touch guest RAM (virtio_load reads the rings),
                # and those pages must come while the destination is still loading
                self._send(self.plan.package + self.plan.part_head, "package")
                self._open_answering()
                self._wait(lambda: PING_RUN in self.pongs, "it to load the device state", "package")
                seconds_to_run = time.perf_counter() - self.t0
                seconds["device_state"] = time.perf_counter() - t
                t = time.perf_counter()
                self._postcopy_pages(tasks)
                self._send(self.plan.part_end + self.plan.postcopy_tail, "postcopy")
            else:
                self._send(self.plan.part_head, "pages")
                self._precopy_pages(tasks)
                self._send(self.plan.part_end + self.plan.precopy_tail, "device-state")
            seconds["pages"] = time.perf_counter() - t
            t = time.perf_counter()
            self.conn.shutdown_write()
            self._wait(lambda: self.shut is not None or self.rp_ended, "it to finish loading", "finish")
            seconds["finish"] = time.perf_counter() - t
        finally:
            self.conn.close()
            if self.preempt is not None:
                self.preempt.close()
            receiver.join(5.0)
        if self.shut is None:
            raise MigrationError(
                "the destination closed the connection without saying it loaded the stream",
                destination=self.to,
                stage="finish",
            )
        if self.shut != 0:
            raise MigrationError(
                f"the destination refused the stream: it reported failure (status {self.shut}) at the end",
                destination=self.to,
                stage="finish",
            )
        lat = np.array(self.latencies) * 1e6
        zero = sum(b.pages_zero for b in self.blocks)
        notes = []
        if self.zero_records:
            notes.append(f"{self.zero_records} zero pages no one asked for were sent as ZERO records at the end "
                         f"(QEMU's preempt destination waits for every page it asks for)")  # fmt: skip
        elif self.options.postcopy and zero:
            notes.append(f"{zero} zero pages were not sent unless asked for: the destination's fresh RAM is zero")
        if self.requests_in_flight:
            notes.append(f"{self.requests_in_flight} requests were for pages already on their way (no latency counted)")
        return ServeReport(
            path=self.mf.path,
            destination=self.to,
            mode="postcopy" if self.options.postcopy else "precopy",
            machine_type=self.mf.machine_type or "",
            ram_bytes=sum(b.used_length for b in self.blocks),
            pages_sent=self.pages_sent,
            pages_zero=zero,
            pages_requested=self.pages_requested,
            requests=self.request_count,
            bytes_sent=self.conn.bytes_sent + (self.preempt.bytes_sent if self.preempt is not None else 0),
            channels=self.engine.channels,
            seconds=seconds,
            seconds_to_run=seconds_to_run,
            request_latency_us=(
                {
                    "median": float(np.median(lat)),
                    "p99": float(np.percentile(lat, 99)),
                    "max": float(lat.max()),
                }
                if lat.size
                else None
            ),
            destination_status=self.shut,
            tls=self.conn.tls_version,
            preempt=self.preempt is not None,
            notes=notes,
        )

    def _tasks(self) -> list[_Task]:
        """Reads of the pages that hold data, ``read_pages`` at a time, in block and page order."""
        tasks: list[_Task] = []
        step = max(self.options.read_pages, 1)
        for i, b in enumerate(self.blocks):
            present = np.flatnonzero(b.present).astype(np.int64)
            tasks += [(i, present[k : k + step]) for k in range(0, len(present), step)]
        total = sum(len(p) for _, p in tasks) * self.ps
        self.engine.started(total)
        return tasks

    def _records(self, task: _Task) -> _Chunk:
        """The PAGE records of a background read, built in a pooled buffer: the headers by
        the encoder, the pages read from the file straight into their places."""
        block, pages = task
        b = self.blocks[block]
        buf = self.pool.get()
        try:
            out = np.frombuffer(buf, dtype=np.uint8)
            starts, data = encode_page_headers_into(
                b.idstr, pages.astype(np.uint64) * np.uint64(self.ps), self.ps, out,
                name_every=self.options.send_pages,
            )  # fmt: skip
            self.mf.read_pages_at(b, pages, memoryview(buf), data)
        except BaseException:
            self.pool.put(buf)
            raise
        return block, pages, buf, starts, data

    def _make_pool(self) -> None:
        """Buffers for the records being built or waiting to be sent: never more than the
        read-ahead window plus what each reader holds, so the pool never runs dry."""
        channels = max(self.engine.channels, 1)
        size = page_headers_size("x" * 255, max(self.options.read_pages, 1), self.ps, self.options.send_pages)
        self.pool = queue.Queue()
        for _ in range(2 * channels + 2):
            self.pool.put(aligned_buffer(size))

    def _encode(self, block: int, pages: npt.NDArray[np.int64], data: memoryview | bytearray | npt.NDArray[np.uint8],
                nonzero: npt.NDArray[np.bool_]) -> bytearray:  # fmt: skip
        """Records of ``pages`` (each starting with the block's name, so any order of
        blocks on the wire stays right): PAGE records, ZERO where ``nonzero`` is False."""
        b = self.blocks[block]
        if isinstance(data, np.ndarray):
            arr = data
        else:
            arr = np.frombuffer(data, dtype=np.uint8, count=len(pages) * self.ps).reshape(len(pages), self.ps)
        out = bytearray(page_records_size(b.idstr, nonzero, self.ps))
        n = encode_page_records_into(
            b.idstr, pages.astype(np.uint64) * np.uint64(self.ps), arr, nonzero, np.frombuffer(out, dtype=np.uint8)
        )
        del out[n:]
        return out

    def _precopy_pages(self, tasks: list[_Task]) -> None:
        channels = max(self.engine.channels, 1)
        self._make_pool()
        with ReadAhead(tasks, self._records, channels=channels, window=channels + 1) as reads:
            while not reads.done:
                chunk = reads.next()
                assert chunk is not None
                _, pages, buf, starts, _ = chunk
                try:
                    self._send(memoryview(buf)[: int(starts[-1])], "pages")
                finally:
                    self.pool.put(buf)
                self.pages_sent += len(pages)
                if self.engine.progress is not None:
                    self.engine.progress(len(pages) * self.ps)
                self._poll_events("pages")

    def _answer(self, request: _Request) -> None:
        """Send the pages of a request not sent yet (zero pages as ZERO records)."""
        block, first, count, arrived = request
        b = self.blocks[block]
        with self.cond:
            self.request_count += 1
            pages = np.arange(first, first + count, dtype=np.int64)
            pages = pages[~self.sent[block][first : first + count]]
            self.sent[block][pages] = True
        if pages.size:
            buf = bytearray(len(pages) * self.ps)
            self.mf.read_page_list(b, pages, buf)
            nonzero = np.asarray(b.present[pages], dtype=np.bool_)
            self._send(self._encode(block, pages, buf, nonzero), "postcopy", self.preempt)
            with self.cond:
                self.pages_sent += len(pages)
                self.pages_requested += len(pages)
                self.cond.notify_all()
            if self.engine.progress is not None:
                self.engine.progress(int(np.count_nonzero(nonzero)) * self.ps)
            self.latencies.append(time.perf_counter() - arrived)
        else:
            with self.cond:
                self.requests_in_flight += 1  # its pages were on their way already

    def _open_answering(self) -> None:
        """From now on requests are answered as they come (on the return-path thread); the
        ones that came before are answered here, first."""
        with self.cond:
            self.answering = True
        while True:
            try:
                self._answer(self.requests.get_nowait())
            except queue.Empty:
                return

    def _postcopy_pages(self, tasks: list[_Task]) -> None:
        """Open the answering of requests (on the return-path thread), stream the pages not
        sent yet, a run of ``send_pages`` records at a time (each run starts with the block's
        name), then close the answering so nothing follows the end of the stream."""
        channels = max(self.engine.channels, 1)
        step = max(self.options.send_pages, 1)
        self._make_pool()
        try:
            self._wait_for_requests()
            with ReadAhead(tasks, self._records, channels=channels, window=channels + 1) as reads:
                while not reads.done:
                    chunk = reads.next(timeout=0.05)
                    self._poll_events("postcopy")
                    if chunk is None:
                        continue
                    try:
                        for a in range(0, len(chunk[1]), step):
                            self._send_run(chunk, a, min(a + step, len(chunk[1])))
                    finally:
                        self.pool.put(chunk[2])
            if self.preempt is not None:
                self._send_zero_pages()
        finally:
            with self.cond:
                self.answering = False
                self.finished = True
                settled = self.cond.wait_for(lambda: self.in_flight == 0, timeout=self.options.timeout)
        if not settled:
            raise MigrationError(
                f"an answer to a page request was still being sent after {self.options.timeout} s: "
                f"the stream is not ended under it",
                destination=self.to,
                stage="postcopy",
            )
        self._poll_events("postcopy")

    def _send_zero_pages(self) -> None:
        """ZERO records of every page not sent yet. With the preempt channel QEMU waits, at
        the end, for each page it asked for (postcopy_ram_incoming_cleanup), even one asked
        for after its preempt thread quit: so no page may be left to ask for."""
        step = 1 << 14
        for block in range(len(self.blocks)):
            with self.cond:
                pages = np.flatnonzero(~self.sent[block]).astype(np.int64)
                self.sent[block][pages] = True
            zero = np.broadcast_to(np.zeros(self.ps, dtype=np.uint8), (step, self.ps))
            for k in range(0, len(pages), step):
                run = pages[k : k + step]
                self._send(self._encode(block, run, zero[: len(run)], np.zeros(len(run), dtype=np.bool_)), "postcopy")
                with self.cond:
                    self.zero_records += len(run)
                    self.pages_sent += len(run)
                self._poll_events("postcopy")

    def _wait_for_requests(self) -> None:
        """With ``background_after``: wait until the destination has asked for that many pages
        (the time limit runs from its last request)."""
        want = self.options.background_after
        deadline = time.monotonic() + self.options.timeout
        seen = -1
        while True:
            with self.cond:
                now_seen = self.pages_requested
                if now_seen >= want:
                    return
                if now_seen == seen:
                    self.cond.wait(timeout=0.05)
            self._poll_events("postcopy")
            if now_seen != seen:
                seen = now_seen
                deadline = time.monotonic() + self.options.timeout
            elif time.monotonic() > deadline:
                raise MigrationError(
                    f"the destination did not ask for pages within {self.options.timeout} s "
                    f"(waiting for the guest to ask for pages)",
                    destination=self.to,
                    stage="postcopy",
                )

    def _send_run(self, chunk: _Chunk, a: int, b: int) -> None:
        """Send records ``a`` .. ``b`` of a background chunk, but pages already sent (asked for)."""
        block, pages, buf, starts, data = chunk
        with self.cond:
            todo = ~self.sent[block][pages[a:b]]
            self.sent[block][pages[a:b]] = True
        if not todo.any():
            return
        if todo.all():
            self._send(memoryview(buf)[int(starts[a]) : int(starts[b])], "postcopy")
            picked = pages[a:b]
        else:
            sel = np.flatnonzero(todo) + a
            picked = pages[sel]
            arr = np.frombuffer(buf, dtype=np.uint8)
            rows = arr[data[sel][:, None] + np.arange(self.ps)]
            self._send(self._encode(block, picked, rows.tobytes(), np.ones(len(picked), dtype=np.bool_)), "postcopy")
        with self.cond:
            self.pages_sent += len(picked)
        if self.engine.progress is not None:
            self.engine.progress(len(picked) * self.ps)


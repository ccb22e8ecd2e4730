"""Run a paused QEMU x86 guest over QMP to save and load migration files.

The guest's main RAM is a shared ``memory-backend-file`` (id ``m0``), so a test writes
the RAM before a save and reads it after a load. The guest CPU never runs (``-S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from qemu.qmp import ExecuteError, QMPClient, QMPError

__all__ = [
    "BACKEND_ID",
    "MAX_BANDWIDTH",
    "MIN_VERSION",
    "PAGE_SIZE",
    "QemuError",
    "QemuVM",
    "file_uri",
    "find_qemu",
    "first_mismatch",
    "kvm_usable",
    "o_direct_supported",
    "pattern_ram",
    "qemu_version",
    "require_qemu",
]

QEMU_BINARY = "qemu-system-x86_64"
MIN_VERSION = (9, 0, 0)
PAGE_SIZE = 4096
BACKEND_ID = "m0"
#: 1 TiB/s: lifts QEMU's default limit of 128 MiB/s.
MAX_BANDWIDTH = 1 << 40

_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
_SUN_PATH_MAX = 107
_STDERR_TAIL = 4000

_T = TypeVar("_T")


class QemuError(RuntimeError):
    """QEMU failed: a QMP error, a failed migration, a timeout or an early exit."""

    def __init__(self, message: str, stderr: str = "") -> None:
        self.message = message
        self.stderr = stderr
        text = message
        if stderr.strip():
            text += "\nQEMU stderr:\n" + stderr.strip()[-_STDERR_TAIL:]
        super().__init__(text)


# -- finding QEMU -----------------------------------------------------------------------


def find_qemu() -> str | None:
    """The ``qemu-system-x86_64`` on PATH, or None."""
    return shutil.which(QEMU_BINARY)


@functools.cache
def qemu_version(binary: str) -> tuple[int, int, int]:
    """(major, minor, micro) from ``binary --version``."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True, stdin=subprocess.DEVNULL
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise QemuError(f"cannot parse the version of {binary}: {out.strip()!r}")
    return int(m[1]), int(m[2]), int(m[3])


def require_qemu(min_version: tuple[int, int, int] = MIN_VERSION) -> str:
    """Return a usable QEMU binary; skip the test without one, or fail it when ``CI=true``."""
    binary = find_qemu()
    want = ".".join(map(str, min_version[:2]))
    reason = None
    if binary is None:
        reason = f"{QEMU_BINARY} >= {want} not found on PATH"
    else:
        try:
            version = qemu_version(binary)
        except (OSError, subprocess.SubprocessError, QemuError) as exc:
            reason = f"{binary} does not run: {exc}"
        else:
            if version < min_version:
                reason = f"{binary} is QEMU {'.'.join(map(str, version))}; >= {want} needed"
    if reason is None:
        assert binary is not None
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and QEMU interop tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def kvm_usable() -> bool:
    """/dev/kvm opens read-write and speaks the stable KVM API."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def o_direct_supported(directory: str | os.PathLike[str]) -> bool:
    """The filesystem of ``directory`` accepts ``O_DIRECT`` opens."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = Path(directory) / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | flag, 0o600)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# -- RAM contents ----------------------------------------------------------------------


def pattern_ram(size: int, *, seed: int = 0x5EED, zero_permille: int = 500) -> npt.NDArray[np.uint8]:
    """The test-vector RAM pattern (tests/data/qemu/README.md) as a flat uint8 array.

    Page ``i`` is all zero iff ``(h(i) >> 32) % 1000 < zero_permille``; otherwise its
    little-endian u64 words are ``i``, 510 times ``h(i)``, then ``~i``.
    """
    if size % PAGE_SIZE:
        raise ValueError(f"size {size} is not a multiple of {PAGE_SIZE}")
    n = size // PAGE_SIZE
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = z ^ (z >> np.uint64(31))
    zero = (h >> np.uint64(32)) % np.uint64(1000) < np.uint64(zero_permille)
    words = np.empty((n, PAGE_SIZE // 8), dtype="<u8")
    words[:] = h[:, None]
    words[:, 0] = i
    words[:, -1] = ~i
    words[zero] = 0
    return words.view(np.uint8).reshape(-1)


def first_mismatch(actual: Any, expected: Any, page_size: int = PAGE_SIZE) -> str | None:
    """None if the two buffers are equal, else a description of the first differing page."""
    a = np.frombuffer(actual, dtype=np.uint8)
    e = np.frombuffer(expected, dtype=np.uint8)
    if len(a) != len(e):
        return f"length {len(a)} != expected {len(e)}"
    diff = np.flatnonzero(a != e)
    if not len(diff):
        return None
    at = int(diff[0])
    page = at // page_size
    pages = np.unique(diff // page_size)
    return (
        f"{len(pages)} page(s) differ; first at page {page} (byte {at:#x}, +{at % page_size:#x} in the page): "
        f"got {a[at]:#04x}, expected {e[at]:#04x}; first differing pages: {pages[:8].tolist()}"
    )


def file_uri(path: str | os.PathLike[str], offset: int | None = None) -> str:
    """A ``file:`` migration URI, with ``,offset=0x..`` when ``offset`` is given."""
    uri = f"file:{os.fspath(path)}"
    return uri if offset is None else f"{uri},offset={offset:#x}"


# -- the VM ----------------------------------------------------------------------------


def _opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return os.fspath(value).replace(",", ",,")


class QemuVM:
    """A paused ``qemu-system-x86_64`` with QMP, its RAM in ``ram_path`` (shared).

    ``incoming=True`` starts a destination (``-incoming defer``) on a fresh all-zero
    RAM file; otherwise ``ram_path`` must already hold ``ram_mib`` MiB of guest RAM
    (a missing file is created all zero). Use as a context manager: on exit QEMU
    gets ``quit`` and is killed if it lingers. ``timeout`` bounds start-up and every
    QMP command; QEMU's output goes to ``log_path`` and into every QemuError.
    """

    def __init__(
        self,
        ram_path: str | os.PathLike[str],
        *,
        machine: str = "q35",
        ram_mib: int = 64,
        incoming: bool = False,
        binary: str | None = None,
        accel: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        smp: int = 1,
    ) -> None:
        found = binary or find_qemu()
        if found is None:
            raise QemuError(f"{QEMU_BINARY} not found on PATH")
        self.binary = found
        self.ram_path = Path(ram_path)
        self.machine = machine
        self.ram_size = ram_mib << 20
        self.incoming = incoming
        self.accel = accel or ("kvm" if kvm_usable() else "tcg")
        self.workdir = Path(workdir) if workdir is not None else self.ram_path.parent
        self.name = name or ("dst" if incoming else "src")
        self.timeout = timeout
        self.extra_args = tuple(extra_args)
        self.smp = smp
        self.log_path = self.workdir / f"{self.name}.qemu.log"
        self.events: list[dict[str, Any]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp: QMPClient | None = None
        self._sock_dir: str | None = None

    # -- life cycle -----------------------------------------------------------------

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def args(self) -> list[str]:
        """QEMU's command line."""
        args = [
            self.binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            self.accel,
            "-machine",
            f"{self.machine},memory-backend={BACKEND_ID}",
            "-m",
            f"{self.ram_size >> 20}M",
            "-smp",
            str(self.smp),
            "-object",
            f"memory-backend-file,id={BACKEND_ID},size={self.ram_size >> 20}M,mem-path={_opt(self.ram_path)},share=on",
            "-qmp",
            f"unix:{_opt(self.socket_path)},server=on,wait=off",
            "-S",
        ]
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + list(self.extra_args)

    @property
    def socket_path(self) -> Path:
        assert self._sock_dir is not None
        return Path(self._sock_dir) / f"{self.name}.qmp"

    def start(self) -> None:
        """Prepare the RAM file, start QEMU and connect QMP."""
        if self._proc is not None:
            raise QemuError("QEMU is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare_ram()
        if len(os.fspath(self.workdir / f"{self.name}.qmp")) <= _SUN_PATH_MAX:
            self._sock_dir = os.fspath(self.workdir)
        else:
            self._sock_dir = tempfile.mkdtemp(prefix="qmp-")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._loop = asyncio.new_event_loop()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _prepare_ram(self) -> None:
        if self.incoming:
            with open(self.ram_path, "wb") as f:
                f.truncate(self.ram_size)
            return
        if not self.ram_path.exists():
            with open(self.ram_path, "wb") as f:
                f.truncate(self.ram_size)
        size = self.ram_path.stat().st_size
        if size != self.ram_size:
            raise ValueError(f"{self.ram_path} holds {size} bytes, not {self.ram_size}")

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        last: BaseException | None = None
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise QemuError(f"QEMU exited with status {self._proc.returncode} during start-up", self.stderr)
            if self.socket_path.exists():
                qmp = QMPClient(self.name)
                try:
                    self._run(qmp.connect(os.fspath(self.socket_path)), max(deadline - time.monotonic(), 0.1))
                except (QMPError, OSError, QemuError) as exc:
                    last = exc
                else:
                    self._qmp = qmp
                    return
            if time.monotonic() > deadline:
                raise QemuError(f"QMP did not come up within {self.timeout} s (last error: {last})", self.stderr)
            time.sleep(0.01)

    def close(self) -> None:
        """Quit QEMU (kill it if it does not exit), disconnect, and clean up."""
        proc, qmp, loop = self._proc, self._qmp, self._loop
        self._qmp = None
        if qmp is not None and proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self._run(qmp.execute("quit"), 5.0)
        if qmp is not None:
            with contextlib.suppress(Exception):
                self._run(qmp.disconnect(), 5.0)
        if proc is not None:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10.0)
        if loop is not None:
            loop.close()
            self._loop = None
        if self._sock_dir is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
            if self._sock_dir != os.fspath(self.workdir):
                shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    # -- state --------------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        """QEMU's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def last_error(self) -> str | None:
        """QEMU's last non-warning message on stderr, without the program-name prefix.

        A failed load's ``error-desc`` is only "load of migration failed: ..."; the
        reason (e.g. a capability or machine-type mismatch) is printed here.
        """
        prefix = f"{Path(self.binary).name}: "
        for line in reversed(self.stderr.splitlines()):
            if line.startswith(prefix) and not line.startswith(prefix + "warning:"):
                return line[len(prefix) :]
        return None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # -- QMP ------------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        assert self._loop is not None
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise QemuError(f"QMP timed out after {timeout:.1f} s", self.stderr) from None

    def cmd(self, name: str, arguments: Mapping[str, object] | None = None, *, timeout: float | None = None) -> Any:
        """Run one QMP command and return its result; QemuError on any failure."""
        if self._qmp is None:
            raise QemuError(f"{name}: QEMU is not running", self.stderr)
        try:
            result = self._run(self._qmp.execute(name, dict(arguments) if arguments else None), timeout or self.timeout)
        except ExecuteError as exc:
            raise QemuError(f"QMP {name} failed: {exc}", self.stderr) from None
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {name}: {type(exc).__name__}: {exc}", self.stderr) from None
        self._drain_events()
        return result

    def _drain_events(self) -> None:
        if self._qmp is not None:
            self.events.extend(dict(e) for e in self._qmp.events.clear())

    def configure_migration(
        self, capabilities: Mapping[str, bool] | None, parameters: Mapping[str, Any] | None
    ) -> None:
        """Set migration capabilities (plus ``events``) and parameters (plus ``max-bandwidth``)."""
        caps = {"events": True, **(capabilities or {})}
        self.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": bool(v)} for k, v in caps.items()]},
        )
        self.cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH, **(parameters or {})})

    def save(
        self,
        uri: str,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Stop the guest and migrate it to ``uri``; return the final ``query-migrate``.

        Once a save completes, QEMU refuses another ``migrate`` from the same VM.
        """
        if self.incoming:
            raise QemuError("save() needs a source VM, not an incoming one")
        self.cmd("stop")
        self.configure_migration(capabilities, parameters)
        self.cmd("migrate", {"uri": uri})
        return self.wait_migration(timeout)

    def load(
        self,
        uri: str,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Load the migration stream at ``uri``; return the final ``query-migrate``."""
        if not self.incoming:
            raise QemuError("load() needs a VM started with incoming=True")
        self.configure_migration(capabilities, parameters)
        self.cmd("migrate-incoming", {"uri": uri, "exit-on-error": False})
        return self.wait_migration(timeout)

    def dump_guest_memory(self, path: str | os.PathLike[str], *, timeout: float = 300.0) -> None:
        """QEMU's own ELF core of the guest (``dump-guest-memory``, paging off), written to ``path``."""
        self.cmd("dump-guest-memory", {"paging": False, "protocol": f"file:{os.fspath(path)}"}, timeout=timeout)

    def run_until_halted(self, timeout: float = 30.0) -> None:
        """Let the guest run until vCPU 0 executes HLT (``info registers`` shows HLT=1), then stop it."""
        self.cmd("cont")
        deadline = time.monotonic() + timeout
        while "HLT=1" not in self.cmd("human-monitor-command", {"command-line": "info registers"}):
            if time.monotonic() > deadline:
                raise QemuError(f"vCPU 0 did not halt within {timeout} s", self.stderr)
            time.sleep(0.01)
        self.cmd("stop")

    def wait_migration(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``query-migrate`` (and watch MIGRATION events) until it completes."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            left = deadline - time.monotonic()
            info: dict[str, Any] = self.cmd("query-migrate", timeout=max(left, 1.0))
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                desc = info.get("error-desc", "no error-desc given")
                cause = self.last_error()
                if cause and cause not in desc:
                    desc += f" ({cause})"
                raise QemuError(f"migration {status}: {desc}", self.stderr)
            if left <= 0:
                raise QemuError(f"migration not completed after {timeout} s (status {status!r})", self.stderr)
            self._wait_event(min(delay, max(left, 0.0)))
            delay = min(delay * 2, 0.1)

    def _wait_event(self, timeout: float) -> dict[str, Any] | None:
        """The next QMP event within ``timeout`` seconds, or None; it is kept in ``events``."""
        assert self._qmp is not None and self._loop is not None
        try:
            event = dict(self._loop.run_until_complete(asyncio.wait_for(self._qmp.events.get(), timeout)))
        except TimeoutError:
            return None
        self.events.append(event)
        return event

"""A QEMU destination for :func:`mappedram.ops.server.serve`: started here, or reached over QMP.

:class:`Qmp` is a synchronous client of QEMU's QMP socket (through ``qemu.qmp``), with a
time limit on every command. :class:`QemuDestination` starts ``qemu-system-*`` with the
caller's arguments plus ``-incoming defer`` and a QMP socket in a private directory (0700),
sets the migration capabilities, and asks it to listen on a unix socket there; it keeps its
log, so a refusal can carry what QEMU said. The QEMU process outlives serve (its own
session): it is the restored guest.

References:
    QEMU qapi/migration.json (migrate-incoming, migrate-set-capabilities, query-migrate),
    docs/devel/migration/postcopy.rst (the destination's capabilities).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mappedram.errors import MigrationError, UsageError

__all__ = ["Qmp", "QemuDestination"]

_T = TypeVar("_T")
_LOG_TAIL = 4000


class Qmp:
    """A QMP connection; every command waits at most ``timeout`` seconds."""

    def __init__(self, path: str, *, timeout: float = 30.0, name: str = "mappedram") -> None:
        try:
            from qemu.qmp import QMPClient
        except ImportError:  # pragma: no cover - a dependency
            raise UsageError("driving QEMU needs the qemu.qmp package (pip install qemu.qmp)") from None
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def connect(self) -> None:
        from qemu.qmp import QMPError

        try:
            self._run(self._client.connect(self.path), self.timeout)
        except QMPError as exc:  # ConnectError: refused, e.g. bound but not listening yet
            raise MigrationError(f"cannot connect to QMP at {self.path}: {exc}", stage="qmp") from None
        except MigrationError:
            raise MigrationError(
                f"QMP at {self.path} did not greet within {self.timeout} s (a QMP socket serves one client "
                f"at a time: is another one connected?)",
                stage="qmp",
            ) from None
        except OSError as exc:
            raise MigrationError(f"cannot connect to QMP at {self.path}: {exc.strerror or exc}", stage="qmp") from None

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise MigrationError(f"QMP at {self.path} did not answer within {timeout} s", stage="qmp") from None

    def cmd(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; MigrationError carrying QEMU's message when it fails."""
        from qemu.qmp import ExecuteError, QMPError

        try:
            return self._run(self._client.execute(name, arguments), self.timeout)
        except ExecuteError as exc:
            raise MigrationError(f"QMP {name} failed: {exc}", stage="qmp", qemu_error=str(exc)) from None
        except (QMPError, OSError, EOFError) as exc:
            raise MigrationError(f"QMP {name}: {type(exc).__name__}: {exc}", stage="qmp") from None

    def migration(self) -> dict[str, Any]:
        info: dict[str, Any] = self.cmd("query-migrate")
        return info

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()


class QemuDestination:
    """A QEMU that serve started with ``-incoming defer``: its process, QMP and log."""

    def __init__(self, args: Sequence[str], *, timeout: float = 30.0, workdir: str | None = None) -> None:
        if not args:
            raise UsageError("--qemu needs QEMU's command line after it (e.g. -- qemu-system-x86_64 -m 4G ...)")
        self.dir = Path(tempfile.mkdtemp(prefix="mappedram-serve-", dir=workdir))  # 0700
        self.qmp_path = self.dir / "qmp.sock"
        self.migrate_path = self.dir / "migrate.sock"
        self.log_path = self.dir / "qemu.log"
        self.timeout = timeout
        self.args = [*args, "-incoming", "defer", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as exc:
                raise MigrationError(f"cannot start {self.args[0]}: {exc.strerror or exc}", stage="start") from None
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise MigrationError(
                    f"QEMU exited with status {self.proc.returncode} during start-up",
                    stage="start",
                    qemu_error=self.last_error(),
                )
            if self.qmp_path.exists():
                qmp = Qmp(os.fspath(self.qmp_path), timeout=self.timeout)
                try:
                    qmp.connect()
                except (MigrationError, OSError):
                    qmp.close()
                else:
                    self.qmp = qmp
                    return
            if time.monotonic() > deadline:
                raise MigrationError(f"QEMU's QMP did not come up within {self.timeout} s", stage="start",
                                     qemu_error=self.last_error())  # fmt: skip
            time.sleep(0.01)

    def listen(self, *, postcopy: bool, preempt: bool = False) -> str:
        """Set the capabilities and have QEMU listen; return the address to serve to."""
        assert self.qmp is not None
        caps = [{"capability": "postcopy-ram", "state": postcopy}]
        if preempt:
            caps.append({"capability": "postcopy-preempt", "state": True})
        self.qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
        self.qmp.cmd("migrate-incoming", {"uri": f"unix:{self.migrate_path}", "exit-on-error": False})
        return f"unix:{self.migrate_path}"

    def wait_completed(self, timeout: float) -> dict[str, Any]:
        """Poll query-migrate until the incoming migration completed; MigrationError if it failed."""
        assert self.qmp is not None
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.migration()
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise MigrationError(f"the destination's migration {status}", stage="finish",
                                     qemu_error=self.error_text(info))  # fmt: skip
            if time.monotonic() > deadline:
                raise MigrationError(f"the destination did not complete within {timeout} s (status {status!r})",
                                     stage="finish")  # fmt: skip
            time.sleep(0.005)

    def run_state(self) -> str:
        assert self.qmp is not None
        return str(self.qmp.cmd("query-status").get("status"))

    def error_text(self, info: dict[str, Any] | None = None) -> str | None:
        """What QEMU said of a failure: query-migrate's error-desc, and its last error line."""
        parts = []
        if info is None and self.qmp is not None and self.alive:
            with contextlib.suppress(MigrationError):
                info = self.qmp.migration()
        if info and info.get("error-desc"):
            parts.append(str(info["error-desc"]))
        last = self.last_error()
        if last and not any(last in p for p in parts):
            parts.append(last)
        return "; ".join(parts) or None

    def last_error(self) -> str | None:
        """QEMU's error lines on stderr (the last few, warnings left out), without the program name."""
        try:
            text = self.log_path.read_bytes()[-_LOG_TAIL:].decode(errors="replace")
        except OSError:
            return None
        prefix = f"{Path(self.args[0]).name}: "
        lines = [
            line[len(prefix) :]
            for line in text.splitlines()
            if line.startswith(prefix) and not line.startswith(prefix + "warning:")
        ]
        return "; ".join(lines[-4:]) or None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.proc.pid if self.proc is not None else None,
            "qmp": os.fspath(self.qmp_path),
            "log": os.fspath(self.log_path),
            "status": self.run_state() if self.alive and self.qmp is not None else "exited",
        }

    def detach(self) -> None:
        """Leave QEMU running (the restored guest); drop the QMP connection."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def kill(self) -> None:
        """Stop QEMU (a destination whose migration failed is of no use) and remove its
        private directory (its log's last lines are in the error already)."""
        self.detach()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

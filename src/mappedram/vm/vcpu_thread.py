"""One vCPU run by a background thread, stopped and started only where its state is exact.

Theory of operation:
    * The thread loops on ``KVM_RUN``. At every KVM_EXIT_IO it calls ``on_io(exit)``, which
      returns how long to wait before entering the guest again (the caller's pacing: rate
      limiting), and wakes every :meth:`wait_for` caller.
    * The guest is only ever stopped at an I/O exit. There the OUT is not finished until
      userspace re-enters KVM_RUN, so the thread re-enters once with ``immediate_exit`` set
      (:meth:`KvmVcpu.complete_pending_io`): KVM completes the OUT and returns at once
      without running another instruction. Only then is the vCPU reported paused, and its
      registers read by anyone (any thread may issue the GET ioctls while it is parked).
    * A pacing wait is interruptible: a pause or a stop request cuts it short.
    * ``on_io`` may itself ask for a pause at the exit it handles (:meth:`request_pause`);
      a caller then waits with :meth:`wait_paused`. This is how a guest is run for an
      exact number of batches, whatever the speed of the machine.
    * Any other exit (HLT, SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR, ...) or an exception from
      ``on_io`` ends the thread; the error is kept and re-raised (as a KvmError) by
      :meth:`pause`, :meth:`resume` and :meth:`wait_for`. Asking for what the state does
      not allow (resuming a running vCPU, starting twice) is a UsageError.
    * A pause or stop also kicks the vCPU out of KVM_RUN, as QEMU does (qemu_cpu_kick,
      SIG_IPI): the thread blocks ``SIG_KICK`` for itself and unblocks it only inside
      KVM_RUN (KVM_SET_SIGNAL_MASK), so ``pthread_kill`` makes KVM_RUN return EINTR and the
      signal stays pending until the thread takes it (``sigtimedwait``), never delivered.
      Stopped at an arbitrary instruction the state is the CPU's, exact, but only the VMM
      knows whether its program can be checked there: ``on_kick`` says so (True: pause
      here); otherwise, or without ``on_kick``, the guest runs on to its next I/O exit.
    * How long a pause takes: a kick where ``on_kick`` agrees, else the guest's distance to
      its next I/O exit.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from mappedram.errors import KvmError, UsageError

from .kvm import EXIT_REASONS, KVM_EXIT_INTR, KVM_EXIT_IO, IoExit, KvmVcpu

__all__ = ["VcpuThread", "SIG_KICK"]

#: The signal that kicks a vCPU thread out of KVM_RUN (QEMU's SIG_IPI).
SIG_KICK = signal.SIGUSR1

NEW, RUNNING, PAUSED, STOPPED, FAILED = "new", "running", "paused", "stopped", "failed"


class VcpuThread:
    """Runs ``vcpu`` in a daemon thread; see the module docstring."""

    def __init__(
        self,
        vcpu: KvmVcpu,
        on_io: Callable[[IoExit], float],
        *,
        on_kick: Callable[[], bool] | None = None,
        name: str = "vcpu0",
    ) -> None:
        self.vcpu = vcpu
        self._on_io = on_io
        self._on_kick = on_kick
        self._kicked = False  # a SIG_KICK was sent and not yet taken
        self._armed = False  # the thread blocks SIG_KICK outside KVM_RUN: it may be kicked
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._state = NEW
        self._pause_requested = False
        self._stop_requested = False
        self.error: BaseException | None = None
        self.io_exits = 0
        self.first_entry: float | None = None  # perf_counter() at the first KVM_RUN
        self._resumes = 0  # times the thread left a pause: what resume() waits for

    @property
    def state(self) -> str:
        """``new``, ``running``, ``paused``, ``stopped`` or ``failed``."""
        return self._state

    def start(self) -> None:
        with self._cond:
            if self._state != NEW:
                raise UsageError(f"the vCPU thread was already started (state {self._state})")
            self._state = RUNNING
        self._thread.start()

    def pause(self, timeout: float | None = None) -> None:
        """Stop the guest at its next I/O exit, with that exit's OUT completed; return once stopped."""
        with self._cond:
            self._raise_failure()
            if self._state == PAUSED:
                return
            if self._state != RUNNING:
                raise UsageError(f"cannot pause a vCPU that is {self._state}")
            self._pause_requested = True
            self._cond.notify_all()
            self._kick()
            if not self._cond.wait_for(lambda: self._state != RUNNING, timeout):
                self._pause_requested = False
                raise KvmError(f"the guest reached no I/O exit within {timeout} s, so it could not be paused")
            self._raise_failure()

    def request_pause(self) -> None:
        """Ask for a pause at the current (or next) I/O exit without waiting: for ``on_io``,
        which runs on the vCPU thread, to stop the guest exactly at the exit it is handling."""
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()

    def wait_paused(self, timeout: float | None) -> bool:
        """Wait until the guest is paused (by :meth:`request_pause`); False on timeout."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._state != RUNNING, timeout)
            self._raise_failure()
            if done and self._state != PAUSED:
                raise UsageError(f"the vCPU is {self._state}, not paused")
            return done

    def resume(self) -> None:
        """Let a paused guest run again (returns once the thread has taken the request)."""
        with self._cond:
            self._raise_failure()
            if self._state != PAUSED:
                raise UsageError(f"cannot resume a vCPU that is {self._state}")
            # Wait for the thread to take the request, not for a state: it may run on to an
            # exit that pauses it again (request_pause) before this thread looks.
            taken = self._resumes
            self._pause_requested = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._resumes != taken or self._state in (STOPPED, FAILED))
            self._raise_failure()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` (checked after every I/O exit) holds; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not predicate():
                self._raise_failure()
                if self._state in (STOPPED, NEW):
                    return predicate()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the guest for good at its next I/O exit and join the thread (no error is raised)."""
        with self._cond:
            if self._state == NEW:
                self._state = STOPPED
                return
            self._stop_requested = True
            self._cond.notify_all()
            if self._state == RUNNING:
                self._kick()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise KvmError(f"the vCPU thread did not stop within {timeout} s (the guest makes no I/O exits)")

    def _kick(self) -> None:
        """Interrupt KVM_RUN (the caller holds the lock; the thread is running)."""
        ident = self._thread.ident
        if ident is None or self._kicked or not self._armed:
            return  # before the thread blocks SIG_KICK a kick would kill the process
        self._kicked = True
        try:
            signal.pthread_kill(ident, SIG_KICK)
        except ProcessLookupError:  # the thread has just ended
            pass

    def _take_kick(self) -> None:
        """Consume the pending SIG_KICK, if one was sent (else KVM_RUN would return EINTR at once)."""
        with self._cond:
            kicked, self._kicked = self._kicked, False
        if kicked:
            signal.sigtimedwait([SIG_KICK], 0)

    def _raise_failure(self) -> None:
        if self._state == FAILED and self.error is not None:
            if isinstance(self.error, KvmError):
                raise self.error
            raise KvmError(f"the vCPU thread failed: {self.error!r}") from self.error

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # kept for the caller; the thread only ends
            with self._cond:
                self._armed = False
                self.error = exc
                self._state = FAILED
                self._cond.notify_all()
            return
        with self._cond:
            self._armed = False
            self._state = STOPPED
            self._cond.notify_all()

    def _loop(self) -> None:
        vcpu = self.vcpu
        # reference: kvm_init_cpu_signals (accel/kvm/kvm-all.c)
        outside = signal.pthread_sigmask(signal.SIG_BLOCK, [SIG_KICK])
        vcpu.set_signal_mask(set(outside) - {SIG_KICK})
        with self._cond:
            self._armed = True
        self.first_entry = time.perf_counter()
        while True:
            reason = vcpu.run()
            if reason == KVM_EXIT_INTR:
                self._take_kick()
                with self._cond:
                    stopping = self._pause_requested or self._stop_requested
                    if self._stop_requested:
                        return
                if not stopping or self._on_kick is None or not self._on_kick():
                    continue  # nothing asked, or not a point to pause at: on to the next I/O exit
                if self._park():
                    return
                continue
            if reason != KVM_EXIT_IO:
                details = vcpu.exit_details()
                regs = vcpu.get_regs()
                details["rip"] = hex(regs.rip)
                raise KvmError(
                    f"the guest stopped with {EXIT_REASONS.get(reason, reason)} at rip {regs.rip:#x}",
                    ioctl="KVM_RUN",
                    exit_reason=EXIT_REASONS.get(reason, str(reason)),
                    details=details,
                )
            delay = self._on_io(vcpu.io_exit())
            with self._cond:
                self.io_exits += 1
                self._cond.notify_all()
                deadline = time.monotonic() + delay
                while not (self._pause_requested or self._stop_requested):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                stopping = self._pause_requested or self._stop_requested
            if not stopping:
                continue
            vcpu.complete_pending_io()
            if self._park():
                return

    def _park(self) -> bool:
        """Report the vCPU paused (its state exact) and wait for a resume; True: stop instead."""
        self._take_kick()
        with self._cond:
            if self._stop_requested:
                return True
            self._state = PAUSED
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self._stop_requested)
            if self._stop_requested:
                return True
            self._resumes += 1
            self._state = RUNNING
            self._cond.notify_all()
        return False

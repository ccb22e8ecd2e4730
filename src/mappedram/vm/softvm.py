"""The built-in guest without /dev/kvm: the micro-VM's workload run by a software guest.

:class:`SoftVM` lays out its RAM as :class:`~mappedram.vm.microvm.MicroVM` does (params page,
status page, data region from page ``DATA_FIRST``) and runs the same program, iteration
for iteration, in numpy batches on a thread (:class:`~mappedram.vm.softguest.SoftGuest`):
the fill writes ``FILL_TAG ^ p`` into every qword of the first ``fill_pages`` data pages;
iteration ``i`` writes ``(i, z_i)`` into qwords 0 and 1 of page
``data_first + mulhi(z_i, data_pages)`` with ``z_i = splitmix64(seed + i)``. So the same
verifiers (:func:`~mappedram.vm.guest.expected_ram_check`) prove a restored copy exact.
Its writes are marked in an owner tracker after they land: :meth:`SoftVM.dirty_pages` is
that tracker's sync, as KVM's dirty log is the micro-VM's.

Its "vCPU" is two registers: the iteration counter and the running checksum
(:class:`SoftCpu`, saved as the device section ``mappedram-soft-cpu``).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from mappedram.errors import TruncatedError, UsageError
from mappedram.format.vmstate import DeviceRecord
from mappedram.ops.trackers import OwnerTracker

from .guest import (
    PAGE_SIZE,
    PARAMS_ADDR,
    PHASE_LOOP,
    S_CHECKSUM,
    S_COUNTER,
    S_FILL_DONE,
    S_PHASE,
    STATUS_ADDR,
    STATUS_PAGE,
    GuestCheckReport,
    GuestCpu,
    check_params,
    expected_checksum,
    expected_ram_check,
    guest_pages,
    guest_values,
    make_params,
    read_params,
    write_params,
)
from .softguest import SoftGuest, SoftState

__all__ = ["SoftCpu", "SoftVM", "SOFTCPU_IDSTR"]

SOFTCPU_IDSTR = "mappedram-soft-cpu"


@dataclass(frozen=True, slots=True)
class SoftCpu:
    """The software guest's registers at a pause point: ``be64 counter, be64 checksum``."""

    counter: int
    checksum: int

    _STRUCT: ClassVar[struct.Struct] = struct.Struct(">QQ")
    SIZE: ClassVar[int] = 16
    IDSTR: ClassVar[str] = SOFTCPU_IDSTR
    VERSION: ClassVar[int] = 1

    def encode(self) -> bytes:
        return self._STRUCT.pack(self.counter, self.checksum)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, *, offset: int = 0) -> SoftCpu:
        if len(data) - offset < cls.SIZE:
            raise TruncatedError(
                f"{SOFTCPU_IDSTR} body is cut off",
                offset=offset + (0 if len(data) - offset < 8 else 8),
                field="counter" if len(data) - offset < 8 else "checksum",
                expected=f"{cls.SIZE} bytes",
                actual=f"{max(len(data) - offset, 0)} bytes",
            )
        counter, checksum = cls._STRUCT.unpack_from(data, offset)
        return cls(counter, checksum)

    def record(self) -> DeviceRecord:
        fields = ({"name": "counter", "type": "uint64", "size": 8}, {"name": "checksum", "type": "uint64", "size": 8})
        return DeviceRecord(SOFTCPU_IDSTR, 0, self.VERSION, self.encode(), fields)


class SoftVM:
    """The micro-VM's guest, in software: a :class:`~mappedram.vm.guest.Guest` like
    :class:`~mappedram.vm.microvm.MicroVM`."""

    kind = "software"
    page_size = PAGE_SIZE
    ram_idstr = "pc.ram"

    def __init__(
        self,
        mem_mib: int = 1024,
        *,
        seed: int = 1,
        fill_fraction: float = 0.5,
        rate: float | None = None,
        batch: int = 4096,
        _state: SoftState | None = None,
        memory: mmap.mmap | None = None,
    ) -> None:
        check_params(mem_mib, fill_fraction=fill_fraction, batch=batch, rate=rate)
        self.mem_mib = mem_mib
        self.size = mem_mib << 20
        self.params = make_params(mem_mib, seed=seed, fill_fraction=fill_fraction, batch=batch)
        self._restored = _state is not None
        self._guest = SoftGuest(self.size, self._advance, self._fill, batch=batch, rate=rate, state=_state,
                                memory=memory)  # fmt: skip
        self.memory = self._guest.memory
        self._started = False

    # -- the workload, on the guest's thread

    def _status(self) -> npt.NDArray[np.uint64]:
        status: npt.NDArray[np.uint64] = self._guest.words[STATUS_PAGE]
        return status

    def _fill(self, words: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        p = self.params
        first, stop = p.data_first, p.data_first + p.fill_pages
        words[first:stop] = (np.uint64(p.fill_tag) ^ np.arange(first, stop, dtype=np.uint64))[:, None]
        status = self._status()
        status[S_FILL_DONE // 8] = p.fill_pages
        status[S_PHASE // 8] = PHASE_LOOP
        return np.concatenate((np.arange(first, stop, dtype=np.int64), [STATUS_PAGE]))

    def _advance(
        self, words: npt.NDArray[np.uint64], counter: int, count: int, checksum: int
    ) -> tuple[npt.NDArray[np.int64], int]:
        p = self.params
        z = guest_values(p.seed, counter, counter + count)
        pages = guest_pages(p, counter, counter + count)
        # Repeated pages in one batch: numpy assigns in order, so the last iteration wins, as in the guest.
        words[pages, 0] = np.arange(counter, counter + count, dtype=np.uint64)
        words[pages, 1] = z
        with np.errstate(over="ignore"):
            total = int(np.uint64(checksum) + z.sum(dtype=np.uint64))
        status = self._status()
        status[S_COUNTER // 8] = counter + count
        status[S_CHECKSUM // 8] = total
        return np.append(pages, STATUS_PAGE), total

    def _write_params(self) -> None:
        write_params(self.memory, self.params)
        self._guest.tracker.mark_pages([PARAMS_ADDR // PAGE_SIZE])

    # -- lifecycle (MicroVM's interface)

    def start(self) -> None:
        if self._restored:
            raise UsageError("a VM made by from_state() continues with resume(), not start()")
        if self._started:
            raise UsageError("the VM was already started")
        self._started = True
        self._write_params()
        self._guest.start()

    def wait_filled(self, timeout: float) -> None:
        self._guest.wait_filled(timeout)

    def pause(self, timeout: float = 10.0) -> SoftCpu:
        state = self._guest.pause()
        return SoftCpu(state.counter, state.checksum)

    def resume(self) -> None:
        if not self._started and not self._restored:
            raise UsageError("start() the VM first")
        if not self._started:
            self.adopt_params()  # a restored guest: its parameters came with its RAM
        self._started = True
        self._guest.start()

    def run_until(self, counter: int, timeout: float = 60.0) -> SoftCpu:
        """Run until at least ``counter`` loop iterations are done (the fill first), then pause."""
        if not self._started and not self._restored:
            self._started = True
            self._write_params()
        elif not self._started:
            self.adopt_params()
            self._started = True
        state = self._guest.run_until(counter, timeout)
        return SoftCpu(state.counter, state.checksum)

    def dirty_pages(self) -> npt.NDArray[np.bool_]:
        return self._guest.tracker.sync()

    def dirty_tracker(self) -> OwnerTracker:
        """The guest's own marks (every batch marks its pages after writing them)."""
        return self._guest.tracker

    def set_throttle(self, pct: int) -> None:
        if not 0 <= pct < 100:
            raise UsageError(f"throttle must be 0 .. 99 percent, got {pct}")
        self._guest.throttle = pct

    @property
    def throttle(self) -> int:
        return self._guest.throttle

    def run_seconds(self) -> float:
        return self._guest.ran

    def throttle_seconds(self) -> float:
        """Seconds of throttle sleep asked for so far (a pause cuts one short)."""
        return self._guest.slept

    @property
    def counter(self) -> int:
        return self._guest.state.counter

    @classmethod
    def from_state(cls, cpu: SoftCpu, mem_mib: int, **params: Any) -> SoftVM:
        """A fresh software guest at ``cpu``: fill :attr:`memory` (the restore), then :meth:`resume`.

        The guest's own parameters (seed, fill, batch) are read from the restored params
        page at :meth:`resume`; ``params`` may set ``rate``.
        """
        return cls(mem_mib, rate=params.get("rate"), memory=params.get("memory"),
                   _state=SoftState(cpu.counter, cpu.checksum, True))  # fmt: skip

    def rewind(self, cpu: GuestCpu) -> None:
        """Put the paused guest's registers back to ``cpu`` (its RAM is the caller's to put back)."""
        if not isinstance(cpu, SoftCpu):
            raise UsageError(f"a software guest's state is a SoftCpu, not {type(cpu).__name__}")
        self._guest.set_state(SoftState(cpu.counter, cpu.checksum, True))

    @property
    def first_entry(self) -> float | None:
        """``time.perf_counter()`` when the guest first ran (None: not yet)."""
        return self._guest.first_entry

    def adopt_params(self) -> None:
        """After a restore: take the guest's parameters from its params page."""
        self.params = read_params(self.memory)
        self._guest.batch = self.params.batch

    def check(self, cpu: GuestCpu) -> GuestCheckReport:
        """Registers (counter = status page, checksum = recomputation) and RAM, as check_guest."""
        if not isinstance(cpu, SoftCpu):
            raise UsageError(f"a software guest's state is a SoftCpu, not {type(cpu).__name__}")
        status = self._guest.words[STATUS_ADDR // PAGE_SIZE]
        params = read_params(self.memory)
        return GuestCheckReport(
            counter=cpu.counter,
            status_counter=int(status[S_COUNTER // 8]),
            checksum=cpu.checksum,
            expected_checksum=expected_checksum(params.seed, cpu.counter),
            registers={"counter = status page": cpu.counter == int(status[S_COUNTER // 8])},
            ram=expected_ram_check(self.memory, cpu.counter),
        )

    def close(self) -> None:
        self._guest.close()

    def __enter__(self) -> SoftVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

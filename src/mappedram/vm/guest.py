"""The built-in guest's contract, shared by both guests: its ABI, its parameters, and the oracle.

Both guests (:class:`~mappedram.vm.microvm.MicroVM` on /dev/kvm and
:class:`~mappedram.vm.softvm.SoftVM` in software) run one workload over one RAM layout
and implement one interface, :class:`Guest`; everything here is what they share.

Guest-physical layout (``mem_mib`` MiB from address 0)::

    0x0000  page 0, unused          0x4000  the program (workload.S), up to 16 KiB
    0x1000  GDT                     0x8000  PML4, 0x9000 PDPT, 0xa000.. page directories
    0x2000  params (VMM -> guest)   0x20000 (page 32) on: the data region, to the end of RAM
    0x3000  status (guest -> VMM)

What the guest does (see workload.S; the software guest computes the same in numpy):

1. Fill: data page ``p`` (guest-physical page number) of the first ``fill_pages`` =
   ``int(fill_fraction * data_pages)`` gets ``FILL_TAG ^ p`` in every qword; the rest of
   the data region stays zero. It reports progress every ``FILL_REPORT`` pages
   (``PORT_FILL``) and the end (``PORT_FILLED``).
2. Redirty loop, ``i = 0, 1, 2, ...``: ``z = splitmix64(seed + i)``; page
   ``p = data_first + ((z * data_pages) >> 64)`` (multiply-high: uniform over any number of
   pages); qword 0 of ``p`` = ``i``, qword 1 = ``z``; ``checksum += z`` (mod 2**64).
   Every ``batch`` iterations the counter and the checksum go to the status page and the
   guest exits to its VMM (an OUT to ``PORT_BATCH``): the pause points, where the VMM
   also applies the throttle and the rate limit.

``splitmix64(x)`` is SplitMix64's output function applied to ``x + 0x9e3779b97f4a7c15``.
Everything the guest writes can be recomputed from its parameters and its iteration
counter (:func:`expected_ram_check`), so a restored guest is proved exact.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from mappedram.errors import FormatError, UsageError
from mappedram.format.vmstate import DeviceRecord
from mappedram.ops.trackers import DirtyTracker

__all__ = [
    "Guest",
    "GuestCpu",
    "GuestStatus",
    "GuestParams",
    "RamCheckReport",
    "GuestCheckReport",
    "splitmix64",
    "mulhi",
    "guest_values",
    "guest_pages",
    "pages_written",
    "expected_checksum",
    "expected_ram_check",
    "replay",
    "check_ram",
    "check_params",
    "read_params",
    "write_params",
    "qwords",
    "PAGE_SIZE",
    "DATA_FIRST",
    "STATUS_PAGE",
    "PARAMS_ADDR",
    "STATUS_ADDR",
    "CODE_ADDR",
    "FILL_TAG",
    "ASM_CONSTANTS",
]

PAGE_SIZE = 4096

# Guest-physical layout; the same numbers are .equ constants in workload.S.
GDT_ADDR = 0x1000
PARAMS_ADDR = 0x2000
STATUS_ADDR = 0x3000
CODE_ADDR = 0x4000
CODE_MAX = 0x4000
PML4_ADDR = 0x8000
PDPT_ADDR = 0x9000
PD_ADDR = 0xA000
PD_PAGES_MAX = 16  # page directories: 16 x 1 GiB
DATA_FIRST = 32  # the first page of the data region
STATUS_PAGE = STATUS_ADDR // PAGE_SIZE
MAX_MEM_MIB = PD_PAGES_MAX * 1024

# The params page: little-endian qwords at these offsets.
P_MAGIC, P_VERSION, P_SEED, P_DATA_FIRST, P_DATA_PAGES = 0x00, 0x08, 0x10, 0x18, 0x20
P_FILL_PAGES, P_BATCH, P_FILL_TAG, P_FILL_REPORT = 0x28, 0x30, 0x38, 0x40
PARAMS_MAGIC = int.from_bytes(b"MRVMPARM", "little")
PARAMS_VERSION = 1

# The status page, written by the guest.
S_COUNTER, S_CHECKSUM, S_FILL_DONE, S_PHASE = 0x00, 0x08, 0x10, 0x18
PHASE_FILL, PHASE_LOOP = 1, 2

PORT_BATCH, PORT_FILL, PORT_FILLED = 0xF0, 0xF1, 0xF2

FILL_TAG = 0x46494C4C00000000  # "FILL" in the high half; the page number in the low half
FILL_REPORT = 4096  # pages between two fill progress exits
MAX_BATCH = 1 << 24

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

#: The constants workload.S defines, by their names there.
ASM_CONSTANTS = {
    "PARAMS": PARAMS_ADDR, "STATUS": STATUS_ADDR, "CODE": CODE_ADDR,
    "P_SEED": P_SEED, "P_DATA_FIRST": P_DATA_FIRST, "P_DATA_PAGES": P_DATA_PAGES,
    "P_FILL_PAGES": P_FILL_PAGES, "P_BATCH": P_BATCH, "P_FILL_TAG": P_FILL_TAG, "P_FILL_REPORT": P_FILL_REPORT,
    "S_COUNTER": S_COUNTER, "S_CHECKSUM": S_CHECKSUM, "S_FILL_DONE": S_FILL_DONE, "S_PHASE": S_PHASE,
    "PHASE_FILL": PHASE_FILL, "PHASE_LOOP": PHASE_LOOP,
    "PORT_BATCH": PORT_BATCH, "PORT_FILL": PORT_FILL, "PORT_FILLED": PORT_FILLED,
    "GAMMA": GAMMA, "MIX1": MIX1, "MIX2": MIX2,
}  # fmt: skip

_ITER_CHUNK = 1 << 16  # iterations recomputed at a time (small enough for the arrays to stay in cache)
_PAGE_CHUNK = 4096  # pages compared at a time (16 MiB)

U64 = npt.NDArray[np.uint64]



# ---------------------------------------------------------------------------------------------
# What the guest computes, recomputed in numpy


def splitmix64(x: U64) -> U64:
    """The guest's hash, elementwise: SplitMix64's output function of ``x + 0x9e3779b97f4a7c15``."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        return z ^ (z >> np.uint64(31))


def mulhi(z: U64, n: int) -> U64:
    """``(z * n) >> 64`` for ``n < 2**32``, exactly, in 64-bit lanes."""
    nn = np.uint64(n)
    lo = (z & np.uint64(0xFFFFFFFF)) * nn >> np.uint64(32)
    return ((z >> np.uint64(32)) * nn + lo) >> np.uint64(32)


def guest_values(seed: int, start: int, stop: int) -> U64:
    """``z`` of iterations ``start .. stop - 1``."""
    with np.errstate(over="ignore"):
        i = np.arange(start, stop, dtype=np.uint64)
        return splitmix64(i + np.uint64(seed & (2**64 - 1)))


@dataclass(frozen=True, slots=True)
class GuestParams:
    """The params page: what the guest was told (read back from a VM's memory)."""

    seed: int
    data_first: int
    data_pages: int
    fill_pages: int
    batch: int
    fill_tag: int
    fill_report: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_params(memory: Any) -> GuestParams:
    """The params page of a micro-VM's RAM (a live VM's, or a restored copy)."""
    words = qwords(memory, PARAMS_ADDR, PAGE_SIZE // 8)
    if int(words[P_MAGIC // 8]) != PARAMS_MAGIC or int(words[P_VERSION // 8]) != PARAMS_VERSION:
        raise FormatError(
            "this memory holds no micro-VM params page",
            offset=PARAMS_ADDR,
            field="params.magic",
            expected=f"{PARAMS_MAGIC:#x} version {PARAMS_VERSION}",
            actual=f"{int(words[0]):#x} version {int(words[1])}",
        )
    return GuestParams(
        seed=int(words[P_SEED // 8]),
        data_first=int(words[P_DATA_FIRST // 8]),
        data_pages=int(words[P_DATA_PAGES // 8]),
        fill_pages=int(words[P_FILL_PAGES // 8]),
        batch=int(words[P_BATCH // 8]),
        fill_tag=int(words[P_FILL_TAG // 8]),
        fill_report=int(words[P_FILL_REPORT // 8]),
    )


def guest_pages(params: GuestParams, start: int, stop: int) -> npt.NDArray[np.int64]:
    """The page (guest-physical page number) iterations ``start .. stop - 1`` write."""
    z = guest_values(params.seed, start, stop)
    return mulhi(z, params.data_pages).astype(np.int64) + params.data_first


def pages_written(memory: Any, start: int, stop: int) -> npt.NDArray[np.bool_]:
    """One bool per page of ``memory``: written by loop iterations ``start .. stop - 1``.

    The status page, which the guest also writes at every batch boundary, is not included.
    """
    params = read_params(memory)
    out = np.zeros(len(memoryview(memory).cast("B")) // PAGE_SIZE, dtype=bool)
    for first in range(start, stop, _ITER_CHUNK):
        out[guest_pages(params, first, min(stop, first + _ITER_CHUNK))] = True
    return out


def expected_checksum(seed: int, counter: int) -> int:
    """The guest's checksum after ``counter`` iterations: the sum of their ``z``, mod 2**64."""
    total = np.uint64(0)
    for first in range(0, counter, _ITER_CHUNK):
        with np.errstate(over="ignore"):
            total = total + guest_values(seed, first, min(counter, first + _ITER_CHUNK)).sum(dtype=np.uint64)
    return int(total)


@dataclass(frozen=True, slots=True)
class RamCheckReport:
    """What :func:`expected_ram_check` found: every data page compared with its recomputation."""

    counter: int
    data_first: int
    data_pages: int
    fill_pages: int
    fill_done: int
    pages_checked: int
    pages_hit: int
    mismatches: int
    first_bad_page: int | None
    first_bad: dict[str, Any] | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.pages_checked == self.data_pages

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def expected_ram_check(memory: Any, counter: int) -> RamCheckReport:
    """Check every data page of a micro-VM's RAM against the guest's program after ``counter`` iterations.

    ``memory`` is the guest RAM (a live VM's ``memory`` while it is paused, or a restored
    copy); ``counter`` the iterations done (register r8 of the paused vCPU). The params
    and the fill progress are read from the params and status pages. Page ``p`` must hold,
    in every qword, ``FILL_TAG ^ p`` if the fill reached it and 0 otherwise, except that
    qwords 0 and 1 of a page the loop wrote hold ``(i, z_i)`` of the last iteration ``i``
    that wrote it. The last writer of each page is recomputed in chunks of iterations.
    """
    started = time.perf_counter()
    params = read_params(memory)
    status = qwords(memory, STATUS_ADDR, 4)
    fill_done = int(status[S_FILL_DONE // 8])
    if counter and fill_done != params.fill_pages:
        raise UsageError(
            f"the loop ran {counter} iterations, yet the fill covers {fill_done} of {params.fill_pages} pages"
        )
    return check_ram(memory, params, fill_done, counter, replay(params, counter)[0], started)


def replay(params: GuestParams, counter: int) -> tuple[npt.NDArray[np.int64], int]:
    """One pass over iterations ``0 .. counter - 1``: the last iteration that wrote each data
    page (-1: none), and the checksum."""
    last = np.full(params.data_pages, -1, dtype=np.int64)
    checksum = np.uint64(0)
    nn = np.uint64(params.data_pages)
    for first in range(0, counter, _ITER_CHUNK):
        stop = min(counter, first + _ITER_CHUNK)
        z = guest_values(params.seed, first, stop)
        with np.errstate(over="ignore"):
            checksum = checksum + z.sum(dtype=np.uint64)
        # maximum.at resolves pages written more than once by value: the last iteration wins
        np.maximum.at(last, mulhi(z, int(nn)).astype(np.int64), np.arange(first, stop, dtype=np.int64))
    return last, int(checksum)


def check_ram(
    memory: Any, params: GuestParams, fill_done: int, counter: int, last: npt.NDArray[np.int64], started: float
) -> RamCheckReport:
    words = qwords(memory, 0, None)
    pages = words.reshape(-1, PAGE_SIZE // 8)
    if pages.shape[0] < params.data_first + params.data_pages:
        needed = params.data_first + params.data_pages
        raise UsageError(f"memory of {pages.shape[0]} pages is smaller than the guest's {needed}")
    mismatches, first_bad_page, first_bad = 0, None, None
    for lo in range(0, params.data_pages, _PAGE_CHUNK):
        hi = min(params.data_pages, lo + _PAGE_CHUNK)
        page_no = np.arange(params.data_first + lo, params.data_first + hi, dtype=np.uint64)
        filled = page_no < np.uint64(params.data_first + fill_done)
        fill = np.where(filled, np.uint64(params.fill_tag) ^ page_no, np.uint64(0))
        hit_i = last[lo:hi]
        hit = hit_i >= 0
        q0 = fill.copy()
        q1 = fill.copy()
        q0[hit] = hit_i[hit].astype(np.uint64)
        q1[hit] = splitmix64(hit_i[hit].astype(np.uint64) + np.uint64(params.seed))
        block = pages[params.data_first + lo : params.data_first + hi]
        bad = (block[:, 0] != q0) | (block[:, 1] != q1) | (block[:, 2:] != fill[:, None]).any(axis=1)
        count = int(bad.sum())
        if count and first_bad_page is None:
            k = int(np.flatnonzero(bad)[0])
            first_bad_page = params.data_first + lo + k
            first_bad = {
                "page": first_bad_page,
                "expected_qword0": int(q0[k]),
                "found_qword0": int(block[k, 0]),
                "expected_qword1": int(q1[k]),
                "found_qword1": int(block[k, 1]),
                "expected_fill": int(fill[k]),
                "qwords_not_fill": int((block[k, 2:] != fill[k]).sum()),
                "last_iteration": int(hit_i[k]),
            }
        mismatches += count
    return RamCheckReport(
        counter=counter,
        data_first=params.data_first,
        data_pages=params.data_pages,
        fill_pages=params.fill_pages,
        fill_done=fill_done,
        pages_checked=params.data_pages,
        pages_hit=int((last >= 0).sum()),
        mismatches=mismatches,
        first_bad_page=first_bad_page,
        first_bad=first_bad,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True, slots=True)
class GuestCheckReport:
    """A paused guest's registers and RAM against the recomputation (:func:`check_guest`)."""

    counter: int
    status_counter: int
    checksum: int
    expected_checksum: int
    registers: dict[str, bool]
    ram: RamCheckReport
    unreported: int = 0  # iterations of the current batch done, not yet on the status page

    @property
    def ok(self) -> bool:
        return (
            self.counter - self.unreported == self.status_counter
            and self.checksum == self.expected_checksum
            and all(self.registers.values())
            and self.ram.ok
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "counter": self.counter,
            "status_counter": self.status_counter,
            "unreported": self.unreported,
            "checksum": self.checksum,
            "expected_checksum": self.expected_checksum,
            "registers": dict(self.registers),
            "ram": self.ram.to_dict(),
            "ok": self.ok,
        }


def qwords(memory: Any, offset: int, count: int | None) -> U64:
    raw = np.frombuffer(memory, dtype=np.uint8)
    if count is None:
        return raw[offset : offset + (len(raw) - offset) // 8 * 8].view(np.uint64)
    return raw[offset : offset + 8 * count].view(np.uint64)


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """The guest as the VMM sees it (from the status page and the vCPU thread)."""

    counter: int  # iterations done, as of the last batch report
    checksum: int  # the checksum at that report
    phase: str  # "not started", "fill" or "loop"
    fill_done: int  # data pages filled so far
    fill_pages: int
    iterations_per_second: float  # measured over the last half second or so of running
    state: str  # the vCPU thread: new, running, paused, stopped, failed
    io_exits: int
    running: bool
    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_params(mem_mib: int, *, fill_fraction: float, batch: int, rate: float | None) -> None:
    """Raise UsageError unless the guest's parameters are in range (MicroVM's and SoftVM's)."""
    if not 1 <= mem_mib <= MAX_MEM_MIB:
        raise UsageError(f"mem_mib must be 1 .. {MAX_MEM_MIB}, got {mem_mib}")
    if not 0.0 <= fill_fraction <= 1.0:
        raise UsageError(f"fill_fraction must be within 0 .. 1, got {fill_fraction}")
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"batch must be 1 .. {MAX_BATCH}, got {batch}")
    if rate is not None and not rate > 0:
        raise UsageError(f"rate must be positive (or None), got {rate}")


def write_params(memory: Any, params: GuestParams) -> None:
    """Write the params page the guest reads at its start."""
    words = qwords(memory, PARAMS_ADDR, PAGE_SIZE // 8)
    for at, value in (
        (P_MAGIC, PARAMS_MAGIC), (P_VERSION, PARAMS_VERSION), (P_SEED, params.seed),
        (P_DATA_FIRST, params.data_first), (P_DATA_PAGES, params.data_pages), (P_FILL_PAGES, params.fill_pages),
        (P_BATCH, params.batch), (P_FILL_TAG, params.fill_tag), (P_FILL_REPORT, params.fill_report),
    ):  # fmt: skip
        words[at // 8] = value


def make_params(mem_mib: int, *, seed: int, fill_fraction: float, batch: int) -> GuestParams:
    """The parameters of a new guest of ``mem_mib`` MiB."""
    data_pages = (mem_mib << 20) // PAGE_SIZE - DATA_FIRST
    return GuestParams(
        seed=seed & (2**64 - 1),
        data_first=DATA_FIRST,
        data_pages=data_pages,
        fill_pages=int(fill_fraction * data_pages),
        batch=batch,
        fill_tag=FILL_TAG,
        fill_report=FILL_REPORT,
    )


class GuestCpu(Protocol):
    """A guest's vCPU state at a pause point, as its device section carries it."""

    @property
    def counter(self) -> int:
        """Loop iterations done at this pause point."""
        ...

    def record(self) -> DeviceRecord:
        """The state as the FULL device section a file carries (with its vmdesc fields)."""
        ...


class Guest(Protocol):
    """What the vm operations need of a built-in guest; :class:`~mappedram.vm.microvm.MicroVM`
    and :class:`~mappedram.vm.softvm.SoftVM` implement it.

    A guest is controlled only at its pause points (batch boundaries), so every state it
    is observed in is exact. Tests and the operations drive it step by step with
    :meth:`run_until`; :meth:`resume` lets it run freely.
    """

    kind: str  # "kvm" or "software"
    params: GuestParams  # for a restored guest: read from its RAM once it runs
    page_size: int
    ram_idstr: str
    mem_mib: int

    @property
    def memory(self) -> Any:
        """The guest's RAM (a writable buffer of ``mem_mib`` MiB)."""
        ...

    def start(self) -> None:
        """Write the program and params into RAM and run it freely."""
        ...

    def wait_filled(self, timeout: float) -> None:
        """Return once the fill is over (the guest is in its loop)."""
        ...

    def run_until(self, counter: int, timeout: float = 60.0) -> GuestCpu:
        """Run (start or resume) until the first pause point with at least ``counter`` loop
        iterations done (the fill done), pause there and return the state."""
        ...

    def pause(self, timeout: float = 10.0) -> GuestCpu:
        """Stop at the next pause point; return the exact state."""
        ...

    def resume(self) -> None:
        """Run freely again (or start a guest restored with ``from_state``)."""
        ...

    def dirty_tracker(self) -> DirtyTracker:
        """A tracker of the pages the guest writes from now on (turns logging on)."""
        ...

    def dirty_pages(self) -> Any:
        """One bool per page: written by the guest since the last call (clears the log)."""
        ...

    def rewind(self, cpu: GuestCpu) -> None:
        """Put the paused guest's vCPU back to ``cpu`` (its RAM is the caller's to put back)."""
        ...

    @property
    def first_entry(self) -> float | None:
        """``time.perf_counter()`` when the guest first ran (None: not yet)."""
        ...

    def set_throttle(self, pct: int) -> None:
        """Sleep ``pct / (100 - pct)`` of each batch's run time (auto-converge)."""
        ...

    def run_seconds(self) -> float:
        """Seconds the guest has run (its throttle sleeps and pauses excluded)."""
        ...

    def throttle_seconds(self) -> float:
        """Seconds of throttle sleep asked for so far."""
        ...

    @property
    def throttle(self) -> int:
        """The throttle in force, in percent."""
        ...

    def check(self, cpu: GuestCpu) -> GuestCheckReport:
        """The paused guest's registers and RAM against the recomputation."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Guest: ...

    def __exit__(self, *exc: object) -> None: ...

"""A worker's table of live calls in shared memory (`core.call_table` is the
layout; docs/WORKERS.md "The call table").

The supervisor makes each worker's table (`make_table`: a memfd, not a file
under /dev/shm: it has no name to collide or to leave behind when the
supervisor dies, goes away with its last fd, and passes like the listeners:
`pass_fds` to the worker, kept inheritable over an upgrade's exec). The
worker maps it (`CallTableWriter`) and writes its calls with plain stores;
the supervisor reads it once the worker is dead (`read_table_fd`).
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any

from fleet_ingress.core import call_table
from fleet_ingress.core.call_table import Slots

CALL_TABLE_ENV = "INGRESS_CALL_TABLE_FD"  # the worker's fd of its table
TABLE_NAME = "fleet-ingress worker calls"  # its memfd's (/proc/PID/fd: "/memfd:NAME (deleted)")


def make_table(count: int = call_table.COUNT) -> int:
    """A new table's fd (close-on-exec: passed on by `pass_fds` or made
    inheritable for an exec), sized and headed, every record FREE."""
    fd = os.memfd_create(TABLE_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, call_table.table_size(count))
        os.pwrite(fd, call_table.header(count), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def taken_over(fd: Any) -> int | None:
    """`fd` as the state an exec carried says it (`service.upgrade_sequence`):
    the table of a worker of the previous image, now this image's (not
    inherited by what it starts), or None when it is none: that worker's
    calls are then those the supervisor hears of. An fd the exec carried
    that is no table this release reads (records of a size it does not
    know, a memfd not a table) is closed: nothing would read or close it
    later. A number that names no fd open here (another release's state),
    or one not a memfd (a socket this image adopted under that number), is
    left alone."""
    if type(fd) is not int or fd < 0:
        return None
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{TABLE_NAME} "):
            return None
        head = os.pread(fd, call_table.HEADER_SIZE, 0)
    except OSError:
        return None
    try:
        call_table.layout_of(head)
        os.set_inheritable(fd, False)
    except (OSError, ValueError):
        os.close(fd)
        return None
    return fd


def handed_over(fd: int, reads: frozenset[int] | None) -> bool:
    """Whether table `fd` goes over an upgrade's exec to code that reads
    tables of the record sizes `reads` (as its trial run said them; None:
    not said, as before the trial said them: every table goes). One it
    cannot read stays close-on-exec: the exec closes it."""
    if reads is None:
        return True
    try:
        return call_table.layout_of(os.pread(fd, call_table.HEADER_SIZE, 0)).record_size in reads
    except (OSError, ValueError):
        return False


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges of `fd` that hold data ([start, end), by SEEK_DATA and
    SEEK_HOLE): the rest is holes, never written. None when the file system
    cannot say (every byte may then hold data)."""
    extents: list[tuple[int, int]] = []
    at = 0
    try:
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from `at` on
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            at = end
    except OSError:
        return None
    return extents


def read_table_fd(fd: int) -> dict[int, tuple[int, dict[str, Any]]]:
    """What table `fd` holds (`core.call_table.read_table`); ValueError or
    OSError when it cannot be read. Only the pages the worker wrote are
    read: a read of a hole through the mapping would allocate it (shared
    memory's pages are made on any fault), 8 MiB for a whole table, in the
    supervisor's memory, at a worker's death (an OOM kill among them)."""
    size = os.fstat(fd).st_size
    if size < call_table.HEADER_SIZE:
        raise ValueError(f"call table of {size} bytes: shorter than its header")
    extents = data_extents(fd, size)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
        count, layout = call_table.read_header(mapped)
        if extents is None:
            return call_table.read_table(mapped)
        written = call_table.records_written(count, extents, layout.record_size)
        return call_table.read_table(mapped, written)


class CallTableWriter:
    """A worker's end: a record per lease whose call it knows, written as
    the call is asked for, granted, answered and ended. No system call."""

    __slots__ = ("_buf", "_map", "_records", "_slots")

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = memoryview(self._map)
        count, layout = call_table.read_header(self._buf)
        if layout is not call_table.WRITTEN:  # a supervisor of another release's
            self._buf.release()
            self._map.close()
            raise call_table.TableOfAnotherRelease(
                f"call table records of {layout.record_size} bytes: this release writes "
                f"{call_table.RECORD_SIZE}"
            )
        self._slots = Slots(count)
        self._records: dict[int, int] = {}  # lease -> record index

    @classmethod
    def from_env(cls) -> CallTableWriter | None:
        """The table CALL_TABLE_ENV names (its fd closed once mapped), None
        without one (a supervisor of an older release) or when it cannot be
        mapped (then calls are told the supervisor as before)."""
        said = os.environ.pop(CALL_TABLE_ENV, None)
        if not said:
            return None
        fd = int(said)
        try:
            return cls(fd)
        finally:
            os.close(fd)

    def open(self, lease: int, call: dict[str, Any], fleet: str | None) -> bool:
        """Record lease `lease` of `call` live; False when the table is full."""
        index = self._slots.take()
        if index is None:
            return False
        call_table.write_live(self._buf, index, lease, call, fleet)
        self._records[lease] = index
        return True

    def granted(self, lease: int, fleet: str) -> None:
        if (index := self._records.get(lease)) is not None:
            call_table.write_fleet(self._buf, index, fleet)

    def answered(self, lease: int, at: float) -> None:
        if (index := self._records.get(lease)) is not None:
            call_table.write_answered(self._buf, index, at)

    def logged(self, lease: int) -> bool:
        """Its access line is written: ENDED (the record is kept until the
        lease is over). Whether the lease has a record."""
        if (index := self._records.get(lease)) is None:
            return False
        call_table.write_ended(self._buf, index)
        return True

    def has(self, lease: int) -> bool:
        """Whether lease `lease` has a record (`over` writes it ENDED)."""
        return lease in self._records

    def over(self, lease: int) -> bool:
        """Lease `lease` is given back: ENDED and its record free again.
        Whether it had one."""
        index = self._records.pop(lease, None)
        if index is None:
            return False
        call_table.write_ended(self._buf, index)
        self._slots.give_back(index)
        return True

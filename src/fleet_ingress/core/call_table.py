"""The layout of a worker's table of live calls (docs/WORKERS.md "The call table").

A worker writes who each of its calls is into shared memory the supervisor
made for it (`net.call_table_map`), with plain memory writes, no system
call: when the supervisor sees the worker die it reads the table and knows
every call the worker had live, whatever of its `acquire`, `logged` and
`release` messages reached it. So those may be held (`ANSWERS_FLUSH`) with
no call lost unnamed, and no line written twice (SPEC 13).

A table is a header (MAGIC, its records' size, their count) and COUNT
records of RECORD_SIZE bytes (1 KiB, `WRITTEN`); a supervisor reads the
tables of every layout in LAYOUTS (session 44's 2 KiB records too: an
upgrade carries the previous image's workers' tables), refuses a size it
does not know (ValueError says which). A record's
first byte says what it is: FREE (never used, or being rewritten), LIVE
(its call is on), ENDED (its call's access line is written, or its lease
given back). A worker rewriting a record sets FREE first, writes the rest,
and LIVE last: killed half way (SIGKILL lands between any two stores, each
store done stays in the shared page), the record reads FREE, absent; never
a mix of two calls. A later change is one field and its flag, the flag
written last (the fleet's length after its name; ANSWERED after the 101's
time). Text is bounded by bytes (`TEXT_BYTES`), in Latin-1 (a byte a
character: the request path is read so) or else in UTF-8 cut at a
character.

This module only encodes and decodes bytes (I/O-free); `Slots` chooses a
free record.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

MAGIC = b"FICALLT1"
HEADER = struct.Struct("<8sII")  # magic, record size, record count
HEADER_SIZE = 64
# Records in a worker's table: more live calls than a 2-core host carries a
# worker (bench/README: a few hundred); past it a call is told the
# supervisor as before (its acquire and logged not held). The memory is
# touched only where records are written: 4 MiB of address space, 1 KiB a
# call at the worker's peak of live calls (four records a page).
COUNT = 4096

FREE, LIVE, ENDED = 0, 1, 2

# The text fields, in their order in a record (each layout's byte budgets
# below).
TEXT_FIELDS = ("call_id", "call", "started", "client_ip", "route", "bot_id", "fleet")
_NONE = 0xFFFF  # a text field's length: the call said null
_INT = 0x8000  # a text field's length with this bit: an integer, in decimal
_UTF8 = 0x4000  # with this bit: UTF-8 text (without: the layout's `plain` encoding)

# state, answered, lease, started_at, started_monotonic, answered_monotonic,
# then each text field's length (the fleet's last): the same in every layout.
_FIXED = struct.Struct("<BB6xQddd7H")
_TEXT_AT = 64
_FLEET_LEN_AT = _FIXED.size - 2
_ANSWERED_AT = 1
_ANSWERED_TIME_AT = 32


class Layout(NamedTuple):
    """Records of one size: each text field's bytes, in that order, and the
    encoding of a text whose length has no _UTF8 bit."""

    record_size: int
    text_bytes: tuple[int, ...]
    plain: str
    record: struct.Struct
    fleet_at: int  # the fleet's text, from a record's start


def _layout(record_size: int, text_bytes: tuple[int, ...], plain: str) -> Layout:
    record = struct.Struct(
        f"<BB6xQddd7H{_TEXT_AT - _FIXED.size}x" + "".join(f"{n}s" for n in text_bytes)
    )
    assert len(text_bytes) == len(TEXT_FIELDS) and record.size <= record_size
    return Layout(record_size, text_bytes, plain, record, _TEXT_AT + sum(text_bytes[:-1]))


# Session 44's records (2 KiB, text in UTF-8): read, never written, by this
# release; its supervisor carries the tables of the workers of the one before
# over an upgrade's exec (`call_table_fd`), and one of them may die after it.
LAYOUT_2K = _layout(2048, (64, 128, 32, 64, 512, 1024, 128), "utf-8")
# This release's (1 KiB). `core.lost_calls` keeps 256 characters of each text
# (`_MAX_TEXT`): the route (a call prefix the path matched) and the bot id
# (the path's rest, net.calls LOGGED_BOT_ID) are the request path's bytes
# decoded as Latin-1 (`core.call_machine`), so in Latin-1, a byte a
# character, 256 bytes hold 256 characters, as in the line. The fleet's name
# is ASCII of at most 259 characters (config.fleets_file MAX_NAME), the line
# uncut: 260 bytes hold it whole. The rest are short ASCII (a call id's
# digits, `PID-N-TAG`, a second in ISO 8601, an IP address with its zone).
# A text not in Latin-1 (no request path makes one) is kept in UTF-8, cut
# at a character to the same bytes.
LAYOUT_1K = _layout(1024, (32, 64, 24, 64, 256, 256, 260), "latin-1")
LAYOUTS = {layout.record_size: layout for layout in (LAYOUT_2K, LAYOUT_1K)}
# The records this release writes.
WRITTEN = LAYOUT_1K
RECORD_SIZE = WRITTEN.record_size
TEXT_BYTES = WRITTEN.text_bytes
assert TEXT_BYTES == (32, 64, 24, 64, 256, 256, 260)  # as `write_live` spells them
_RECORD = WRITTEN.record
_FLEET_AT = WRITTEN.fleet_at
_NAN = math.nan
_U16, _F64 = struct.Struct("<H"), struct.Struct("<d")


def table_size(count: int = COUNT, record_size: int = RECORD_SIZE) -> int:
    return HEADER_SIZE + count * record_size


def header(count: int = COUNT) -> bytes:
    return HEADER.pack(MAGIC, RECORD_SIZE, count).ljust(HEADER_SIZE, b"\0")


class TableOfAnotherRelease(ValueError):
    """A well-formed table whose records are not this release's to write or
    read: made by a supervisor of another release (expected across an
    upgrade or a downgrade), not a fault of this one."""


def layout_of(data: bytes | memoryview) -> Layout:
    """The layout of the records a table's header (its first HEADER_SIZE
    bytes) says, or ValueError naming what is wrong: a record size this
    release does not know (a newer release's table) among it."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"call table of {len(data)} bytes: shorter than its header")
    magic, size, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"call table header {bytes(magic)!r}: not {MAGIC!r}")
    layout = LAYOUTS.get(size)
    if layout is None:
        known = " or ".join(str(n) for n in sorted(LAYOUTS))
        raise TableOfAnotherRelease(
            f"call table records of {size} bytes: this release reads records of {known} "
            "bytes (a table of a newer release?)"
        )
    return layout


def read_header(data: bytes | memoryview) -> tuple[int, Layout]:
    """The record count a table's header says and its records' layout, or
    ValueError naming what is wrong (`layout_of`; a table shorter than its
    records)."""
    layout = layout_of(data)
    _, size, count = HEADER.unpack_from(data)
    if len(data) < table_size(count, size):
        raise ValueError(
            f"call table of {len(data)} bytes: {count} records of {size} need "
            f"{table_size(count, size)}"
        )
    return int(count), layout


def _text(value: Any, most: int) -> tuple[int, bytes]:
    if type(value) is str:
        if value.isascii():  # most text: str.encode's fast path, no codec named
            data = value.encode()
        else:
            try:
                data = value.encode("latin-1")
            except UnicodeEncodeError:
                return _utf8(value, most)
        return (len(data), data) if len(data) <= most else (most, data[:most])
    if type(value) is int:  # a call's id: a number, kept one
        data = str(value).encode()
        return (len(data) | _INT, data) if len(data) <= most else (_NONE, b"")
    if isinstance(value, str):  # a str subclass: as its text
        return _text(str(value), most)
    return _NONE, b""


def _utf8(value: str, most: int) -> tuple[int, bytes]:
    """A text not in Latin-1, in UTF-8 cut at a character to `most` bytes."""
    try:
        data = value.encode()
    except UnicodeEncodeError:  # a lone surrogate: replaced, as a log line does
        data = value.encode("utf-8", "replace")
    if len(data) > most:
        data = data[:most].decode("utf-8", "ignore").encode()
    return len(data) | _UTF8, data


def _number(value: Any) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    return _NAN


def record_offset(index: int, record_size: int = RECORD_SIZE) -> int:
    return HEADER_SIZE + index * record_size


def write_live(
    buf: memoryview | bytearray, index: int, lease: int, call: dict[str, Any], fleet: str | None
) -> None:
    """Write the record of lease `lease` (its call as `Call.described` says
    it; `fleet` where granted) at `index`: FREE first, LIVE last."""
    at = HEADER_SIZE + index * RECORD_SIZE
    buf[at] = FREE
    get = call.get
    # One by one, not a loop: a churned call's every grant runs this.
    a = _text(get("call_id"), 32)
    b = _text(get("call"), 64)
    c = _text(get("started"), 24)
    d = _text(get("client_ip"), 64)
    e = _text(get("route"), 256)
    f = _text(get("bot_id"), 256)
    g = _text(fleet, 260)
    _RECORD.pack_into(
        buf,
        at,
        FREE,
        0,
        lease,
        _number(get("started_at")),
        _number(get("started_monotonic")),
        _NAN,
        a[0], b[0], c[0], d[0], e[0], f[0], g[0],
        a[1], b[1], c[1], d[1], e[1], f[1], g[1],
    )  # fmt: skip
    buf[at] = LIVE


def write_fleet(buf: memoryview | bytearray, index: int, fleet: str) -> None:
    """The fleet record `index`'s call was granted on: its name, then its length."""
    at = record_offset(index)
    n, data = _text(fleet, TEXT_BYTES[-1])
    buf[at + _FLEET_AT : at + _FLEET_AT + len(data)] = data
    _U16.pack_into(buf, at + _FLEET_LEN_AT, n)


def write_answered(buf: memoryview | bytearray, index: int, at_monotonic: float) -> None:
    """Its fleet answered 101 at `at_monotonic`: the time, then the flag."""
    at = record_offset(index)
    _F64.pack_into(buf, at + _ANSWERED_TIME_AT, at_monotonic)
    buf[at + _ANSWERED_AT] = 1


def write_ended(buf: memoryview | bytearray, index: int) -> None:
    buf[record_offset(index)] = ENDED


def _read_text(n: int, data: bytes, most: int, plain: str) -> str | int | None:
    if n == _NONE:
        return None
    if n & _INT:
        n &= ~_INT
        digits = data[:n]
        return int(digits) if n <= most and digits.isdigit() else None
    encoding = plain
    if n & _UTF8:
        n &= ~_UTF8
        encoding = "utf-8"
    return None if n > most else data[:n].decode(encoding, "replace")


def read_record(
    buf: bytes | memoryview, index: int, layout: Layout = WRITTEN
) -> tuple[int, int, dict[str, Any]] | None:
    """(state, lease, call) of record `index` of a table of `layout`; None
    when FREE. `call` has the keys `core.lost_calls.lost_call_record` reads
    ("status" 101 and "answered_monotonic" once answered)."""
    at = record_offset(index, layout.record_size)
    if buf[at] == FREE:
        return None
    state, answered, lease, started_at, started_mono, answered_mono, *rest = (
        layout.record.unpack_from(buf, at)
    )
    lengths, texts = rest[: len(TEXT_FIELDS)], rest[len(TEXT_FIELDS) :]
    plain = layout.plain
    call: dict[str, Any] = {
        name: _read_text(n, data, most, plain)
        for name, most, n, data in zip(TEXT_FIELDS, layout.text_bytes, lengths, texts, strict=True)
    }
    if not math.isnan(started_at):
        call["started_at"] = started_at
    if not math.isnan(started_mono):
        call["started_monotonic"] = started_mono
    if answered == 1 and not math.isnan(answered_mono):
        call["status"] = 101
        call["answered_monotonic"] = answered_mono
    return state, lease, call


def records_written(
    count: int, extents: Iterable[tuple[int, int]], record_size: int = RECORD_SIZE
) -> Iterator[int]:
    """The records (of `record_size` bytes) of a table of `count` whose state
    byte lies in one of `extents` ([start, end) byte ranges of the table that
    hold data, in order): every other one reads FREE (a hole in shared
    memory reads as zeros), so it need not be read at all."""
    last = -1
    for start, end in extents:
        first = max(last + 1, -(-(start - HEADER_SIZE) // record_size), 0)
        for index in range(first, count):
            if record_offset(index, record_size) >= end:
                break
            last = index
            yield index


def read_table(
    buf: bytes | memoryview, indices: Iterable[int] | None = None
) -> dict[int, tuple[int, dict[str, Any]]]:
    """Every record not FREE, by lease: (LIVE or ENDED, its call), of a
    table of any layout this release knows (`LAYOUTS`, the header says
    which). ValueError for a table it cannot read (`read_header`).
    `indices`: the records that may be written (`records_written`), the
    others known FREE and not looked at (None: every one)."""
    count, layout = read_header(buf)
    found: dict[int, tuple[int, dict[str, Any]]] = {}
    for index in range(count) if indices is None else indices:
        if not 0 <= index < count:
            continue
        record = read_record(buf, index, layout)
        if record is None:
            continue
        state, lease, call = record
        if state not in (LIVE, ENDED):
            continue  # not a state this layout writes: nothing to trust
        if state == LIVE or lease not in found:
            found[lease] = (state, call)
    return found


class Slots:
    """Which record a worker writes next: a free one, the most recently freed
    first (its page is likely touched already); None when all are taken."""

    __slots__ = ("_free", "_next", "count")

    def __init__(self, count: int = COUNT) -> None:
        self.count = count
        self._next = 0  # records from here on were never used
        self._free: list[int] = []

    def take(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._next < self.count:
            self._next += 1
            return self._next - 1
        return None

    def give_back(self, index: int) -> None:
        self._free.append(index)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._next))

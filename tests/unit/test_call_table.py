"""The call table's layout (`core.call_table`) and what a dead worker's
table says was lost (`core.lost_calls.lost_with_table`): bytes in, bytes
out, no memory mapping."""

from __future__ import annotations

import pytest

from fleet_ingress.core import call_table as t
from fleet_ingress.core.lost_calls import lost_with_table

CALL = {
    "call_id": 17,
    "call": "4242-1-abcd",
    "started": "2026-12-07T05:00:00Z",
    "client_ip": "192.0.2.7",
    "route": "/ws/",
    "bot_id": "bot-1",
    "started_at": 1_800_000_000.25,
    "started_monotonic": 1234.5,
}


def _table(count: int = 4) -> bytearray:
    buf = bytearray(t.table_size(count))
    buf[: t.HEADER_SIZE] = t.header(count)
    return buf


def test_a_record_reads_back_as_written_then_granted_answered_and_ended() -> None:
    buf = _table()
    assert t.read_table(buf) == {}
    t.write_live(buf, 2, 9, CALL, None)
    assert t.read_table(buf) == {9: (t.LIVE, {**CALL, "fleet": None})}
    t.write_fleet(buf, 2, "a")
    t.write_answered(buf, 2, 1240.0)
    expected = {**CALL, "fleet": "a", "status": 101, "answered_monotonic": 1240.0}
    assert t.read_table(buf) == {9: (t.LIVE, expected)}
    t.write_ended(buf, 2)
    assert t.read_table(buf) == {9: (t.ENDED, expected)}


def test_text_is_bounded_by_bytes_cut_at_a_character_and_null_kept_null() -> None:
    buf = _table()
    call = {**CALL, "bot_id": "€" * 600, "client_ip": None, "route": 3.5}
    t.write_live(buf, 0, 1, call, "f" * 300)
    ((_, read),) = t.read_table(buf).values()
    assert read["bot_id"] == "€" * 85  # not Latin-1: UTF-8, 3 bytes a character, cut whole
    assert read["client_ip"] is None and read["route"] is None  # not text: null
    assert read["fleet"] == "f" * 260
    t.write_live(buf, 0, 1, {**CALL, "bot_id": "a\ud800b"}, None)  # a lone surrogate
    ((_, read),) = t.read_table(buf).values()
    assert read["bot_id"] == "a?b"


def test_a_lost_line_from_a_record_reads_as_the_workers_own_would() -> None:
    """The route and bot id are the request path decoded as Latin-1
    (`core.call_machine`): 256 of any of its characters (one a byte, two in
    UTF-8) fit a record whole, as many as a lost line keeps
    (`lost_calls._MAX_TEXT`); and a fleet name as long as one can be
    (`fleets_file.MAX_NAME`), which a lost line does not cut. In session 44's
    2 KiB records (UTF-8), a path's "é" took two bytes: a route of 300 cut at
    256 there, a fleet name at 128."""
    from fleet_ingress.config.fleets_file import MAX_NAME
    from fleet_ingress.core import lost_calls
    from fleet_ingress.core.lost_calls import lost_call_record

    assert t.RECORD_SIZE <= 1024
    path = bytes(range(0x20, 0x100)).decode("latin-1")  # every printable byte a path may hold
    route = "/" + ("é" * 298) + "/"  # a call prefix the configuration names
    fleet = "f" * (MAX_NAME - 4) + ":443"
    call = {**CALL, "route": route, "bot_id": path + path[:100], "call": "4194304-9" * 7}
    buf = _table()
    t.write_live(buf, 3, 7, call, None)
    t.write_fleet(buf, 3, fleet)
    ((_, read),) = t.read_table(buf).values()
    kwargs = {"worker_pid": 1, "generation": 1, "exit_status": "killed", "now": 1.9e9}
    line = lost_call_record(read, **kwargs)
    assert line == lost_call_record({**call, "fleet": fleet}, **kwargs)
    assert len(line["route"]) == len(line["bot_id"]) == lost_calls._MAX_TEXT
    assert line["fleet"] == fleet


@pytest.mark.parametrize("written", ["this release's", "session 44's"])
def test_a_supervisor_reads_tables_of_1_and_2_kib_records(written: str) -> None:
    """Over an upgrade the previous image's workers wrote 2 KiB records
    (their tables carried over the exec, `call_table_fd`) and the new
    image's write 1 KiB: the header says which, and both read, as bytes and
    from a memfd (`read_table_fd`). The 2 KiB table is bytes main's code
    wrote (`tests.unit.call_table_2k`)."""
    import os

    from fleet_ingress.net.call_table_map import read_table_fd
    from tests.unit.call_table_2k import CALL as CALL_2K
    from tests.unit.call_table_2k import HOLDS, TABLE_2K

    if written == "session 44's":
        buf = bytearray(TABLE_2K)
    else:
        buf = _table()
        t.write_live(buf, 0, 9, CALL_2K, None)
        t.write_fleet(buf, 0, "fleet-a")
        t.write_answered(buf, 0, 1240.0)
        waiting = {**CALL_2K, "call_id": 18, "client_ip": None, "bot_id": "waiting"}
        t.write_live(buf, 1, 10, waiting, None)
        t.write_live(buf, 2, 11, {**CALL_2K, "call_id": 19, "bot_id": "logged"}, "fleet-b")
        t.write_ended(buf, 2)
        assert len(buf) == t.HEADER_SIZE + 4 * 1024
    holds = HOLDS
    if written == "this release's":  # as `Call.identity` cuts it (LOGGED_BOT_ID)
        holds = {**HOLDS, 9: (1, {**HOLDS[9][1], "bot_id": CALL_2K["bot_id"][:256]})}
    assert t.read_table(buf) == holds
    # The first page written alone: records 0-1 of 2 KiB, 0-3 of 1 KiB.
    size = 2048 if written == "session 44's" else 1024
    indices = list(t.records_written(4, [(0, 4096)], size))
    assert indices == ([0, 1] if size == 2048 else [0, 1, 2, 3])
    assert t.read_table(buf, indices) == {n: holds[n] for n in (9, 10, 11)[: len(indices)]}
    fd = _memfd_holding(bytes(buf))  # as a dead worker's is read: its written pages alone
    try:
        assert read_table_fd(fd) == holds
    finally:
        os.close(fd)


@pytest.mark.parametrize("cut", [0, 1, 8, 40, 64, 500, 1019])
def test_a_record_rewritten_half_when_the_worker_died_reads_absent_never_mixed(cut: int) -> None:
    """A record of an ended call rewritten for another: the worker killed
    after the state's FREE and part of the body (any prefix or suffix of its
    bytes) leaves no record, not the old call nor a mix; LIVE comes last."""
    buf = _table()
    t.write_live(buf, 1, 5, {**CALL, "bot_id": "old"}, "a")
    t.write_ended(buf, 1)
    whole = _table()
    t.write_live(whole, 1, 6, {**CALL, "bot_id": "new"}, "b")
    at, end = t.record_offset(1), t.record_offset(2)
    for part in (slice(at + 1, at + cut), slice(end - cut, end)):
        half = bytearray(buf)
        half[at] = t.FREE  # the first store
        half[part] = whole[part]
        assert t.read_table(half) == {}
    buf[at] = t.FREE
    buf[at + 1 : end] = whole[at + 1 : end]
    assert t.read_table(buf) == {}
    buf[at] = t.LIVE  # the last store
    assert t.read_table(buf)[6][1]["bot_id"] == "new"


def test_a_fleet_or_101_written_half_reads_as_not_yet() -> None:
    buf = _table()
    t.write_live(buf, 0, 3, CALL, None)
    at = t.record_offset(0)
    buf[at + t._FLEET_AT : at + t._FLEET_AT + 1] = b"a"  # its name, not yet its length
    buf[at + t._ANSWERED_TIME_AT] = 7  # part of the 101's time, not its flag
    ((_, read),) = t.read_table(buf).values()
    assert read["fleet"] is None and "status" not in read


def test_a_header_not_this_layouts_is_refused_naming_why() -> None:
    with pytest.raises(ValueError, match="shorter than its header"):
        t.read_table(b"\0" * 10)
    with pytest.raises(ValueError, match="not b'FICALLT1'"):
        t.read_table(b"\0" * t.table_size(1))
    buf = _table(4)
    with pytest.raises(ValueError, match="4 records of 1024 need"):
        t.read_table(buf[:-1])
    buf[8:12] = (4096).to_bytes(4, "little")  # a newer release's records, say
    with pytest.raises(
        ValueError, match="records of 4096 bytes: this release reads records of 1024 or 2048"
    ):
        t.read_table(buf)


def test_slots_reuse_the_last_freed_first_and_run_out() -> None:
    slots = t.Slots(3)
    assert [slots.take(), slots.take()] == [0, 1]
    slots.give_back(0)
    assert [slots.take(), slots.take(), slots.take()] == [0, 2, None]
    slots.give_back(1)
    slots.give_back(2)
    assert [slots.take(), slots.take()] == [2, 1]


def test_a_dead_workers_lost_calls_are_its_live_records_and_what_had_none() -> None:
    table = {
        1: (t.LIVE, {**CALL, "fleet": "a", "status": 101, "answered_monotonic": 9.0}),
        2: (t.LIVE, {**CALL, "call_id": 2, "fleet": "b"}),  # its acquire never came
        3: (t.ENDED, {**CALL, "call_id": 3, "fleet": "a"}),  # logged, "logged" held
    }
    known = {
        1: {**CALL, "in_table": True, "fleet": "a", "bytes_from_carrier": 10, "status": None},
        3: {**CALL, "call_id": 3, "in_table": True, "fleet": "a"},
        4: {**CALL, "call_id": 4, "in_table": True, "fleet": "b"},  # ended, record reused
        5: {"fleet": "a"},  # its "logged" came, its release had not
        6: {**CALL, "call_id": 6},  # the table was full: told, not recorded
    }
    lost = lost_with_table(known, table)
    assert sorted(lost) == [1, 2, 6]
    assert lost[1]["bytes_from_carrier"] == 10 and lost[1]["status"] == 101
    assert lost[1]["answered_monotonic"] == 9.0
    assert lost[2]["call_id"] == 2 and lost[2]["fleet"] == "b"
    assert lost[6] == known[6]


def test_a_full_table_records_no_more_calls_and_a_freed_record_is_taken_again() -> None:
    """Past its records a call has none (`open` False: its acquire, logged and
    release are told at once); the supervisor reads what the worker wrote."""
    import os

    from fleet_ingress.net.call_table_map import (
        CALL_TABLE_ENV,
        CallTableWriter,
        make_table,
        read_table_fd,
    )

    fd = make_table(count=2)
    try:
        os.environ[CALL_TABLE_ENV] = str(os.dup(fd))
        writer = CallTableWriter.from_env()
        assert writer is not None and CALL_TABLE_ENV not in os.environ
        assert [writer.open(n, CALL, "a") for n in (1, 2, 3)] == [True, True, False]
        assert writer.has(1) and writer.has(2) and not writer.has(3)
        assert writer.logged(1) and not writer.logged(3)
        assert writer.over(1) and not writer.over(3)
        assert not writer.has(1)  # over: its record is free again
        assert writer.open(4, CALL, None)
        writer.granted(4, "b")
        assert {n: (s, c["fleet"]) for n, (s, c) in read_table_fd(fd).items()} == {
            2: (t.LIVE, "a"),
            4: (t.LIVE, "b"),
        }
    finally:
        os.close(fd)


def test_the_records_read_are_those_whose_state_byte_lies_in_written_data() -> None:
    """A hole reads as zeros (FREE): only records starting inside the extents
    are looked at, each once, in order, none past the table."""
    assert list(t.records_written(8, [(0, 4096)])) == [0, 1, 2, 3]
    assert list(t.records_written(16, [(8192, 12288)])) == [8, 9, 10, 11]
    assert list(t.records_written(9, [(0, 4096), (4096, 8192)])) == list(range(8))
    assert list(t.records_written(3, [(0, 1 << 20)])) == [0, 1, 2]
    assert list(t.records_written(8, [])) == []
    assert list(t.records_written(8, [(8192, 12288)], 2048)) == [4, 5]
    buf = _table(16)
    t.write_live(buf, 9, 9, CALL, "a")
    assert t.read_table(buf, [8, 9]) == t.read_table(buf)
    assert t.read_table(buf, [0, 1]) == {}


def test_reading_a_dead_workers_table_allocates_none_of_its_unwritten_pages() -> None:
    """The supervisor reads a dead worker's table (`read_table_fd`): through
    the mapping, a look at a record never written faulted its page in, and
    shared memory allocates a page on any fault: 8 MiB of the supervisor's
    memory a whole table, at each worker's death (an OOM kill among them).
    Only the pages the worker wrote are read now. Real memfd."""
    import os

    from fleet_ingress.net.call_table_map import CallTableWriter, make_table, read_table_fd

    fd = make_table()
    try:
        writer = CallTableWriter(os.dup(fd))
        for lease in (1, 2, 3):
            assert writer.open(lease, {**CALL, "call_id": lease}, "a")
        assert writer.over(2)
        written = os.fstat(fd).st_blocks
        assert written * 512 < 64 * 1024  # a few pages, not the table
        table = read_table_fd(fd)
        assert {n: s for n, (s, _) in table.items()} == {1: t.LIVE, 2: t.ENDED, 3: t.LIVE}
        assert os.fstat(fd).st_blocks == written, "reading it allocated its holes"
    finally:
        os.close(fd)


def _memfd_holding(data: bytes) -> int:
    """A memfd named as a call table is (`make_table`), holding `data` where
    it is not zeros (its holes left holes, as a worker leaves them)."""
    import os

    from fleet_ingress.net.call_table_map import TABLE_NAME

    fd = os.memfd_create(TABLE_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, len(data))
    for at in range(0, len(data), 4096):
        if any(data[at : at + 4096]):
            os.pwrite(fd, data[at : at + 4096], at)
    return fd


def test_a_carried_table_not_readable_is_closed_a_readable_one_kept_uninherited() -> None:
    """`taken_over`, the new image's side of an exec: a table of a layout it
    reads (2 KiB or 1 KiB records) is kept, no longer inheritable; a memfd
    named a table that it cannot read (a newer release's records, a header
    not a table's) is closed, where it stayed open for good before, read by
    nothing; a number that is no table (no fd, a socket) is left alone."""
    import os
    import socket

    from fleet_ingress.net.call_table_map import make_table, taken_over
    from tests.unit.call_table_2k import TABLE_2K

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    kept = [_memfd_holding(TABLE_2K), make_table(count=2)]
    newer = bytearray(_table(2))
    newer[8:12] = (512).to_bytes(4, "little")
    unread = [_memfd_holding(bytes(newer)), _memfd_holding(b"\0" * 8192)]
    sock = socket.socket()
    try:
        for fd in (*kept, *unread):
            os.set_inheritable(fd, True)  # as the exec carried it
        assert [taken_over(fd) for fd in kept] == kept
        assert not any(os.get_inheritable(fd) for fd in kept)
        assert [taken_over(fd) for fd in unread] == [None, None]
        assert not any(is_open(fd) for fd in unread)
        assert taken_over(sock.fileno()) is None and is_open(sock.fileno())
        assert taken_over(None) is None and taken_over(-1) is None
    finally:
        sock.close()
        for fd in kept + [fd for fd in unread if is_open(fd)]:
            os.close(fd)


def test_an_exec_hands_over_the_tables_the_installed_code_reads_alone() -> None:
    """`handed_over`: by the record sizes the installed code's trial said it
    reads; a table of any other size (a downgrade to session 44's release,
    which reads 2 KiB records; to one before the tables, none) stays
    close-on-exec, closed by the exec, not left open for good. Not said
    (None): every table, as before. Real memfds."""
    import os

    from fleet_ingress.net.call_table_map import handed_over, make_table
    from tests.unit.call_table_2k import TABLE_2K

    new, old = make_table(count=2), _memfd_holding(TABLE_2K)
    try:
        assert [handed_over(fd, frozenset({1024, 2048})) for fd in (new, old)] == [True, True]
        assert [handed_over(fd, frozenset({2048})) for fd in (new, old)] == [False, True]
        assert [handed_over(fd, frozenset()) for fd in (new, old)] == [False, False]
        assert [handed_over(fd, None) for fd in (new, old)] == [True, True]
    finally:
        os.close(new)
        os.close(old)


def test_a_table_of_another_releases_supervisor_is_said_as_expected_not_as_a_bug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of this release under a supervisor of session 44 (2 KiB
    records) cannot write its table: expected across an upgrade, so the
    worker says so as a warning naming what to run, not "a bug, report it"
    (which INSTALL's troubleshooting table sends to the project). A table
    that is broken is still said as a bug. Real memfds."""
    import logging
    import os

    from fleet_ingress.net.call_table_map import CALL_TABLE_ENV, TABLE_NAME
    from fleet_ingress.service.worker import call_table_from_env

    def table_fd(data: bytes) -> int:
        fd = os.memfd_create(TABLE_NAME, os.MFD_CLOEXEC)
        os.ftruncate(fd, max(len(data), t.HEADER_SIZE))
        os.pwrite(fd, data, 0)
        return fd

    older = t.HEADER.pack(t.MAGIC, 2048, 4).ljust(t.HEADER_SIZE, b"\0")
    monkeypatch.setenv(CALL_TABLE_ENV, str(table_fd(older.ljust(t.table_size(4, 2048), b"\0"))))
    with caplog.at_level(logging.WARNING):
        assert call_table_from_env() is None
    (record,) = [r for r in caplog.records if "call table" in r.getMessage()]
    assert record.levelno == logging.WARNING
    said = record.getMessage()
    assert "another release" in said and "fleet-ingress upgrade" in said
    assert "a bug" not in said

    caplog.clear()
    monkeypatch.setenv(CALL_TABLE_ENV, str(table_fd(b"NOTATABLE".ljust(t.HEADER_SIZE, b"\0"))))
    with caplog.at_level(logging.WARNING):
        assert call_table_from_env() is None
    (record,) = [r for r in caplog.records if "call table" in r.getMessage()]
    assert record.levelno == logging.ERROR and "a bug, report it" in record.getMessage()

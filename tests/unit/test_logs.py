"""The rate-limited log for lines a stranger can cause (no sockets, a hand-moved clock),
and the writer that keeps a stalled stderr off the caller's thread (a real pipe)."""

import contextlib
import fcntl
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet_ingress import logs
from fleet_ingress.logs import (
    JsonFormatter,
    RateLimitedLog,
    StderrSink,
    TextFormatter,
    fields,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="test.refused")
    return lambda: [r.fields for r in caplog.records if r.name == "test.refused"]  # type: ignore[attr-defined]


def test_lines_past_the_rate_are_counted_and_the_next_line_says_how_many(lines):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.refused"), per_second=3, clock=clock)
    written = [log.info("request refused", status=400 + i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert [f["status"] for f in lines()] == [400, 401, 402]
    assert all("suppressed" not in f for f in lines())
    clock.now += 0.99  # same second: still suppressed
    assert not log.info("request refused", status=499)
    clock.now += 0.02
    assert log.info("request refused", status=431)
    assert lines()[-1] == {"status": 431, "suppressed": 8}
    assert log.info("request refused", status=400)
    assert "suppressed" not in lines()[-1]  # reported once
    assert log.suppressed_total == 8


def test_a_steady_flood_gets_per_second_lines_each_second(lines):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.refused"), per_second=5, clock=clock)
    for _ in range(10):  # 10 seconds of 1,000 refusals a second
        for _ in range(1000):
            log.info("request refused")
            clock.now += 0.001
    assert len(lines()) == 50
    suppressed = sum(f.get("suppressed", 0) for f in lines())
    assert suppressed + sum(log._suppressed.values()) == 10 * 1000 - 50


def test_a_burst_that_stops_is_counted_in_a_line_at_the_end_of_its_second(lines):
    """A flood that stops leaves no next line to carry its count: the timer set
    when the first line is dropped writes it at the end of that second, once."""
    clock = Clock()
    timers: list[tuple[float, object]] = []
    log = RateLimitedLog(
        logging.getLogger("test.refused"),
        per_second=3,
        clock=clock,
        call_later=lambda delay, then: timers.append((delay, then)),
    )
    log.info("request refused", status=400)
    clock.now += 0.25
    for _ in range(9):
        log.info("request refused", status=431)
    assert [delay for delay, _ in timers] == [0.75]  # one timer, at the second's end
    clock.now += 0.75
    timers[0][1]()  # type: ignore[operator]
    assert lines()[-1] == {"suppressed": 7, "of": "request refused"}
    assert [r for r in lines() if "status" in r] == [{"status": 400}] + [{"status": 431}] * 2
    timers[0][1]()  # type: ignore[operator]  # a second call finds nothing to say
    assert len(lines()) == 4
    assert log.info("request refused", status=400)
    assert "suppressed" not in lines()[-1]  # counted once


def test_a_count_carried_by_the_next_line_is_not_written_again(lines):
    clock = Clock()
    timers: list[object] = []
    log = RateLimitedLog(
        logging.getLogger("test.refused"),
        per_second=1,
        clock=clock,
        call_later=lambda delay, then: timers.append(then),
    )
    log.info("request refused")
    log.info("request refused")  # dropped: a timer
    clock.now += 1.0
    log.info("request refused")  # the next second's line carries the count
    timers[0]()  # type: ignore[operator]
    assert lines() == [{}, {"suppressed": 1}]


def test_a_longer_window_writes_its_lines_once_in_it_and_counts_the_rest(lines):
    """`every`: a warning worth once in a while (a worker out of descriptors,
    every call's connect failing): one line a window, its count at the end."""
    clock = Clock()
    timers: list[tuple[float, object]] = []
    log = RateLimitedLog(
        logging.getLogger("test.refused"),
        per_second=1,
        clock=clock,
        call_later=lambda delay, then: timers.append((delay, then)),
        every=5.0,
    )
    assert log.info("out of descriptors")
    clock.now += 1.0
    assert not log.info("out of descriptors")  # a second on: still in the window
    clock.now += 3.0
    assert not log.info("out of descriptors")
    assert [delay for delay, _ in timers] == [4.0]  # the window's end
    clock.now += 1.0
    timers[0][1]()  # type: ignore[operator]
    assert lines() == [{}, {"suppressed": 2, "of": "out of descriptors"}]
    assert log.info("out of descriptors")


def test_the_line_is_one_json_object_with_its_fields(caplog):
    caplog.set_level(logging.INFO, logger="test.refused")
    RateLimitedLog(logging.getLogger("test.refused"), per_second=1).info(
        "request refused", client_ip="203.0.113.7", status=431
    )
    entry = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert entry["event"] == "request refused"
    assert (entry["client_ip"], entry["status"]) == ("203.0.113.7", 431)


def test_a_text_line_quotes_a_value_that_could_be_read_as_fields_of_its_own(caplog):
    """A refused request's first line is the carrier's text: with spaces and
    '=' in it, unquoted, a logfmt reader took its `status=200 fleet=evil`."""
    caplog.set_level(logging.INFO, logger="test.text")
    target = 'GET /ws/x status=200 fleet=evil "\x1b HTTP/1.1'
    RateLimitedLog(logging.getLogger("test.text"), per_second=1).info(
        "request refused", target=target, status=400, route="-", empty=""
    )
    line = TextFormatter().format(caplog.records[-1])
    assert "\n" not in line and "\x1b" not in line
    tail = line.split("request refused ", 1)[1]
    fields_read = dict(_logfmt_pairs(tail))
    assert fields_read == {"target": target, "status": "400", "route": "-", "empty": ""}


def test_a_text_line_writes_values_as_an_operator_reads_them(caplog):
    """Python's reprs reached text logs: note=None, address="('127.0.0.1', 9443)"
    (the end-to-end audit of session 19)."""
    caplog.set_level(logging.INFO, logger="test.text")
    logging.getLogger("test.text").info(
        "listening",
        extra=fields(address=("::1", 9443), note=None, draining=False, pids=[3, 4]),
    )
    line = TextFormatter().format(caplog.records[-1])
    assert line.endswith("test.text: listening address=[::1]:9443 draining=false pids=3,4")


def test_a_text_line_keeps_list_items_with_commas_apart(caplog):
    """The ready line's `environment` is a list of sentences with commas in
    them: joined by ',' two read as one, or as five (the review of session 35).
    Such a list is a JSON array, read back item for item; a plain one stays a,b."""
    caplog.set_level(logging.INFO, logger="test.text")
    environment = [
        "log.level = 'debug' from environment variable FLEET_INGRESS_LOG__LEVEL, not the file",
        "timeouts.queue = '7' from environment variable FLEET_INGRESS_TIMEOUTS__QUEUE, "
        "not the file's 3: the environment wins",
    ]
    logging.getLogger("test.text").info(
        "ready", extra=fields(status="ok", environment=environment, pids=[3, 4], names=["", "a"])
    )
    tail = TextFormatter().format(caplog.records[-1]).split(" ready ", 1)[1]
    read = dict(_logfmt_pairs(tail))
    assert json.loads(read["environment"]) == environment
    assert json.loads(read["names"]) == ["", "a"]
    assert read["pids"] == "3,4"


def _logfmt_pairs(text: str):
    """A logfmt reader: key=bare or key="quoted with JSON escapes"."""
    decoder = json.JSONDecoder()
    at = 0
    while at < len(text):
        key, _, rest = text[at:].partition("=")
        at += len(key) + 1
        if rest.startswith('"'):
            value, length = decoder.raw_decode(rest)
        else:
            value = rest.split(" ", 1)[0]
            length = len(value)
        yield key, value
        at += length + 1


# The stderr writer: a real pipe, nobody reading it until the test says so.
F_SETPIPE_SZ = 1031


@pytest.fixture
def unread_pipe():
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)  # full after a dozen lines
    stream = os.fdopen(write_end, "w")
    yield read_end, stream
    stream.close()
    os.close(read_end)


def _read_all(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return [json.loads(line) for line in data.decode().splitlines()]


def _sink_logger(sink: StderrSink, name: str) -> logging.Logger:
    sink.setFormatter(JsonFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [sink]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_logging_never_waits_for_a_stderr_nobody_reads_and_says_what_it_dropped(unread_pipe):
    read_end, stream = unread_pipe
    sink = StderrSink(stream, capacity=50)
    logger = _sink_logger(sink, "test.sink.unread")
    done = threading.Event()

    def log_many() -> None:
        for i in range(500):
            logger.info("call ended", extra=fields(n=i, pad="x" * 200))
        done.set()

    threading.Thread(target=log_many, daemon=True).start()
    # A blocking write on the caller's thread would stop at the 13th line, for good.
    assert done.wait(10), "logging blocked on the full pipe"
    assert sink.dropped > 0
    assert not sink.flush(timeout=0.2)  # still nobody reading: held lines wait
    written = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sink.flush(timeout=0.05):
        written += _read_all(read_end)  # a slow reader at last: what was held comes out
    written += _read_all(read_end)
    calls = [e["n"] for e in written if e["event"] == "call ended"]
    assert calls == sorted(calls) and calls[0] == 0  # in order, from the first
    said = [e for e in written if e["event"] == StderrSink.DROPPED]
    assert len(said) == 1 and said[0]["level"] == "warning"
    assert said[0]["dropped"] == sink.dropped == 500 - len(calls)
    logger.info("call ended", extra=fields(n=500))
    assert sink.flush(timeout=5)
    assert [e["n"] for e in _read_all(read_end)] == [500]  # the drop said once


def test_lines_a_gone_reader_cannot_take_are_counted_as_dropped():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the only reader has gone: each write fails (EPIPE)
    with os.fdopen(write_end, "w") as stream:
        sink = StderrSink(stream)
        logger = _sink_logger(sink, "test.sink.gone")
        for i in range(3):
            logger.info("call ended", extra=fields(n=i))
        assert sink.flush(timeout=5)
        assert sink.dropped == 3


def test_the_writer_thread_takes_no_signal(unread_pipe):
    _, stream = unread_pipe
    sink = StderrSink(stream)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's mask, unchanged
    assert signal.SIGTERM not in blocked
    tid = sink._writer.native_id
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
    )
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD):
        assert mask & (1 << (sig - 1)), sig


def test_a_rate_limited_warning_and_its_summary_are_warnings(caplog):
    """The "fleet attempt failed" lines: a worker out of descriptors fails every
    attempt at once (the limits audit of session 14: 494 lines in a burst)."""
    caplog.set_level(logging.INFO, logger="test.attempts")
    clock = Clock()
    log = RateLimitedLog(
        logging.getLogger("test.attempts"), per_second=2, clock=clock, level=logging.WARNING
    )
    for i in range(5):
        log.info("fleet attempt failed", attempt=i)
    log.flush()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "fleet attempt failed"),
        (logging.WARNING, "fleet attempt failed"),
        (logging.WARNING, RateLimitedLog.SUMMARY),
    ]


def test_with_no_stderr_at_all_lines_are_counted_and_nothing_waits():
    """Started with stderr closed (`2>&-`: sys.stderr is None): the writer died on
    its first line and every later flush, at exit and before an upgrade's exec,
    waited out its whole timeout (the review of session 14)."""
    sink = StderrSink(None)  # type: ignore[arg-type]
    logger = _sink_logger(sink, "test.sink.none")
    for i in range(3):
        logger.info("call ended", extra=fields(n=i))
    assert sink.flush(timeout=5)
    logger.info("call ended", extra=fields(n=3))
    assert sink.flush(timeout=5) and sink._writer.is_alive()
    assert sink.dropped == 4


def test_a_line_that_cannot_be_made_is_counted_not_printed(unread_pipe, capsys):
    _, stream = unread_pipe
    sink = StderrSink(stream)
    logger = _sink_logger(sink, "test.sink.bad")
    logger.info("%d calls", "many")  # a bad argument: the format fails
    assert sink.dropped == 1
    assert capsys.readouterr().err == ""


def test_each_event_suppressed_is_counted_under_its_own_name(caplog):
    """One limiter for the :80 listener's two upstream warnings: the summary
    named only the last event, with both counts (the review of session 14)."""
    caplog.set_level(logging.INFO, logger="test.acme")
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.acme"), per_second=1, clock=clock)
    log.info("acme upstream unreachable")
    for _ in range(5):
        log.info("acme upstream unreachable")
    log.info("acme upstream failed")
    log.flush()
    summaries = [r.fields for r in caplog.records if r.getMessage() == RateLimitedLog.SUMMARY]  # type: ignore[attr-defined]
    assert summaries == [
        {"suppressed": 1, "of": "acme upstream failed"},
        {"suppressed": 5, "of": "acme upstream unreachable"},
    ]


def test_a_line_looks_up_nothing_it_does_not_write():
    """Once logging is set up, a record is made without its caller's file and
    line (logging's findCaller walks the stack), its thread, its process's pid
    and name: neither formatter writes them, and an access line a call paid
    for them, about 45 Python lines and a getpid (session 39). The line is what
    it was, its "process" the formatter's own (a subprocess: logging's
    switches are the process's)."""
    script = """
import json, logging, os
from fleet_ingress.logs import configure_logging, fields, flush_lines
configure_logging("info", "json", pid=True)
seen = []
logger = logging.getLogger("fleet_ingress.access")
logger.addFilter(lambda record: seen.append(record) or True)
logger.info("call ended", extra=fields(call_id=7, status=101))
flush_lines()
r = seen[0]
print(json.dumps([r.lineno, r.funcName, r.thread, r.threadName, r.process, r.processName,
                  os.getpid()]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lineno, func, thread, thread_name, process, process_name, pid = json.loads(done.stdout)
    assert (lineno, thread, thread_name, process, process_name) == (0, None, None, None, None)
    assert func is None or func == "(unknown function)"
    (line,) = [json.loads(one) for one in done.stderr.splitlines()]
    assert {k: v for k, v in line.items() if k != "time"} == {
        "level": "info",
        "logger": "fleet_ingress.access",
        "event": "call ended",
        "process": pid,
        "call_id": 7,
        "status": 101,
    }


def test_python_s_own_complaints_go_through_the_writer_as_log_lines():
    """A warning, an exception in a thread and one that cannot be raised (in a
    __del__) were printed to stderr from the thread they happened on, around the
    writer; once logging is set up each is a JSON line (a subprocess: the hooks
    are the process's)."""
    import subprocess
    import sys

    script = """
import threading, warnings
from fleet_ingress.logs import configure_logging, flush_lines
configure_logging("info", "json")
warnings.warn("an old call")
worker = threading.Thread(target=lambda: 1 / 0, name="prober")
worker.start(); worker.join()
class Leaky:
    def __del__(self):
        raise RuntimeError("in __del__")
Leaky()
flush_lines()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    events = {(e["logger"], e["event"].splitlines()[0].split(":")[-1].strip()) for e in lines}
    assert ("py.warnings", "an old call") in events
    assert ("fleet_ingress", "a thread failed") in events
    assert ("fleet_ingress", "an exception could not be raised") in events
    failed = next(e for e in lines if e["event"] == "a thread failed")
    assert failed["thread"] == "prober" and "ZeroDivisionError" in failed["exception"]


def test_lines_a_full_disk_took_are_said_as_that_not_as_a_slow_reader():
    """stderr to a file on a full disk (ENOSPC): the notice said "stderr was not
    read in time" (the pressure audit of session 16)."""
    read_end, pipe_write = os.pipe()
    full = os.open("/dev/full", os.O_WRONLY)  # every write: No space left on device
    with os.fdopen(full, "w") as stream:
        sink = StderrSink(stream)
        logger = _sink_logger(sink, "test.sink.full")
        for i in range(3):
            logger.info("call ended", extra=fields(n=i))
        assert sink.flush(timeout=5) and sink.dropped == 3
        os.dup2(pipe_write, full)  # space again
        logger.info("call ended", extra=fields(n=3))
        assert sink.flush(timeout=5)
        os.close(pipe_write)
        said = [e for e in _read_all(read_end) if e["event"] == StderrSink.DROPPED]
    assert said and said[0]["dropped"] == 3
    assert said[0]["why"] == "writing to stderr failed: No space left on device"


def test_uvloops_complaint_about_a_tls_connection_it_closed_is_not_an_error(caplog):
    """A probe cut at its timeout mid-handshake: uvloop's SSL layer logged
    "Fatal error on SSL protocol" with a traceback at ERROR, hundreds at once
    when many probes timed out together (the scale audit of session 16).
    That one goes to DEBUG; anything else still reaches the default handler."""
    import asyncio

    from fleet_ingress.net.event_loop import new_event_loop

    loop = new_event_loop()
    try:
        handler = loop.get_exception_handler()
        assert handler is not None
        closed = RuntimeError(
            "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
        )
        with caplog.at_level(logging.DEBUG):
            handler(loop, {"message": "Fatal error on SSL protocol", "exception": closed})
            handler(loop, {"message": "Fatal error on SSL protocol", "exception": ValueError("x")})
            handler(loop, {"message": "Task exception was never retrieved", "exception": closed})
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "Fatal error on SSL protocol",
            "Task exception was never retrieved",
        ]
        assert any(r.getMessage() == "TLS connection already closed" for r in caplog.records)
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def test_lines_dropped_are_said_every_while_lines_still_wait(unread_pipe, monkeypatch):
    """A stream read, but slower than lines come, never empties the queue: the
    notice of lines dropped waited for it to, and said nothing while the drops
    went on (the log sinks audit of session 21). Now at most DROPPED_SAID_EVERY
    after the last, lines waiting or not."""
    monkeypatch.setattr(logs, "DROPPED_SAID_EVERY", 0.0)
    read_end, stream = unread_pipe
    sink = StderrSink(stream, capacity=50)
    logger = _sink_logger(sink, "test.sink.slow")
    for i in range(500):
        logger.info("call ended", extra=fields(n=i, pad="x" * 200))
    written = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sink.flush(timeout=0.05):
        written += _read_all(read_end)
    written += _read_all(read_end)
    events = [e["event"] for e in written]
    said = events.index(StderrSink.DROPPED)
    assert "call ended" in events[said + 1 :], "said only once nothing waited"
    dropped = sum(e["dropped"] for e in written if e["event"] == StderrSink.DROPPED)
    assert dropped == sink.dropped == 500 - events.count("call ended")


_TORN_BY_A_FULL_DISK = """
import logging, os, resource, signal, sys
from fleet_ingress.logs import JsonFormatter, StderrSink, fields
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not the end
path = sys.argv[1]
with open(path, "w") as stream:
    sink = StderrSink(stream)
    sink.setFormatter(JsonFormatter())
    log = logging.getLogger("torn")
    log.handlers[:] = [sink]
    log.propagate = False
    log.setLevel(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # the disk fills at 1000 bytes
    for i in range(8):
        log.info("call ended", extra=fields(n=i, pad="x" * 200))
    assert sink.flush(timeout=5)
    before = sink.dropped
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    log.info("call ended", extra=fields(n=8))
    assert sink.flush(timeout=5)
    print(before, sink.dropped)
"""


def test_a_line_a_full_disk_took_part_of_is_ended_not_glued_to_the_next(tmp_path: Path):
    """A write that the disk took only part of (ENOSPC, here EFBIG past
    RLIMIT_FSIZE in a process of its own) left a fragment the next line was
    glued to, spoiling both, and counted the batch's written lines as dropped."""
    path = tmp_path / "stderr.log"
    done = subprocess.run(
        [sys.executable, "-c", _TORN_BY_A_FULL_DISK, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a whole line
    whole = [
        json.loads(line) for line in lines[:-1] if line.startswith(b"{") and line.endswith(b"}")
    ]
    fragments = [line for line in lines[:-1] if not (line.startswith(b"{") and line.endswith(b"}"))]
    assert len(fragments) == 1  # the line the disk took part of, ended by itself
    ended = [e["n"] for e in whole if e["event"] == "call ended"]
    assert ended[-1] == 8 and ended[:-1] == list(range(len(ended) - 1))
    assert before == 8 - len(ended[:-1])  # only the lines not written whole
    said = [e for e in whole if e["event"] == StderrSink.DROPPED]
    assert said and said[0]["dropped"] == before and after == before


# write_event: the access line straight into the sink when that is logging's one way out.

A_CALL = {
    "call_id": 7,
    "call": "41-7-ab",
    "client_ip": "::1",
    "bot_id": 'bøt "x" y=1',
    "fleet": None,
    "tried": ["a conn-failure", "b 101"],
    "address": ("::1", 443),
    "resumed": True,
    "queued_ms": 0.0,
    "duration_s": 1.25,
}


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str, dict]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.getMessage(), record.fields))  # type: ignore[attr-defined]


@pytest.fixture
def fast_path(monkeypatch: pytest.MonkeyPatch):
    """A sink configured as configure_logging does (the module's own, alone on
    the parent logger of `test.fast.access`), on a StringIO; logging's wall
    clock still; the LogRecords made counted. Yields (logger, sink, lines, made).
    The sink is made alone on its logger by `lines` (pytest's log capture
    adds its handler to every logger that does not propagate, once the
    fixtures are set up: write_event would take logging's way)."""
    stream = io.StringIO()
    sink = StderrSink(stream)
    sink.setFormatter(JsonFormatter(pid=True))
    parent = logging.getLogger("test.fast")
    parent.propagate = False
    parent.setLevel(logging.INFO)
    logger = logging.getLogger("test.fast.access")
    monkeypatch.setattr(logs, "_sink", sink)
    # The clock LogRecord reads here (time_ns from 3.13), the other left running:
    # write_event must read the same one.
    if sys.version_info >= (3, 13):
        monkeypatch.setattr(time, "time_ns", lambda: 1_765_000_000_987_654_000)
    else:
        monkeypatch.setattr(time, "time", lambda: 1_765_000_000.987654)
    made: list[str] = []
    real_init = logging.LogRecord.__init__

    def counted(self, name, *args, **kwargs):
        made.append(name)
        real_init(self, name, *args, **kwargs)

    monkeypatch.setattr(logging.LogRecord, "__init__", counted)

    def lines(*, alone: bool = False) -> list[str]:
        """The lines written since last asked; `alone`: then the sink alone on its logger."""
        assert sink.flush()
        if alone:
            parent.handlers[:] = [sink]
        written = stream.getvalue().splitlines()
        stream.seek(0)
        stream.truncate()
        return written

    yield logger, sink, lines, made
    parent.handlers[:] = []
    logger.handlers[:] = []
    logger.filters[:] = []
    logger.setLevel(logging.NOTSET)
    logger.disabled = False


@pytest.mark.parametrize("fmt", [JsonFormatter, TextFormatter])
@pytest.mark.parametrize("pid", [False, True])
def test_write_event_writes_logging_s_line_byte_for_byte_and_makes_no_record(fast_path, fmt, pid):
    """The access line's fast path (logging's record, checks, handler lock and
    formatter: about 107k instructions a call, session 43): the same bytes as
    `logger.info(event, extra=fields(...))` at the same clock, in both formats,
    with and without the process; no LogRecord made."""
    logger, sink, lines, made = fast_path
    lines(alone=True)
    sink.setFormatter(fmt(pid=pid))
    logger.info("call ended", extra=fields(**A_CALL))
    assert made == ["test.fast.access"]
    logs.write_event(logger, logging.INFO, "call ended", dict(A_CALL))
    assert made == ["test.fast.access"], "write_event made a record"
    by_logging, by_write_event = lines()
    assert by_write_event == by_logging


def _handler_on_logger(logger, sink):
    logger.addHandler(_Kept())


def _handler_on_parent(logger, sink):
    logger.parent.addHandler(_Kept())


def _filter_on_logger(logger, sink):
    logger.addFilter(lambda record: setattr(record, "fields", {"filtered": 1}) or True)


def _filter_on_sink(logger, sink):
    sink.addFilter(lambda record: False)


def _level_raised(logger, sink):
    logger.setLevel(logging.WARNING)


def _sink_level_raised(logger, sink):
    sink.setLevel(logging.WARNING)


def _logger_disabled(logger, sink):
    logger.disabled = True  # as logging.config's disable_existing_loggers does


def _formatter_of_its_own(logger, sink):
    class Marked(JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            return "marked " + super().format(record)

    sink.setFormatter(Marked())


@pytest.mark.parametrize(
    "change",
    [
        _handler_on_logger,
        _handler_on_parent,
        _filter_on_logger,
        _filter_on_sink,
        _level_raised,
        _sink_level_raised,
        _logger_disabled,
        _formatter_of_its_own,
    ],
)
def test_write_event_does_what_logging_does_once_its_way_out_is_changed(fast_path, change):
    """A handler or filter added, a level raised, a logger disabled, a
    formatter of one's own: write_event hands the record to logging, which
    does what it did (the same lines, the same records to the handlers)."""
    logger, sink, lines, made = fast_path

    def outcome(log) -> tuple[list[str], list]:
        log()
        kept = [h for lg in (logger, logger.parent) for h in lg.handlers if isinstance(h, _Kept)]
        got = [r for h in kept for r in h.records]
        for h in kept:
            h.records.clear()
        return lines(), [(name, event, dict(values)) for name, event, values in got]

    lines(alone=True)
    change(logger, sink)
    by_logging = outcome(lambda: logger.info("call ended", extra=fields(**A_CALL)))
    records_by_logging = len(made)
    by_write_event = outcome(
        lambda: logs.write_event(logger, logging.INFO, "call ended", dict(A_CALL))
    )
    assert by_write_event == by_logging
    assert len(made) == 2 * records_by_logging


def test_write_event_follows_logging_disable_and_a_record_factory(fast_path):
    logger, _, lines, made = fast_path
    lines(alone=True)
    logging.disable(logging.INFO)
    try:
        logs.write_event(logger, logging.INFO, "call ended", dict(A_CALL))
        assert lines() == [] and made == []
    finally:
        logging.disable(logging.NOTSET)
    real = logging.getLogRecordFactory()

    def shouting(*args, **kwargs):
        record = real(*args, **kwargs)
        record.msg = record.msg.upper()
        return record

    logging.setLogRecordFactory(shouting)
    try:
        logs.write_event(logger, logging.INFO, "call ended", dict(A_CALL))
    finally:
        logging.setLogRecordFactory(real)
    (line,) = lines()
    assert json.loads(line)["event"] == "CALL ENDED"


def test_a_json_line_is_what_json_dumps_writes_with_default_str():
    """The line's encoder, made once (JSONEncoder.encode makes its C encoder
    at each call): the same text as json.dumps(..., default=str) for every
    kind of value a line's fields hold, and a line that cannot be made fails
    as before (the sink drops and counts it)."""

    class Odd:
        def __str__(self) -> str:
            return "odd ✓"

    entry = {
        "s": 'a "q" \\ é ✓ \x00',
        "i": -12,
        "big": 10**30,
        "f": 0.1 + 0.2,
        "whole": 3.0,
        "nan": float("nan"),
        "inf": float("-inf"),
        "none": None,
        "t": True,
        "list": ["a conn-failure", 1, [2.5, None]],
        "tuple": ("::1", 443),
        "nested": {"k": {"deeper": [{}]}, 7: "int key", None: "none key", 1.5: "float key"},
        "odd": Odd(),
        "path": Path("/tmp/x"),
    }
    assert logs._json_line(entry) == json.dumps(entry, default=str)
    with pytest.raises(TypeError):
        logs._json_line({("a", 1): "tuple key"})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises((ValueError, RecursionError)):
        logs._json_line(circular)
    assert logs._json_line({"after": "a failed line"}) == '{"after": "a failed line"}'


@pytest.mark.parametrize("pid", [False, True])
def test_a_json_line_is_its_head_and_fields_as_one_object_encoded_whole(pid):
    """JsonFormatter.line keeps each (level, logger, event, process) head
    encoded and encodes the fields alone: the text is what the whole object
    json.dumps'd gives, field order kept, a field named as a head key taking
    its place, no fields, an exception, and past HEADS_KEPT heads."""
    formatter = JsonFormatter(pid=pid)
    created = 1_765_000_000.25
    when = "2025-12-06T05:46:40.250Z"

    def whole(event: str, values: dict, exception: str | None = None) -> str:
        entry = {"time": when, "level": "info", "logger": "fleet_ingress.access", "event": event}
        if pid:
            entry["process"] = logs.OwnProcess.pid
        entry.update(values)
        if exception is not None:
            entry["exception"] = exception
        return json.dumps(entry, default=str)

    cases = [
        ("call ended", A_CALL, None),
        ("call ended", A_CALL, None),  # its head kept
        ("call ended", {}, None),
        ("call ended", {"n": 1, "event": "a field's", "time": 3, "process": "p"}, None),
        ("call ended", {"n": 1}, "Traceback ..."),
        ('an "odd" événement\n', {"n": 1}, None),
    ] + [(f"event {i}", {"i": i}, None) for i in range(logs.HEADS_KEPT + 2)]
    for event, values, exception in cases:
        made = formatter.line(
            created, 250.0, "INFO", "fleet_ingress.access", event, values, exception
        )
        assert made == whole(event, values, exception)
    assert len(formatter._heads) <= logs.HEADS_KEPT
    pairs = [("n", 1)]  # fields given as pairs, not a dict, as dict.update takes them
    made = formatter.line(created, 250.0, "INFO", "fleet_ingress.access", "e", pairs)  # type: ignore[arg-type]
    assert made == whole("e", dict(pairs))


def test_a_forked_processs_json_lines_name_its_own_pid_not_the_head_kept_before(monkeypatch):
    """A worker is forked from the supervisor, its formatter and the heads it
    kept with it: a line's head kept with the supervisor's pid must not be a
    worker's (`OwnProcess.pid`, set again at the fork, is in the head's key)."""
    formatter = JsonFormatter(pid=True)

    def process() -> int:
        line = formatter.line(
            1_765_000_000.25, 250.0, "INFO", "fleet_ingress.access", "e", {"n": 1}
        )
        return json.loads(line)["process"]

    assert process() == logs.OwnProcess.pid
    monkeypatch.setattr(logs.OwnProcess, "pid", logs.OwnProcess.pid + 1)  # as _forked sets it
    assert process() == logs.OwnProcess.pid

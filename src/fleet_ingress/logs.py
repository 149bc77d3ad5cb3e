"""Structured logs: one JSON object a line (or key=value text for a terminal).

Call sites log an event name and fields: `log.info("fleet down", extra=fields(fleet="a"))`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import select
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, TextIO

_FIELDS = "fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    return {_FIELDS: values}


class RateLimitedLog:
    """At most `per_second` lines a second; the rest are counted, not written.

    For lines a stranger can cause (a refused request head): a flood of them
    must not become a flood of log lines, costing disk, the log shipper and the
    event loop. The next line of the same event that gets through carries
    `suppressed`, the number of that event dropped since; at the end of the
    second, a line `"log lines suppressed"` for each event still uncounted says
    how many were dropped, so that a burst's size is always in the log within a
    second (given `call_later`, the loop's, to be woken then)."""

    SUMMARY = "log lines suppressed"

    def __init__(
        self,
        logger: logging.Logger,
        per_second: int,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        *,
        level: int = logging.INFO,
        summary_fields: dict[str, Any] | None = None,
        every: float = 1.0,
    ) -> None:
        """`summary_fields`: added to the `"log lines suppressed"` lines (which
        of several limiters of one event they count for). `every`: the window
        in seconds, `per_second` lines in each (a warning worth once in a
        while: 1 line every few seconds, the rest counted)."""
        self.every = every
        self.logger = logger
        self.level = level
        self.summary_fields = summary_fields or {}
        self.per_second = per_second
        self.clock = clock
        self.call_later = call_later
        self.suppressed_total = 0
        self._window = -1.0
        self._written = 0
        self._suppressed: Counter[str] = Counter()  # by event

    def info(self, event: str, **values: Any) -> bool:
        """Write the line, or count it; True if written."""
        now = self.clock()
        if now - self._window >= self.every:
            self._window, self._written = now, 0
        if self._written >= self.per_second:
            if not self._suppressed and self.call_later is not None:
                self.call_later(self._window + self.every - now, self.flush)
            self._suppressed[event] += 1
            self.suppressed_total += 1
            return False
        self._written += 1
        if suppressed := self._suppressed.pop(event, 0):
            values["suppressed"] = suppressed
        self.logger.log(self.level, event, extra=fields(**values))
        return True

    def flush(self) -> None:
        """Say how many lines were dropped since the last one written, if any were."""
        suppressed, self._suppressed = self._suppressed, Counter()
        for event, count in sorted(suppressed.items()):
            self.logger.log(
                self.level,
                self.SUMMARY,
                extra=fields(suppressed=count, of=event, **self.summary_fields),
            )


class OwnProcess:
    """This process's pid, kept (a process forked from this one has its own):
    os.getpid() is a system call, asked at each line by the formatters and
    twice by a call's identity (`net.calls`)."""

    pid = os.getpid()


def _forked() -> None:
    OwnProcess.pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


@functools.lru_cache(maxsize=1)
def _utc_second(second: int) -> str:
    """A second of the wall clock as a line's time writes it, to the second:
    a line a call (its access line) and more, many a second; the last
    second's text is kept (gmtime and strftime: 9k instructions a line,
    callgrind, session 43)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# json.dumps(..., default=str) makes a JSONEncoder and its C encoder at each
# call (a keyword not its default): made once, the same text (session 43).
_JSON = json.JSONEncoder(default=str)
# And JSONEncoder.encode makes its C encoder (and a float closure) at each
# call too: the one it makes, made once. Without `markers` (the circular
# check's dict, which a failed line would leave entries in): a line that holds
# itself fails with RecursionError, not ValueError, dropped and counted alike.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # CPython's accelerator
_ENCODE_LINE = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None,  # markers
        _JSON.default,
        json.encoder.encode_basestring_ascii,  # ensure_ascii
        None,  # indent
        _JSON.key_separator,
        _JSON.item_separator,
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
)


def _json_line(entry: dict[str, Any]) -> str:
    """`_JSON.encode(entry)`, the same text."""
    if _ENCODE_LINE is None:
        return _JSON.encode(entry)
    return "".join(_ENCODE_LINE(entry, 0))


# The keys a line writes before its fields (a field of the same name takes its place).
_HEAD_KEYS = frozenset(("time", "level", "logger", "event", "process", "exception"))
HEADS_KEPT = 256
"""Heads of lines (level, logger, event, process) a JsonFormatter keeps encoded."""


def _line_parts(
    record: logging.LogRecord,
) -> tuple[float, float, str, str, str, dict[str, Any]]:
    """What a formatter's `line` takes of a record (`write_event` passes the
    same without one): its time, msecs, level, logger, event and fields."""
    return (
        record.created,
        record.msecs,
        record.levelname,
        record.name,
        record.getMessage(),
        getattr(record, _FIELDS, {}),
    )


class JsonFormatter(logging.Formatter):
    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid  # several processes write one stream: say which wrote each line
        # A line's level, logger, event and process, encoded as its head: a
        # logger's lines (an access line a call) have a few of them, each
        # encoded once, not again at each line.
        self._heads: dict[tuple[str, str, str, int | None], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(*_line_parts(record), exception)

    def line(
        self,
        created: float,
        msecs: float,
        levelname: str,
        name: str,
        event: str,
        values: dict[str, Any],
        exception: str | None = None,
    ) -> str:
        """The line of a record with these (its `created`, `msecs`, ...),
        fields `values` and `exception` (formatted): `format`'s, and
        `write_event`'s, which makes no record."""
        when = f"{_utc_second(math.floor(created))}.{int(msecs):03d}Z"  # JSON as it is
        if exception is None and type(values) is dict and values and _HEAD_KEYS.isdisjoint(values):
            # The head, kept, and the fields after it: the text the whole
            # line's encoding would give.
            process = OwnProcess.pid if self.pid else None
            head = self._heads.get((levelname, name, event, process))
            if head is None:
                head = self._head(levelname, name, event, process)
            return f'{{"time": "{when}", {head}{_json_line(values)[1:]}'
        entry: dict[str, Any] = {
            "time": when,
            "level": levelname.lower(),
            "logger": name,
            "event": event,
        }
        if self.pid:  # "process": a line's own fields may name another pid (a worker's)
            entry["process"] = OwnProcess.pid
        entry.update(values)
        if exception is not None:
            entry["exception"] = exception
        return _json_line(entry)

    def _head(self, levelname: str, name: str, event: str, process: int | None) -> str:
        """`"level": ..., "logger": ..., "event": ...[, "process": ...], `, kept."""
        head: dict[str, Any] = {"level": levelname.lower(), "logger": name, "event": event}
        if process is not None:
            head["process"] = process
        text = _json_line(head)[1:-1] + _JSON.item_separator
        if len(self._heads) >= HEADS_KEPT:  # events of many texts (a library's own)
            self._heads.clear()
        self._heads[(levelname, name, event, process)] = text
        return text


_BARE_VALUE = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space, " = and backslash


def _logfmt_value(value: object) -> str:
    """A field's value as logfmt writes it: bare when it cannot be misread,
    else quoted with escapes, so a value with spaces (a refused request's
    first line) cannot add fields of its own to the line. An address (a host
    and a port) is host:port ([v6]:port), another list its items joined by ',',
    not Python's reprs; a list with a ',' (or nothing) in an item is a JSON array,
    where ',' joined the ready line's `environment` sentences, themselves with
    commas, into one that no reader could split."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host = str(value[0])
        text = f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    elif isinstance(value, list | tuple):
        items = [str(item) for item in value]
        if any("," in item or not item for item in items):
            text = json.dumps(items)
        else:
            text = ",".join(items)
    elif isinstance(value, bool):
        text = "true" if value else "false"  # as the JSON lines write it
    else:
        text = str(value)
    return text if _BARE_VALUE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(*_line_parts(record))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def line(
        self,
        created: float,
        msecs: float,
        levelname: str,
        name: str,
        event: str,
        values: dict[str, Any],
    ) -> str:
        """The line of a record with these and fields `values`, no exception
        (JsonFormatter.line's arguments; the text has no time)."""
        # A field with no value (JSON's null) is left out, not written "None".
        tail = " ".join(f"{k}={_logfmt_value(v)}" for k, v in values.items() if v is not None)
        if self.pid:
            tail = f"{tail} process={OwnProcess.pid}" if tail else f"process={OwnProcess.pid}"
        line = f"{levelname.lower():7} {name}: {event}"
        return f"{line} {tail}" if tail else line


LINES_HELD = 10_000
"""Lines a process holds while its stderr is not read, before it drops new ones
(about 3 MB of access lines)."""
FLUSH_WAIT = 2.0
"""Seconds a process waits at exit (or before an exec) for its held lines to be
written; a stderr nobody reads would otherwise hold it for good."""
DROPPED_SAID_EVERY = 10.0
"""Seconds between two notices of lines dropped while lines still wait: a stream
read, but slower than lines come, never empties the queue."""
WRITE_AT_MOST = 4096
"""Bytes in one write at most (PIPE_BUF), whole lines but for a longer one: the
supervisor and its workers share stderr, and a pipe keeps a write of up to
PIPE_BUF from being interleaved with another process's."""


class StderrSink(logging.Handler):
    """Writes log lines from a thread of its own, never from the caller's.

    A service's stderr is journald's stream socket or a pipe: when whoever reads
    it stalls (journald busy or restarting, a `| tee` stopped), a write blocks,
    and a write made on the event loop would stop every call of the process for
    as long. Here the caller formats the line and leaves it in a queue; the
    writer thread writes it. Past `capacity` lines waiting, new lines are dropped
    and counted (`dropped`, exported as fleet_ingress_log_lines_dropped_total),
    and once the stream takes lines again a line `"log lines dropped"` says how
    many. Lines that cannot be written at all (the reader has gone) count too."""

    DROPPED = "log lines dropped"

    def __init__(self, stream: TextIO, capacity: int = LINES_HELD) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.dropped = 0
        self._dropped_said = 0
        # Why a write failed since the last notice of lines dropped; None: none did.
        self._write_error: str | None = None
        self._lines: deque[str] = deque()
        self._writing = False
        self._dropped_said_at = time.monotonic()
        # The last write that failed stopped inside a line (a full disk took part
        # of it): the next one ends that fragment first, not glued to a new line.
        self._line_open = False
        self._changed = threading.Condition()
        self._writer = threading.Thread(target=self._write_forever, name="log-writer", daemon=True)
        # Started with every signal blocked, which it keeps: a signal must reach
        # the main thread (the supervisor holds some back around an exec).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._writer.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.put(line)

    def put(self, line: str) -> None:
        """`line` (formatted) queued for the writer, or dropped and counted
        past `capacity` lines waiting."""
        with self._changed:
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                return
            self._lines.append(line)
            self._changed.notify_all()

    def flush(self, timeout: float = FLUSH_WAIT) -> bool:
        """Wait up to `timeout` for every line held to be written; True if they were."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._lines and not self._writing, timeout=timeout
            )

    def handleError(self, record: logging.LogRecord) -> None:
        """A line that could not be made (a bad argument to its format): counted
        as dropped, not written to stderr from the caller's thread."""
        self.count_dropped()

    def count_dropped(self) -> None:
        with self._changed:
            self.dropped += 1

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._lines))
                batch = self._take_batch()
                now = time.monotonic()
                say = not self._lines or now - self._dropped_said_at >= DROPPED_SAID_EVERY
                unsaid = self.dropped - self._dropped_said if say else 0
                if unsaid:
                    self._dropped_said_at = now
                self._dropped_said += unsaid
                self._writing = True
            lost, unsaid_still = len(batch), unsaid
            try:
                lost = self._write(b"".join(batch))
                if unsaid and self._write(self._dropped_line(unsaid)) == 0:
                    unsaid_still = 0
                    self._write_error = None  # said
            except Exception:  # a bug here must not end the writing for good
                pass
            finally:
                with self._changed:
                    self.dropped += lost
                    self._dropped_said -= unsaid_still  # said with a later line
                    self._writing = False
                    self._changed.notify_all()

    def _take_batch(self) -> list[bytes]:
        """Whole lines, WRITE_AT_MOST bytes at most (but for a longer first one)."""
        first = self._lines.popleft().encode("utf-8", "backslashreplace") + b"\n"
        batch, size = [first], len(first)
        while self._lines:
            line = self._lines[0].encode("utf-8", "backslashreplace") + b"\n"
            if size + len(line) > WRITE_AT_MOST:
                break
            self._lines.popleft()
            batch.append(line)
            size += len(line)
        return batch

    def _dropped_line(self, count: int) -> bytes:
        record = logging.LogRecord(
            "fleet_ingress", logging.WARNING, __file__, 0, self.DROPPED, None, None
        )
        why = (
            "stderr was not read in time"
            if self._write_error is None
            else f"writing to stderr failed: {self._write_error}"
        )
        setattr(record, _FIELDS, {"dropped": count, "why": why})
        try:
            line = self.format(record)
        except Exception:
            line = f"{self.DROPPED} dropped={count}"
        return line.encode("utf-8", "backslashreplace") + b"\n"

    def _write(self, data: bytes) -> int:
        """Write all of `data` (whole lines), waiting as long as the stream makes
        us; how many of its lines were not written whole (no stream, its reader
        gone, a full disk), 0 when all were."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, ValueError, OSError):  # None (started 2>&-), closed, a StringIO
            fd = None
        pending = (b"\n" if self._line_open else b"") + data
        try:
            if fd is None:
                self.stream.write(data.decode("utf-8"))
                self.stream.flush()
                return 0
            while pending:
                try:
                    written = os.write(fd, pending)
                except BlockingIOError:  # someone made the shared stream non-blocking
                    select.select([], [fd], [], 1.0)
                    continue
                if written:
                    self._line_open = pending[written - 1] != 0x0A
                pending = pending[written:]
        except (AttributeError, OSError, ValueError) as exc:
            # Said with the count of lines dropped (a full disk: ENOSPC).
            self._write_error = getattr(exc, "strerror", None) or type(exc).__name__
            # Each line not written whole still has its newline in `pending`;
            # the one ending a torn fragment, if still there, is no line.
            return pending.count(b"\n") - (len(pending) > len(data))
        return 0

    def waiting(self) -> int:
        """Lines queued and not yet written."""
        with self._changed:
            return len(self._lines)


_sink: StderrSink | None = None


def lines_dropped() -> int:
    """Log lines this process dropped: its stderr was not read in time, or
    writing to it failed (a full disk under the file it goes to)."""
    return _sink.dropped if _sink is not None else 0


def lines_waiting() -> int:
    """Log lines this process holds for stderr and has not written yet."""
    return _sink.waiting() if _sink is not None else 0


def flush_lines(timeout: float = FLUSH_WAIT) -> bool:
    """Wait up to `timeout` for this process's log lines to be written (before
    an exec or an `os._exit`, which would lose them); True if they were."""
    return _sink.flush(timeout) if _sink is not None else True


def write_event(logger: logging.Logger, level: int, event: str, values: dict[str, Any]) -> None:
    """`logger.log(level, event, extra=fields(**values))`, the same line,
    without logging's record when its one way out is this process's sink.

    Logging's way (a LogRecord, the logger's and the handler's checks, the
    handler's lock, the formatter) cost an access line about 107k instructions
    (callgrind, session 43); here the sink's formatter makes the line from the
    event and the clock, and the sink queues it. Taken only when logging itself
    would hand the record to the configured sink alone, as formatted: looked
    at each line (`_sink_alone`), so a handler or a filter added since (pytest's
    caplog, `logging.config`), a level changed or logging disabled has the
    record made and handled by logging as before. `values` is not copied (nor
    kept past the line): pass a dict of the line's own."""
    sink = _sink_alone(logger, level)
    if sink is None:
        logger.log(level, event, extra={_FIELDS: values}, stacklevel=2)  # its caller's line
        return
    # As this Python's LogRecord takes its time and msecs (3.13 from time_ns).
    if _CLOCK_NS:
        ns = time.time_ns()
        created = ns / 1e9
        msecs = (ns % 1_000_000_000) // 1_000_000 + 0.0
        if msecs == 999.0 and int(created) != ns // 1_000_000_000:
            msecs = 0.0  # created rounded up to the next second
    else:
        created = time.time()
        msecs = int((created - int(created)) * 1000) + 0.0
    try:
        line = sink.formatter.line(  # type: ignore[union-attr]
            created, msecs, logging.getLevelName(level), logger.name, event, values
        )
    except Exception:  # as the sink's emit: counted as dropped
        sink.count_dropped()
        return
    sink.put(line)


_LINE_FORMATTERS = (JsonFormatter, TextFormatter)
# LogRecord's clock: time.time() to 3.12, time.time_ns() from 3.13 (its msecs
# taken from the nanoseconds; a line's time, at the same instant, was the
# other's a millisecond apart at times, and the time of a clock not logging's).
_CLOCK_NS = sys.version_info >= (3, 13)


def _sink_alone(logger: logging.Logger, level: int) -> StderrSink | None:
    """The sink, when a record of `level` from `logger` would reach it and no
    other handler (Logger.handle, Logger.callHandlers, Handler.handle in turn),
    formatted by one of ours, the record made by LogRecord; else None."""
    sink = _sink
    if (
        sink is None
        or not logger.isEnabledFor(level)  # disabled, levels, logging.disable
        or logger.filters
        or sink.filters
        or level < sink.level
        or type(sink.formatter) not in _LINE_FORMATTERS
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    seen = 0
    walked: logging.Logger | None = logger
    while walked is not None:
        for handler in walked.handlers:
            if handler is not sink:
                return None
            seen += 1
        walked = walked.parent if walked.propagate else None
    return sink if seen == 1 else None


def configure_logging(level: str = "info", fmt: str = "json", *, pid: bool = False) -> None:
    """`pid`: every line names the process that wrote it (the supervisor and its
    workers share stderr). Called again (a reload), it changes the level and the
    format; the lines held for stderr stay queued in order."""
    global _sink
    if _sink is None or _sink.stream is not sys.stderr:
        if _sink is not None:
            _sink.flush()
        _sink = StderrSink(sys.stderr)
    _sink.setFormatter(JsonFormatter(pid=pid) if fmt == "json" else TextFormatter(pid=pid))
    ours = logging.getLogger("fleet_ingress")
    ours.handlers[:] = [_sink]
    ours.setLevel(level.upper())
    ours.propagate = False
    # The libraries' warnings (asyncio's "Task exception was never retrieved",
    # aiohttp's) through the same writer: logging's last resort would write them
    # to stderr from the event loop.
    everything = logging.getLogger()
    everything.handlers[:] = [h for h in everything.handlers if not isinstance(h, StderrSink)]
    everything.addHandler(_sink)
    everything.setLevel(max(logging.WARNING, ours.level))
    _record_only_what_lines_say()
    # And what Python itself would print to stderr from the thread it happens on.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _record_only_what_lines_say() -> None:
    """No log record looks up what no line writes: its caller's file, line and
    function (logging's findCaller walks the stack, each frame's file name
    normalized), its thread, its process's pid and name. Neither formatter
    writes them (a line's "process" is the formatter's, kept: `OwnProcess`).
    Logging's own switches for this (the logging HOWTO, "Optimization"): about
    45 Python lines and a getpid system call less for each line, an access
    line a call (session 39)."""
    logging._srcfile = None  # type: ignore[attr-defined]  # findCaller: "(unknown file)"
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("fleet_ingress").error(
        "a thread failed",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra=fields(thread=args.thread.name if args.thread is not None else None),
    )


def _log_unraisable(unraisable: Any) -> None:
    logging.getLogger("fleet_ingress").error(
        "an exception could not be raised",
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
        extra=fields(message=unraisable.err_msg, object=repr(unraisable.object)[:200]),
    )

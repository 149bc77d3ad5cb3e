"""Structured logs: one JSON object a line (or key=value text for a terminal).

Call sites log an event name and fields: `log.info("fleet down", extra=fields(fleet="a"))`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_FIELDS = "fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    return {_FIELDS: values}


class RateLimitedLog:
    """At most `per_second` lines a second; the rest are counted, not written.

    For lines a stranger can cause (a refused request head): a flood of them
    must not become a flood of log lines, costing disk, the log shipper and the
    event loop. The next line that gets through carries `suppressed`, the
    number dropped since the last line written; if none comes by the end of the
    second (the flood has stopped), a line `"log lines suppressed"` says how
    many of which event were dropped, so that a burst's size is always in the
    log within a second (given `call_later`, the loop's, to be woken then)."""

    SUMMARY = "log lines suppressed"

    def __init__(
        self,
        logger: logging.Logger,
        per_second: int,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.logger = logger
        self.per_second = per_second
        self.clock = clock
        self.call_later = call_later
        self.suppressed_total = 0
        self._window = -1.0
        self._written = 0
        self._suppressed = 0
        self._suppressed_event = ""

    def info(self, event: str, **values: Any) -> bool:
        """Write the line, or count it; True if written."""
        now = self.clock()
        if now - self._window >= 1.0:
            self._window, self._written = now, 0
        if self._written >= self.per_second:
            if not self._suppressed and self.call_later is not None:
                self.call_later(self._window + 1.0 - now, self.flush)
            self._suppressed += 1
            self._suppressed_event = event
            self.suppressed_total += 1
            return False
        self._written += 1
        if self._suppressed:
            values["suppressed"] = self._suppressed
            self._suppressed = 0
        self.logger.info(event, extra=fields(**values))
        return True

    def flush(self) -> None:
        """Say how many lines were dropped since the last one written, if any were."""
        if self._suppressed:
            count, self._suppressed = self._suppressed, 0
            self.logger.info(
                self.SUMMARY, extra=fields(suppressed=count, of=self._suppressed_event)
            )


class JsonFormatter(logging.Formatter):
    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid  # several processes write one stream: say which wrote each line

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if self.pid:  # "process": a line's own fields may name another pid (a worker's)
            entry["process"] = os.getpid()
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, _FIELDS, {})
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        if self.pid:
            tail = f"{tail} process={os.getpid()}" if tail else f"process={os.getpid()}"
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        line = f"{line} {tail}" if tail else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "json", *, pid: bool = False) -> None:
    """`pid`: every line names the process that wrote it (the supervisor and its
    workers share stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(pid=pid) if fmt == "json" else TextFormatter(pid=pid))
    root = logging.getLogger("fleet_ingress")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

"""Structured logs: one JSON object a line (or key=value text for a terminal).

Call sites log an event name and fields: `log.info("fleet down", extra=fields(fleet="a"))`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    return {_FIELDS: values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, _FIELDS, {})
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        line = f"{line} {tail}" if tail else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("fleet_ingress")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

"""Logging setup. Text or JSON lines; every line carries the space, connection and node ids
bound to the current task (``bind``), so one grep follows a participant across services."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "spaces_log_context", default=None
)
_FIELDS = ("space_id", "connection_id", "participant_id", "node_id")
_process: dict[str, str] = {}
"""Ids true for the whole process (a media node's node_id)."""


def bind_process(**ids: str) -> None:
    """Attach ids to every log line of this process."""
    _process.update({k: v for k, v in ids.items() if v})


def bind(**ids: str) -> None:
    """Attach ids to log lines of the current task (and the tasks it starts)."""
    merged = dict(_context.get() or {})
    merged.update({k: v for k, v in ids.items() if v})
    _context.set(merged)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (*(_context.get() or {}).items(), *_process.items()):
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(ids)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{k}={getattr(record, k)}" for k in _FIELDS if getattr(record, k, None))
        record.ids = f" [{ids}]" if ids else ""
        return super().format(record)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aioice and aiortc are chatty at INFO about every candidate pair.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

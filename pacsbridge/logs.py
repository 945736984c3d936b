"""Log formats (``log_format = "text" | "json"``) and the per-association fields of a log line.

The DICOM listener runs each association in its own thread; :func:`bind` attaches fields (association
id, calling AE, peer, instance hash) to that thread, and every line logged from it carries them in JSON
(pacsbridge's own lines and pynetdicom's alike).  A call can add its own with ``extra={...}`` using the
same names.  Only these names are written, so a stray ``extra`` cannot put patient data in the log.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

#: Fields a line may carry besides time, level, logger and message (none of them patient data).
CONTEXT_FIELDS = ("association", "calling_ae", "peer", "instance")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context = threading.local()


def bind(**fields: str | None) -> None:
    """Attach ``fields`` (names from :data:`CONTEXT_FIELDS`) to this thread's log lines; None removes one."""
    current = dict(getattr(_context, "fields", {}))
    for key, value in fields.items():
        if key not in CONTEXT_FIELDS:
            raise ValueError(f"unknown log field {key!r}")
        if value is None:
            current.pop(key, None)
        else:
            current[key] = str(value)
    _context.fields = current


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """:func:`bind` for the duration of a ``with`` block (then the previous fields again)."""
    previous = dict(getattr(_context, "fields", {}))
    bind(**fields)
    try:
        yield
    finally:
        _context.fields = previous


def context_fields() -> dict[str, str]:
    return dict(getattr(_context, "fields", {}))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then context fields;
    a traceback goes in ``exception`` (one string, so the record stays one line)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(context_fields())
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``log_format`` ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def operator_line(message: str, log_format: str = "text", level: str = "ERROR") -> str:
    """An operator's one-line message (``pacsbridge serve: cannot start: ...``) in the log format, so a JSON
    log stays parseable line by line."""
    if log_format != "json":
        return message
    return json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "level": level,
                       "logger": "pacsbridge", "message": message}, ensure_ascii=False)

"""Log lines: text (the default) or JSON objects, one a line (`log_format` / TELEPATHY_LOG_FORMAT=json).

    configure("json")           # the root logger's handlers write {"time", "level", "logger", "message", ...}
    REQUEST_ID.set(request_id)  # while a request is handled: its lines carry "request_id"

A JSON line also carries "trace_id" when tracing is on and a span is current, and "error" (the traceback) for an
exception. Torch-free: the gateway uses it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("telepathy_request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {"time": f"{seconds}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        trace = sys.modules.get("opentelemetry.trace")  # only where tracing has imported it
        if trace is not None:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                line["trace_id"] = f"{context.trace_id:032x}"
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(log_format: str, level: int | str | None = None) -> None:
    """Give the root logger's handlers the format (one stderr handler if it has none)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter(log_format))
    if level is not None:
        root.setLevel(level)

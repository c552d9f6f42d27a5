"""Logging: one JSON object per line on App Engine, which Cloud Logging reads as structured entries (severity,
message, labels, trace correlation); plain readable text locally."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar

# "projects/<p>/traces/<id>" for the request being served, set by the web app from X-Cloud-Trace-Context.
current_trace: ContextVar[str | None] = ContextVar("current_trace", default=None)
_LABELS = ("plan", "target", "run_id")


class CloudLoggingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname if record.levelname != "WARN" else "WARNING",
            "message": record.getMessage(),
            "logger": record.name,
        }
        labels = {name: str(getattr(record, name)) for name in _LABELS if getattr(record, name, None)}
        if labels:
            entry["logging.googleapis.com/labels"] = labels
        trace = current_trace.get()
        if trace:
            entry["logging.googleapis.com/trace"] = trace
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(on_app_engine: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout if on_app_engine else sys.stderr)
    if on_app_engine:
        handler.setFormatter(CloudLoggingFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def trace_from_header(header: str | None, project: str) -> str | None:
    """``X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1`` -> ``projects/<project>/traces/TRACE_ID``."""
    if not header:
        return None
    trace_id = header.split("/", 1)[0].strip()
    return f"projects/{project}/traces/{trace_id}" if trace_id else None

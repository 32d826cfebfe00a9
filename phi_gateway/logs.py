"""Logs: one JSON object per line (or plain text), carrying the id of the request being served.

The code logs paths, counts, codes and error types, never values. Exceptions are written as
their type and stack frames only: an exception's message can quote the data it choked on.
"""

from __future__ import annotations

import logging
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

# Set by the middleware for the length of one request on a policy route.
request_id: ContextVar[str | None] = ContextVar("phi_gateway_request_id", default=None)


class Formatter(logging.Formatter):
    """``json``: ``{"time", "level", "logger", "message", "request_id"?, "exception"?}``."""

    def __init__(self, style: str = "json") -> None:
        super().__init__()
        if style not in ("json", "text"):
            raise ValueError('log format must be "json" or "text".')
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = {
                "type": record.exc_info[0].__name__,
                "frames": [
                    f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(record.exc_info[2])
                ],
            }
        if self.json:
            return orjson.dumps(entry).decode()
        line = f"{entry['time']} {record.levelname:<7} {record.name}: {entry['message']}"
        if rid is not None:
            line += f" [request {rid}]"
        if "exception" in entry:
            line += f"\n  {entry['exception']['type']} at " + "\n  ".join(entry["exception"]["frames"])
        return line


def log_config(style: str = "json", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's ``log_config``: our format on stderr for
    uvicorn's loggers and ours alike (the access log stays off: query strings hold PHI)."""
    Formatter(style)  # refuse an unknown style here, not in the worker
    handler = {"class": "logging.StreamHandler", "formatter": "phi", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"phi": {"()": Formatter, "style": style}},
        "handlers": {"default": handler},
        "loggers": {name: logger for name in ("uvicorn", "uvicorn.error", "phi_gateway")},
    }

"""Structured logs to stderr, plain or JSON, for journald.

Call sites pass structured fields with ``extra={"fields": {...}}``; the formatter renders them as
``key=value`` pairs (plain) or as JSON members. Only :func:`setup_logging` (called from ``main``)
touches the root logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from fedgate.config import LogConfig

__all__ = ["JsonFormatter", "PlainFormatter", "setup_logging"]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class PlainFormatter(logging.Formatter):
    """``2026-11-27T11:00:00.123Z INFO fedgate.store store opened path=var/fedgate.db``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [ts, record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_plain(v)}" for k, v in _fields(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _plain(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text or '"' in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)
    logging.getLogger("aioquic").setLevel(logging.WARNING)

"""Logging configuration for the command line: plain text lines, or one JSON object per line.

Library modules only call ``logging.getLogger(__name__)``; this module is used by the entry point
alone. The level also governs the progress bars of transformers and huggingface_hub ("Loading
weights", downloads): shown at info and debug, hidden at warning and error; the HTTP clients'
line per request shows at debug only. The JSON form needs no third-party package: a record's
standard attributes give the time, level, logger and message, and whatever the caller passed as
``extra`` (the request log's id, images, tokens, outputs, status, ms, ...) becomes top-level keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The HTTP clients under huggingface_hub log every request at INFO (dozens for one download):
# at debug only.
_PER_REQUEST_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON.

    Keys: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``, then the
    record's ``extra`` fields, then ``exception`` / ``stack`` (formatted text) when present. Values
    JSON cannot hold are written as their ``str``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", log_format: LogFormat = "text") -> None:
    """Log to stderr at ``level`` ("debug", "info", ...) in ``log_format``.

    Like :func:`logging.basicConfig`, adds no handler when the root logger already has one; the
    libraries' per-request loggers and progress bars follow ``level`` either way.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    threshold = logging.getLevelName(level.upper())
    if threshold > logging.DEBUG:
        for name in _PER_REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(max(threshold, logging.WARNING))
    if threshold > logging.INFO:
        hide_library_progress_bars()


def hide_library_progress_bars() -> None:
    """Hide transformers' and huggingface_hub's progress bars, unless ``HF_HUB_DISABLE_PROGRESS_BARS``
    says otherwise.

    Both libraries read that variable when imported, and the commands that load a model import them
    after this runs (the client-only commands never do): setting it is enough there, and it reaches
    the processes those commands start. Where they are imported already (a program calling
    :func:`~qwen25vl_embed_server.cli.main`), their own functions turn the bars off.
    """
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") != "1":
        return  # the user's own setting
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]  # public; lazily

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

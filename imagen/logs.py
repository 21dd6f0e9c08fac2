"""Logging for ``imagen serve``, ``imagen worker`` and the embedded generation children: one handler on the
root logger, in the format ``IMAGEN_LOG_FORMAT`` names.

- ``text``: ``time LEVEL logger: message``, with `` [request <id>]`` on the lines logged while an HTTP request
  is handled.
- ``json``: one JSON object per line (python-json-logger): ``timestamp``, ``level``, ``logger``, ``message``,
  and every ``extra=`` field of the call (the job events of ``jobs/stats.py`` carry ``event``, ``job_id``,
  ``key_name``, ``state`` and durations), plus ``request_id`` during a request.

uvicorn's own loggers (its errors and access lines) go through the same handler (``uvicorn_log_config``).
The request id is a context variable set by ``api/request_id.py`` for the request's duration.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# The id of the HTTP request being handled in this context (None outside a request).
REQUEST_ID: ContextVar[str | None] = ContextVar("imagen_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (as ``request_id``) logged during a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        message = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{message} [request {request_id}]" if request_id else message


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's copy of the message, with colours
            timestamp=True,
        )
    return TextFormatter(TEXT_FORMAT)


def make_handler(log_format: str) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one in ``log_format`` ("text" or "json")."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(make_handler(log_format))
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings come out in the same format (logger ``py.warnings``)


def uvicorn_log_config() -> dict[str, Any]:
    """For ``uvicorn.run(log_config=...)``: uvicorn's loggers keep no handler of their own and pass their
    lines (errors, access) to the root handler that ``configure_logging`` installed."""
    passed_on = {"handlers": [], "level": "INFO", "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {"uvicorn": passed_on, "uvicorn.error": passed_on, "uvicorn.access": passed_on},
    }

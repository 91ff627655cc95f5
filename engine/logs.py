"""structlog set-up: JSON in containers, console in a terminal (LOG_FORMAT overrides)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from engine.config import LogFormat

# The signal a log line is about (signal_id, strategy_id, ...): one context variable set once
# per signal with the token API. structlog's `bound_contextvars` costs a context manager and a
# variable per key, about 5 % of a signal's time.
SIGNAL_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("signal_context", default=None)


def merge_signal_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    fields = SIGNAL_CONTEXT.get()
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    return event


class Redactor:
    """A structlog processor that replaces every known secret value, wherever it appears."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event
        for key, value in event.items():
            text = value if isinstance(value, str) else None
            if text is None and not isinstance(value, int | float | bool | None):
                text = str(value)
            if text is not None and any(secret in text for secret in self.secrets):
                for secret in self.secrets:
                    text = text.replace(secret, "***")
                event[key] = text
        return event

    def filter_record(self, record: logging.LogRecord) -> bool:
        """The same for libraries that log through the standard library."""
        if self.secrets:
            text = record.getMessage()
            if any(secret in text for secret in self.secrets):
                for secret in self.secrets:
                    text = text.replace(secret, "***")
                record.msg, record.args = text, None
        return True


# Whether info lines are written: a line built from an event's figures costs microseconds even
# when it is dropped, so the hot path asks first.
INFO = True


def configure_logging(fmt: LogFormat | None, level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    global INFO
    INFO = logging.getLevelName(level.upper()) <= logging.INFO
    if fmt is None:
        fmt = LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    # asyncmy logs MySQL notes such as "database exists" from CREATE ... IF NOT EXISTS.
    logging.getLogger("asyncmy").setLevel(logging.ERROR)
    # asyncio warns on every TLS connection that ends ("returning true from eof_received()...");
    # a failed TLS login would bury its one line under them.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    redactor = Redactor(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor.filter_record)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            merge_signal_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

"""structlog set-up: JSON in containers, console in a terminal (LOG_FORMAT overrides)."""

from __future__ import annotations

import logging
import sys

import structlog

from engine.config import LogFormat


def configure_logging(fmt: LogFormat | None, level: str = "INFO") -> None:
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

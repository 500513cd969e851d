"""structlog setup shared by the processes: JSON lines on stderr, level from the flags."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from common.echo import bound_log_values

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str, *, process: str, json: bool = True) -> None:
    """Log events as JSON (or readable text for terminals) at ``level`` and above."""
    numeric = _LEVELS.get(level, logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )

    def add_process(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", process)  # static: also for worker threads
        return event

    structlog.configure(
        processors=[
            add_process,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            bound_log_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # libraries using stdlib logging (aiohttp, kubernetes-asyncio) at warning and above
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)

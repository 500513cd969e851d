"""Echoing input back, bounded: a log line, a rejection reason or an API answer quotes
what it was given, never all of it. A 1 MB string stays 1 MB in one place only."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

ECHO_LIMIT = 200  # characters of one echoed value
LOG_VALUE_LIMIT = 2000  # characters of any one value in a log event (a backstop)


def bounded(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` itself (no quotes) cut to ``limit`` characters, with the length said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def bound_log_values(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no string value of a log event is longer than
    LOG_VALUE_LIMIT, whatever a caller passed (lists and dicts are rendered first)."""
    for key, value in event.items():
        if isinstance(value, str):
            if len(value) > LOG_VALUE_LIMIT:
                event[key] = cut(value, LOG_VALUE_LIMIT)
        elif isinstance(value, list | tuple | dict | bytes):
            text = repr(value) if isinstance(value, bytes) else None
            if text is None and len(value) <= 64:
                continue  # small containers of small values render fine
            text = text or repr(value)
            if len(text) > LOG_VALUE_LIMIT:
                event[key] = cut(text, LOG_VALUE_LIMIT)
    return event

"""Structured log events: one stable event name per line, fields as data.

``log_event(log, logging.INFO, "deny", action="publish", topic=t)`` gives a readable
line (``deny action=publish topic="a/b"``) with the text formatter, and a JSON object
with ``event``, ``action`` and ``topic`` keys with :class:`JsonFormatter`
(``logging.format: json``). Event names are stable: connect, connect_refused,
disconnect, deny, upstream_error, config_reloaded, ...

Never pass a password, a token or a payload as a field.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

# Field values: what JSON can carry as is; anything else is logged as str().
FieldValue = str | int | float | bool | None

# LogRecord attributes the JSON formatter writes itself; event fields never overwrite them.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "event"})


def _text_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool | int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    text = str(value)
    # Bare tokens stay bare; anything with spaces, quotes, '=' or control characters is quoted
    # and escaped, so a client-chosen topic or id cannot forge a log line.
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


def _json_value(value: object) -> FieldValue:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def format_peer(peer: object) -> str:
    """A socket address as logs show it: ``host:port`` for an (IPv4 or IPv6) address tuple, else str()."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: object) -> None:
    """Log one event; fields whose value is None are left out."""
    if not logger.isEnabledFor(level):
        return
    data = {k: _json_value(v) for k, v in fields.items() if v is not None}
    text = " ".join([event, *(f"{k}={_text_value(v)}" for k, v in data.items())])
    logger.log(level, "%s", text, extra={"event": event, "event_fields": data})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and for events ``event`` plus its fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, str):
            entry["event"] = event
            fields = getattr(record, "event_fields", None)
            if isinstance(fields, dict):
                for key, value in fields.items():
                    if key not in _RESERVED:
                        entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)

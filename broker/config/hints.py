"""pydantic's validation errors as the operator reads them: one line per error, naming the key, with the hint
that fits.

- an unknown key: ``did you mean acl?`` (difflib over the field names of the model at that level), else the
  keys that are known there;
- a value that is not one of a few words: ``did you mean 'flowfuse'?``, and for listener types the words of
  other brokers (``type: wss`` -> "use type: ws with tls:");
- a ``bind`` that is not host:port (``bind: 1883``): ``host:port, e.g. 0.0.0.0:1883``;
- a key set by an environment variable: ``(from MQTT_FRONT_...)``.

It never shows the value given (it may be a secret).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

# Listener types other brokers and habits use, and what they are here.
_LISTENER_TYPES = {
    "wss": "for WebSocket over TLS use type: ws with tls: {cert, key}",
    "websocket": "use type: ws",
    "websockets": "use type: ws",
    "mqtt": "use type: tcp",
    "mqtts": "for MQTT over TLS use type: tcp with tls: {cert, key}",
    "ssl": "for MQTT over TLS use type: tcp with tls: {cert, key}",
    "tls": "for MQTT over TLS use type: tcp with tls: {cert, key}",
    "tcps": "for MQTT over TLS use type: tcp with tls: {cert, key}",
}
_BIND_HINT = "host:port, e.g. 0.0.0.0:1883"


def format_errors(
    exc: ValidationError, model: type[BaseModel], sources: Mapping[tuple[str, ...], str] | None = None
) -> str:
    """Every error of ``exc`` (raised validating ``model``) as ``  key: message (hint)`` lines; ``sources``:
    the key paths environment variables set, and the variables' names."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        where = ".".join(str(p) for p in loc) or "(top level)"
        variable = _source(loc, sources or {})
        if variable is not None:
            where += f" (from {variable})"
        message = err["msg"].removeprefix("Value error, ")
        hint = _hint(err, model)
        lines.append(f"  {where}: {message}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def _source(loc: Sequence[int | str], sources: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set the key at ``loc`` or a section holding it (not one inside it: an error of a whole
    section is not that variable's)."""
    path = tuple(str(part) for part in loc)
    for key, variable in sources.items():
        if path[: len(key)] == key:
            return variable
    return None


def _hint(err: ErrorDetails, model: type[BaseModel]) -> str | None:
    loc, kind, given = err["loc"], err["type"], err.get("input")
    if not loc:
        return None
    last = loc[-1]
    if kind == "extra_forbidden" and isinstance(last, str):
        known = _field_names(model, loc[:-1])
        if not known:
            return None
        close = difflib.get_close_matches(last.lower(), known, n=1, cutoff=0.6)
        return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
    if last == "bind" and kind in ("string_type", "value_error"):
        return _BIND_HINT
    if kind == "literal_error" and isinstance(given, str):
        if last == "type" and len(loc) >= 2 and loc[0] == "listeners" and given.lower() in _LISTENER_TYPES:
            return _LISTENER_TYPES[given.lower()]
        expected = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        close = difflib.get_close_matches(given.lower(), expected, n=1, cutoff=0.6)
        if close and close[0] != given:
            return f"did you mean {close[0]!r}?"
    return None


def _unwrap(annotation: Any) -> Any:
    """``X | None``, ``Annotated[X, ...]`` -> X (unions of several models stay as they are)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _field_names(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The field names of the model at ``loc`` (list indexes and dict keys stepped over), or []."""
    current: Any = model
    for part in loc:
        origin = get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = _unwrap(field.annotation)
        elif origin in (list, tuple) and isinstance(part, int):
            current = _unwrap(get_args(current)[0])
        elif origin is dict:
            current = _unwrap(get_args(current)[1])
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []

"""Reading the platform's answers, in both styles: an HTTP status and body in, allow, deny or error out.

Split from :mod:`broker.auth.platform` (which sends the questions, caches and logs): pure functions of
what came back, so each style's rules can be read in one place. EMQX 5's HTTP authn/authz protocol, as
FlowFuse's ``/api/comms/v2`` serves it, and mosquitto-go-auth's HTTP backend (FlowFuse's older
``/api/comms/auth``); ``../shared/flowfuse-reference.md`` has the semantics.
"""

from __future__ import annotations

import json
from typing import Any


class Answer:
    """What one HTTP exchange gave: (result, parsed JSON body or None). ``result`` is ``allow``, ``deny``,
    ``error`` or ``timeout``."""

    __slots__ = ("body", "result")

    def __init__(self, result: str, body: Any = None) -> None:
        self.result = result
        self.body = body


def read_go_auth(status: int) -> Answer:
    """go-auth: any 2xx allows, a 4xx denies (401 is its deny), anything else is an error."""
    if 200 <= status < 300:
        return Answer("allow")
    return Answer("deny" if 400 <= status < 500 else "error")


def read_emqx(kind: str, status: int, content: bytes) -> Answer:
    """emqx: only 200 with ``{"result": "allow"}`` allows (and 204 for an ACL check); ``deny``, ``ignore`` and
    a 4xx deny (EMQX reads a 4xx as "ignore": nobody allowed it); any other status or body is an error."""
    if kind == "acl" and status == 204:
        return Answer("allow")
    if 400 <= status < 500:
        return Answer("deny")
    if status != 200:
        return Answer("error")
    try:
        data = json.loads(content)
    except ValueError:
        return Answer("error")
    result = data.get("result") if isinstance(data, dict) else None
    if result == "allow":
        return Answer("allow", data)
    if result in ("deny", "ignore"):
        return Answer("deny")
    return Answer("error")

"""One client connection's protocol logic, Sans-I/O: bytes and events in, bytes and actions out.

Start reading at :mod:`broker.session.api` (what the I/O layer exchanges with a session), then
:mod:`broker.session.core` (the relay hot paths and the dispatch tables). Cold paths live apart:
:mod:`~broker.session.handshake` (CONNECT to CONNACK), :mod:`~broker.session.flows` (ack order,
QoS 2 refusals, SUBACK merging, topic aliases), :mod:`~broker.session.audit` (deny log lines),
:mod:`~broker.session.stats` (per-session counters). Nothing here imports asyncio or sockets.
"""

from broker.session.api import (
    AccessPolicy,
    Action,
    Authenticate,
    AuthResult,
    CheckAccess,
    ClientIdRule,
    Close,
    Continue,
    OpenUpstream,
    RateCheck,
    SessionSettings,
    State,
)
from broker.session.core import Session

__all__ = [
    "AccessPolicy",
    "Action",
    "AuthResult",
    "Authenticate",
    "CheckAccess",
    "ClientIdRule",
    "Close",
    "Continue",
    "OpenUpstream",
    "RateCheck",
    "Session",
    "SessionSettings",
    "State",
]

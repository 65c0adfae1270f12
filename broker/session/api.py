"""What the session shows the layers above it: actions, settings, the access-policy port, the state table.

Nothing here does anything: these are the types the I/O layer exchanges with a
:class:`broker.session.Session`, and the one table that says which state changes exist
(h11's ``_state.py`` idea: "which transitions exist" has one answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from broker.mqtt.limits import DecodeLimits
from broker.session.inventory import Inventory


class AccessPolicy(Protocol):
    """What the session needs from the access checks for one client (topics as the client sees them).

    True allows, False denies. A policy that must ask someone (the platform, over HTTP) answers
    None when it does not know yet: the session then holds that packet and everything after it in
    the same direction, asks the I/O layer with a :class:`CheckAccess` action, and goes on when
    ``Session.access_decided`` brings the answer.
    """

    def check_publish(self, topic: str, retain: bool = False) -> bool | None: ...
    def check_receive(self, topic: str) -> bool | None: ...
    def check_subscribe(self, topic_filter: str) -> bool | None: ...


class ClientIdRule(Enum):
    """Which client ids an authenticated identity may use (ids are bound to identities)."""

    PREFIX = "prefix"  # the username, or "<username>:<anything>"
    EXACT = "exact"  # the username only (FlowFuse's Team Broker rule)


class State(Enum):
    WAIT_CONNECT = 1  # reading the client's CONNECT
    AUTHENTICATING = 2  # the I/O layer runs Authenticate; client bytes are kept, unparsed
    CONNECTING_UPSTREAM = 3  # the I/O layer runs OpenUpstream
    WAIT_CONNACK = 4  # our CONNECT is upstream; waiting for its CONNACK
    ESTABLISHED = 5  # relaying both ways
    CLOSED = 6  # nothing more is read or produced


TRANSITIONS: dict[State, frozenset[State]] = {
    State.WAIT_CONNECT: frozenset({State.AUTHENTICATING, State.CLOSED}),
    State.AUTHENTICATING: frozenset({State.CONNECTING_UPSTREAM, State.CLOSED}),
    State.CONNECTING_UPSTREAM: frozenset({State.WAIT_CONNACK, State.CLOSED}),
    State.WAIT_CONNACK: frozenset({State.ESTABLISHED, State.CLOSED}),
    State.ESTABLISHED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
"""Every state change the session may make; anything else is a bug (an AssertionError)."""

# States in which client bytes are parsed as they come (otherwise they wait, unparsed, in order).
READING_CLIENT = frozenset({State.WAIT_CONNECT, State.ESTABLISHED})


@dataclass(slots=True)
class Authenticate:
    """Check these credentials, then call ``Session.auth_done`` with the result."""

    username: str | None
    password: bytes | None
    client_id: str


@dataclass(slots=True)
class OpenUpstream:
    """Connect to the upstream, then call ``upstream_connected`` or ``upstream_failed``."""


@dataclass(slots=True)
class Close:
    """Write what the session handed over, then close both sides; ``reason`` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class CheckAccess:
    """Decide ``action`` on ``topic`` for this session's identity, then call ``Session.access_decided``.

    ``action`` is "publish" (a PUBLISH or the will; ``retain`` says whether it is retained),
    "subscribe" (one SUBSCRIBE filter) or "deliver" (a message coming down). The session holds the
    packet that asked, and all after it in the same direction, until the answer comes; the I/O layer
    must answer within its timeout (a timeout is a deny).
    """

    action: str
    topic: str
    retain: bool = False


@dataclass(slots=True)
class Continue:
    """The client's read spent its work budget: call ``Session.continue_client`` on the next loop turn.

    The session keeps the rest of the read and stops reading the client meanwhile, so one client's burst
    of costly packets (cold topics, properties, SUBSCRIBEs) waits for the others instead of stalling them.
    """


CONTINUE = Continue()


@dataclass(slots=True)
class RateCheck:
    """The client sent what its publish rate allowed so far: charge the rate limiter with the session's
    ``stats.msgs_in`` / ``stats.bytes_in``, then call ``Session.allow_publishes`` (at once, or once the
    tokens refill: the session holds the rest of the client's bytes and stops reading it meanwhile)."""


RATE_CHECK = RateCheck()

Action = Authenticate | OpenUpstream | Close | CheckAccess | Continue | RateCheck


@dataclass(slots=True)
class AuthResult:
    """Outcome of authentication: an access policy bound to the identity, or a refusal."""

    ok: bool
    username: str | None = None  # the authenticated identity (None = anonymous)
    policy: AccessPolicy | None = None
    team: str | None = None
    bad_credentials: bool = False  # refusal reason: wrong credentials vs. not allowed at all
    quota_exceeded: bool = False  # refusal reason: the team has all the connections it may have
    busy: bool = False  # refusal reason: too many password checks queued (try again later)
    unavailable: bool = False  # refusal reason: the deciding backend (the platform) did not answer
    client_id_rejected: bool = False  # refusal reason: the client id breaks ``client_id_rule`` (nobody was asked)
    client_id_rule: ClientIdRule = ClientIdRule.PREFIX
    # Topics of this client live under this prefix upstream (its team's space); "" = not mounted.
    mountpoint: str = ""
    expires_at: float | None = None  # time.time() at which the session must end (a JWT's exp; broker.auth.jwt)
    recheck: object = None  # opaque to the session: what broker.admission needs to check the credentials again


DEFAULT_LIMITS = DecodeLimits()


@dataclass(slots=True)
class SessionSettings:
    max_packet_size: int = 1_048_576
    upstream_v5: bool = True  # False for the embedded MQTT 3.1.1-only broker
    upstream_username: str | None = None
    upstream_password: str | None = None
    disconnect_on_deny: bool = False
    upstream_label: str = "upstream"
    inventory: Inventory | None = None  # the process's topic inventory (None: off)
    # Work budgets (limits.*): what one packet may make the decoder build, and one read the session do.
    max_connect_size: int = 16_384  # the CONNECT, read before authentication
    decode_limits: DecodeLimits = DEFAULT_LIMITS
    max_alias_topic_length: int = 1_024  # a topic alias stands for at most this many bytes
    max_subscriptions: int = 10_000
    work_budget: int = 65_536  # cost units (about bytes decoded) of one read before the rest waits a turn

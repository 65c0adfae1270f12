"""The topic inventory per team: every topic a team publishes to, counted, bounded, never a payload.

For each team, each topic its clients published to (and the session let through): the messages,
their bytes (whole PUBLISH packets, as ``Stats.bytes_in``), when it was last seen, whether it was
ever published retained and, sampled from its first few messages, the kind of payload it carries
(JSON with its top-level object keys, text, binary). No payload and no value from one is kept,
only JSON object keys (at most :data:`KEYS_MAX`, each cut to :data:`KEY_CHARS` characters).

The cost on the hot path is the point of the design. A session calls :meth:`Inventory.entry`
only where it already does slow work (its fast-path cache miss: the full decode and ACL check),
counts that message and samples its payload there, and keeps the returned :class:`TopicEntry`
as the value of its cache of allowed topics once ``samples_left`` is 0 (so the first few messages
of a new topic take the slow path). Every later PUBLISH on that topic costs two increments::

    entry = cache.get(topic)          # instead of ``topic in cache``
    if entry is not None:
        entry.messages += 1
        entry.bytes += end - start

(bench/inventory_cost.py measures it. A fast path that samples too adds ``if entry.samples_left:
entry.sample_publish(chunk, start, end, v5)``.)

No clock is read per message. The I/O layer calls :meth:`Inventory.tick` once a second with
the monotonic and the wall time; a tick *refreshes* some teams (all of them while the inventory
holds at most ``scan_per_tick`` topics, else in turn): an entry whose count moved since the
previous refresh was seen in that tick. ``last_seen`` is therefore as precise as the refresh
period of its team (one tick while the inventory holds at most ``scan_per_tick`` topics), and a
snapshot refreshes its team first.

Bounds: ``max_topics_per_team`` entries per team (the least recently seen go first, a 1/64th of
the team at a time so that a team publishing to ever new topics pays an O(n) pass only every
n/64 new topics), entries unseen for ``ttl`` seconds expire, ``max_teams`` teams (the least
recently seen team goes, all its topics with it). Recency is as of the last refresh (one tick).
An entry takes about 300 bytes (bench/inventory_cost.py): ``max_teams * max_topics_per_team``
entries at most.

Detached entries: an entry evicted or expired while a session still holds it (in its fast-path
cache) is not lost. The inventory keeps a *weak* reference to it, so nothing is kept alive for
it; once the session publishes on it again it is attached again, at the next tick (or sooner,
when :meth:`entry` meets its topic or a snapshot its team), counting from the messages that
brought it back, as a topic met anew would (it keeps its retained flag and payload kind). The
session never needs to know: its increments on a detached entry corrupt nothing, and are counted
once the entry is back. There is never more than one entry of a team's topic in the inventory.
No I/O here: pure Python, driven by the I/O layer's calls.
"""

from __future__ import annotations

import builtins
import heapq
import json
from collections import deque
from collections.abc import Iterable
from operator import attrgetter
from typing import NamedTuple
from weakref import WeakValueDictionary

from broker.mqtt.errors import ProtocolError
from broker.mqtt.packets import decode_publish

KEYS_MAX = 32  # JSON object keys kept per topic
KEY_CHARS = 64  # characters kept of each key
SAMPLE_BYTES = 16_384  # a payload is classified from its first SAMPLE_BYTES (a longer JSON document is "text")
SAMPLES = 3  # payloads sampled per topic, by default
TOPIC_CHARS = 1024  # a longer topic is recorded under its first TOPIC_CHARS characters and "…"

# Payload kinds, narrowest first: several samples report the widest (JSON is text, text is bytes).
KINDS = ("empty", "json", "text", "binary")
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}

_LAST_SEEN = attrgetter("last_seen")


class PayloadKind(NamedTuple):
    """What the sampled payloads of a topic were: never a value, only JSON object keys."""

    kind: str  # one of KINDS
    keys: tuple[str, ...] | None = None  # JSON object keys, sorted (kind "json" and an object seen)
    more_keys: bool = False  # there were more than KEYS_MAX keys

    def merge(self, other: PayloadKind) -> PayloadKind:
        """The kind of both samples: the wider kind; the union of the keys while both are JSON."""
        kind = self.kind if _RANK[self.kind] >= _RANK[other.kind] else other.kind
        if kind != "json":
            return PayloadKind(kind)
        if other.keys is None:  # no object in the other (or it was empty): these keys, if any
            return self if self.keys is not None else PayloadKind(kind)
        if self.keys is None:
            return other
        union = sorted(set(self.keys) | set(other.keys))
        return PayloadKind(kind, tuple(union[:KEYS_MAX]), self.more_keys or other.more_keys or len(union) > KEYS_MAX)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind}
        if self.keys is not None:
            out["keys"] = list(self.keys)
            out["more_keys"] = self.more_keys
        return out


def classify(payload: builtins.bytes, complete: bool = True) -> PayloadKind:
    """The kind of one payload (``complete=False``: only its first bytes, so never "json")."""
    if not payload:
        return PayloadKind("empty")
    try:
        text = payload.decode()
    except UnicodeDecodeError as exc:
        # A prefix may end inside a character: valid text up to there is still text.
        if complete or exc.reason != "unexpected end of data" or exc.start < len(payload) - 3:
            return PayloadKind("binary")
        text = ""
    if not complete:
        return PayloadKind("text")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return PayloadKind("text")
    if not isinstance(value, dict):
        return PayloadKind("json")
    keys = sorted({key[:KEY_CHARS] for key in value})
    return PayloadKind("json", tuple(keys[:KEYS_MAX]), len(keys) > KEYS_MAX)


def merge_snapshots(snapshots: Iterable[list[dict[str, object]]]) -> list[dict[str, object]]:
    """One team's snapshots from several worker processes as one: counts added, the latest last_seen."""
    merged: dict[object, dict[str, object]] = {}
    for snapshot in snapshots:
        for row in snapshot:
            into = merged.get(row["topic"])
            if into is None:
                merged[row["topic"]] = dict(row)
                continue
            for field in ("messages", "bytes"):
                into[field] = _int(into[field]) + _int(row[field])
            into["last_seen"] = max(_float(into["last_seen"]), _float(row["last_seen"]))
            into["retained"] = bool(into["retained"] or row["retained"])
            mine, theirs = _payload(into["payload"]), _payload(row["payload"])
            kind = theirs if mine is None else mine if theirs is None else mine.merge(theirs)
            into["payload"] = kind.as_dict() if kind is not None else None
    return [merged[topic] for topic in sorted(merged, key=str)]


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _payload(value: object) -> PayloadKind | None:
    if not isinstance(value, dict) or value.get("kind") not in _RANK:
        return None
    keys = value.get("keys")
    return PayloadKind(
        str(value["kind"]), tuple(map(str, keys)) if isinstance(keys, list) else None, bool(value.get("more_keys"))
    )


class TopicEntry:
    """One topic of one team. The session increments ``messages`` and ``bytes``; nothing else writes them.

    ``attached`` is False while the entry is out of the inventory (evicted or expired): the
    session's increments then wait for it to be attached again (see the module docstring).
    """

    __slots__ = (
        "__weakref__",
        "_bytes_mark",
        "_mark",
        "attached",
        "bytes",
        "last_seen",
        "messages",
        "payload",
        "retained",
        "samples_left",
        "topic",
    )

    def __init__(self, topic: str, samples: int = SAMPLES, now: float = 0.0) -> None:
        self.topic = topic
        self.messages = 0
        self.bytes = 0
        self.retained = False
        self.samples_left = samples
        self.payload: PayloadKind | None = None
        self.last_seen = now  # the inventory's monotonic time of the refresh that saw it
        self.attached = False
        self._mark = 0  # messages at the last refresh (a refresh that sees more stamps last_seen)
        self._bytes_mark = 0  # bytes when it was detached

    def sample(self, chunk: builtins.bytes, start: int = 0, end: int | None = None) -> None:
        """Classify ``chunk[start:end]`` (a payload), if samples are left. Keeps no part of it."""
        if self.samples_left <= 0:
            return
        self.samples_left -= 1
        stop = len(chunk) if end is None else end
        complete = stop - start <= SAMPLE_BYTES
        kind = classify(chunk[start : stop if complete else start + SAMPLE_BYTES], complete)
        self.payload = kind if self.payload is None else self.payload.merge(kind)

    def sample_publish(self, chunk: builtins.bytes, start: int, end: int, v5: bool) -> None:
        """Sample the payload of the PUBLISH at ``chunk[start:end]`` (for the fast path, which has not decoded it)."""
        try:
            payload_start = decode_publish(chunk, start, end, v5).payload_start
        except ProtocolError:
            self.samples_left -= 1  # not retried on every message; the session deals with the packet
            return
        self.sample(chunk, payload_start, end)

    def __repr__(self) -> str:
        state = "" if self.attached else ", detached"
        return f"TopicEntry({self.topic!r}, messages={self.messages}, bytes={self.bytes}{state})"


class _Team:
    __slots__ = ("last_seen", "name", "refreshed", "topics")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.topics: dict[str, TopicEntry] = {}
        self.last_seen = now  # the latest last_seen of its entries, or when it was met
        self.refreshed = now


class Inventory:
    """Every team's topics. One per process; the sessions share it (see the module docstring).

    ``now`` and ``wall`` are the monotonic and wall times of the last :meth:`tick`.
    """

    __slots__ = (
        "_limbo",
        "_teams",
        "_turns",
        "evictions",
        "expirations",
        "max_teams",
        "max_topics_per_team",
        "now",
        "reattached",
        "samples",
        "scan_per_tick",
        "team_evictions",
        "ttl",
        "wall",
    )

    def __init__(
        self,
        max_topics_per_team: int = 5000,
        ttl: float = 86400.0,
        max_teams: int = 1000,
        samples: int = SAMPLES,
        scan_per_tick: int = 50_000,
        monotonic: float = 0.0,
        wall: float = 0.0,
    ) -> None:
        if max_topics_per_team < 1 or max_teams < 1 or ttl <= 0 or scan_per_tick < 1:
            raise ValueError("inventory bounds must be positive")
        self.max_topics_per_team = max_topics_per_team
        self.ttl = ttl
        self.max_teams = max_teams
        self.samples = max(0, samples)
        self.scan_per_tick = scan_per_tick
        self.now = monotonic
        self.wall = wall
        self._teams: dict[str, _Team] = {}
        self._turns: deque[_Team] = deque()  # teams in refresh order (a removed team is dropped when met)
        # Detached entries some session may still hold, by team then topic: weak, so they cost nothing once dropped.
        self._limbo: dict[str, WeakValueDictionary[str, TopicEntry]] = {}
        self.evictions = 0  # entries evicted by the per-team bound (teams evicted: team_evictions)
        self.expirations = 0  # entries expired by the ttl
        self.team_evictions = 0
        self.reattached = 0  # detached entries a session published on again

    # ------------------------------------------------------------------ the session's calls

    def entry(self, team: str, topic: str, retained: bool) -> TopicEntry:
        """The entry of ``team``'s ``topic`` (made if new), marked retained if ``retained``.

        For the slow path: the caller counts the message itself (``messages += 1``, ``bytes += n``)
        and keeps the entry for the fast path. Call it again whenever the topic is met again on the
        slow path: it is a dict lookup, and gives back the one attached entry.
        """
        t = self._teams.get(team)
        if t is None:
            t = self._new_team(team)
        t.last_seen = self.now
        if len(topic) > TOPIC_CHARS:
            topic = topic[:TOPIC_CHARS] + "…"
        e = t.topics.get(topic)
        if e is None:
            limbo = self._limbo.get(team)
            e = limbo.pop(topic, None) if limbo is not None else None
            if e is None:
                e = TopicEntry(topic, self.samples, self.now)
            else:
                self.reattached += 1
            self._attach(t, e)
        if retained:
            e.retained = True
        return e

    # ------------------------------------------------------------------ the I/O layer's calls

    def tick(self, monotonic: float, wall: float) -> None:
        """Once a second: the new times; detached entries published on again come back; some teams are refreshed."""
        if monotonic > self.now:
            self.now = monotonic
        self.wall = wall
        # The detached entries some session holds, in turn (long-lived clients may hold many idle ones).
        limbos = self._limbo
        budget = self.scan_per_tick
        for name in list(limbos):
            if budget <= 0:
                break
            budget -= len(limbos[name]) + 1
            self._revive(name)
            if name in limbos:
                limbos[name] = limbos.pop(name)  # to the end: the next tick starts with the others
        # Then the teams, in turn.
        turns = self._turns
        budget = self.scan_per_tick
        for _ in range(len(turns)):
            if budget <= 0:
                break
            t = turns.popleft()
            if self._teams.get(t.name) is not t:
                continue  # removed (evicted or emptied) since
            budget -= len(t.topics) + 1
            self._refresh(t)
            if t.topics:
                turns.append(t)
            else:
                del self._teams[t.name]

    def snapshot(self, team: str) -> list[dict[str, object]]:
        """``team``'s topics for the admin API, sorted by topic (refreshed first: exact to the tick)."""
        self._revive(team)
        t = self._teams.get(team)
        if t is None:
            return []
        self._refresh(t)
        if not t.topics:
            del self._teams[team]
            return []
        now, wall = self.now, self.wall
        return [
            {
                "topic": e.topic,
                "messages": e.messages,
                "bytes": e.bytes,
                "last_seen": wall - (now - e.last_seen),  # unix time
                "retained": e.retained,
                "payload": e.payload.as_dict() if e.payload is not None else None,
            }
            for e in sorted(t.topics.values(), key=attrgetter("topic"))
        ]

    def teams(self) -> list[str]:
        """The teams holding topics, sorted."""
        return sorted(self._teams)

    def count(self, team: str) -> int:
        """How many topics ``team`` holds (no refresh)."""
        t = self._teams.get(team)
        return len(t.topics) if t is not None else 0

    def stats(self) -> dict[str, int]:
        """Counters for metrics: sizes now, evictions and expirations since start."""
        return {
            "teams": len(self._teams),
            "topics": sum(len(t.topics) for t in self._teams.values()),
            "detached": sum(len(limbo) for limbo in self._limbo.values()),
            "evictions": self.evictions,
            "expirations": self.expirations,
            "team_evictions": self.team_evictions,
            "reattached": self.reattached,
        }

    # ------------------------------------------------------------------ bounds

    def _new_team(self, name: str) -> _Team:
        teams = self._teams
        if len(teams) >= self.max_teams:
            self._evict_team()
        t = teams[name] = _Team(name, self.now)
        self._turns.append(t)
        return t

    def _evict_team(self) -> None:
        """The least recently seen team goes; a few candidates are refreshed first (their stamps may be old)."""
        teams = self._teams
        for _ in range(4):
            victim = min(teams.values(), key=_LAST_SEEN)
            if victim.refreshed >= self.now:
                break
            self._refresh(victim)
            if not victim.topics:
                del teams[victim.name]  # it expired whole: that made the room
                return
            if victim.last_seen < self.now:
                break  # idle since its last stamp: the least recently seen indeed
        self.team_evictions += 1
        self._remove_team(victim)

    def _attach(self, t: _Team, e: TopicEntry) -> None:
        """Put ``e`` into ``t``, seen now, making room first; an entry back from limbo counts from its return."""
        if len(t.topics) >= self.max_topics_per_team:
            self._evict_topics(t)
        e.messages -= e._mark  # its messages since it left (a new entry: 0 - 0)
        e.bytes -= e._bytes_mark
        e._mark = e.messages  # ... seen now: not stamped again by the next refresh unless it counts more
        e._bytes_mark = 0
        e.last_seen = self.now
        e.attached = True
        t.topics[e.topic] = e

    def _evict_topics(self, t: _Team) -> None:
        if t.refreshed < self.now:
            self._refresh(t)  # stamp what was seen since: the victims are really the least recently seen
        topics = t.topics
        excess = len(topics) - self.max_topics_per_team + 1
        if excess <= 0:
            return  # the refresh expired enough (an emptied team stays until the next tick: t is in use)
        count = max(excess, len(topics) >> 6)
        for e in heapq.nsmallest(count, topics.values(), key=_LAST_SEEN):
            self._detach(t, e)
        self.evictions += count

    def _detach(self, t: _Team, e: TopicEntry) -> None:
        del t.topics[e.topic]
        e.attached = False
        e._mark = e.messages
        e._bytes_mark = e.bytes
        limbo = self._limbo.get(t.name)
        if limbo is None:
            limbo = self._limbo[t.name] = WeakValueDictionary()
        limbo[e.topic] = e

    def _remove_team(self, t: _Team) -> None:
        for e in list(t.topics.values()):
            self._detach(t, e)
        del self._teams[t.name]

    def _refresh(self, t: _Team) -> None:
        """Stamp ``t``'s entries counted since the last refresh as seen now; expire those unseen for ttl."""
        now = self.now
        cutoff = now - self.ttl
        seen = False
        expired: list[TopicEntry] = []
        for e in t.topics.values():
            if e.messages != e._mark:
                e._mark = e.messages
                e.last_seen = now
                seen = True
            elif e.last_seen < cutoff:
                expired.append(e)
        t.refreshed = now
        if seen:
            t.last_seen = now
        if expired:
            self.expirations += len(expired)
            for e in expired:
                self._detach(t, e)

    def _revive(self, name: str) -> None:
        """Attach again the detached entries of team ``name`` that a session published on since."""
        limbo = self._limbo.get(name)
        if limbo is None:
            return
        for e in [e for e in list(limbo.values()) if e.messages != e._mark]:
            t = self._teams.get(name)
            if t is None:
                t = self._new_team(name)
            if e.topic in t.topics:
                continue  # cannot happen: entry() takes a topic out of limbo before making a new one
            del limbo[e.topic]
            self._attach(t, e)  # may evict others of the team: into this same limbo
            t.last_seen = self.now
            self.reattached += 1
        if not limbo:
            del self._limbo[name]

"""The topic inventory per team (broker/session/inventory.py): counts, bounds, payload kinds, detached entries."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mqtt.packets import encode_publish
from broker.session.inventory import (
    KEY_CHARS,
    KEYS_MAX,
    SAMPLE_BYTES,
    TOPIC_CHARS,
    Inventory,
    PayloadKind,
    TopicEntry,
    classify,
    merge_snapshots,
)

T0, WALL0 = 1000.0, 1_700_000_000.0


class FakeSession:
    """What the session does: entry() on its cache miss, then two increments per message on the cached entry.

    A topic is cached (the fast path) once its samples are taken, as the session is told to do.
    """

    def __init__(self, inventory: Inventory, team: str) -> None:
        self.inventory = inventory
        self.team = team
        self.cache: dict[tuple[str, bool], TopicEntry] = {}  # the session's two allowed-topic caches
        self.slow = 0

    def publish(self, topic: str, size: int, retained: bool = False, payload: bytes = b"x") -> TopicEntry:
        entry = self.cache.get((topic, retained))
        if entry is None:  # the full path
            self.slow += 1
            entry = self.inventory.entry(self.team, topic, retained)
            entry.messages += 1
            entry.bytes += size
            if entry.samples_left:
                entry.sample(payload)
            if not entry.samples_left:
                self.cache[(topic, retained)] = entry
            return entry
        entry.messages += 1  # the fast path
        entry.bytes += size
        return entry


def inventory(**kwargs: Any) -> Inventory:
    """An inventory at T0 / WALL0; no payload sampling unless asked (so FakeSession caches at once)."""
    kwargs.setdefault("samples", 0)
    return Inventory(monotonic=T0, wall=WALL0, **kwargs)


def tick(inv: Inventory, at: float) -> None:
    inv.tick(T0 + at, WALL0 + at)


def rows(inv: Inventory, team: str) -> dict[str, dict[str, object]]:
    return {str(row["topic"]): row for row in inv.snapshot(team)}


# ------------------------------------------------------------------ counts


def test_exact_counts_and_bytes_after_known_traffic() -> None:
    inv = inventory()
    a, b = FakeSession(inv, "team1"), FakeSession(inv, "team1")
    for _ in range(10):
        a.publish("sensors/t", 100)
    for _ in range(5):
        b.publish("sensors/t", 40)
        b.publish("sensors/h", 7)
    FakeSession(inv, "team2").publish("sensors/t", 1)
    tick(inv, 1)
    got = rows(inv, "team1")
    assert (got["sensors/t"]["messages"], got["sensors/t"]["bytes"]) == (15, 10 * 100 + 5 * 40)
    assert (got["sensors/h"]["messages"], got["sensors/h"]["bytes"]) == (5, 35)
    assert [row["messages"] for row in inv.snapshot("team2")] == [1]
    assert inv.teams() == ["team1", "team2"]
    assert a.slow + b.slow < 15 + 5 + 5  # most went the fast path, on the one shared entry
    assert a.cache[("sensors/t", False)] is b.cache[("sensors/t", False)]


def test_retained_is_ever_retained() -> None:
    inv = inventory()
    s = FakeSession(inv, "team1")
    s.publish("plain", 1)
    s.publish("state", 1, retained=True)
    s.publish("state", 1, retained=False)  # the other cache: the same entry, still retained
    s.publish("later", 1)
    s.publish("later", 1, retained=True)
    got = rows(inv, "team1")
    assert {topic: row["retained"] for topic, row in got.items()} == {"later": True, "plain": False, "state": True}
    assert got["state"]["messages"] == 2


def test_snapshot_format_sorted_with_wall_clock() -> None:
    inv = inventory(samples=3)
    s = FakeSession(inv, "team1")
    s.publish("b/topic", 10, payload=b'{"temp": 21.5, "id": "x"}')
    tick(inv, 1)
    tick(inv, 2)
    s.publish("a/topic", 20, payload=b"hello")
    s.publish("b/topic", 10, payload=b"{}")
    tick(inv, 3)
    snapshot = inv.snapshot("team1")
    assert [row["topic"] for row in snapshot] == ["a/topic", "b/topic"]
    assert snapshot[1] == {
        "topic": "b/topic",
        "messages": 2,
        "bytes": 20,
        "last_seen": WALL0 + 3,  # counted again before the tick at 3
        "retained": False,
        "payload": {"kind": "json", "keys": ["id", "temp"], "more_keys": False},
    }
    assert snapshot[0]["last_seen"] == WALL0 + 3 and snapshot[0]["payload"] == {"kind": "text"}
    json.dumps(snapshot)  # the admin API serialises it as is
    assert inv.snapshot("nobody") == []


def test_last_seen_without_a_clock_per_message() -> None:
    inv = inventory()
    s = FakeSession(inv, "team1")
    s.publish("t", 1)
    tick(inv, 1)
    assert rows(inv, "team1")["t"]["last_seen"] == WALL0 + 1  # the refresh after a message stamps it
    tick(inv, 5)
    s.publish("t", 1)  # counted between ticks: seen in the next refresh
    s.publish("t", 1)
    tick(inv, 6)
    tick(inv, 30)  # idle since
    assert rows(inv, "team1")["t"]["last_seen"] == WALL0 + 6
    s.publish("t", 1)
    assert rows(inv, "team1")["t"]["last_seen"] == WALL0 + 30  # a snapshot refreshes its team first


def test_refresh_in_turns_under_a_small_budget() -> None:
    inv = inventory(scan_per_tick=3, samples=0)
    sessions = [FakeSession(inv, f"team{i}") for i in range(4)]
    for s in sessions:
        s.publish("t", 1)
        s.publish("u", 1)
    for s in sessions:
        s.publish("t", 1)  # to be stamped by the refreshes below
    stamped = []
    for at in range(1, 5):
        tick(inv, at)
        stamped.append(sorted(i for i, s in enumerate(sessions) if s.cache[("t", False)].last_seen == T0 + at))
    assert stamped == [[0], [1], [2], [3]]  # one team (2 topics + 1 > 3 - 2) per tick, each in turn


# ------------------------------------------------------------------ bounds


def test_lru_bound_per_team_evicts_the_least_recently_seen() -> None:
    inv = inventory(max_topics_per_team=3)
    s = FakeSession(inv, "team1")
    for at, topic in enumerate(["a", "b", "c"], start=1):
        s.publish(topic, 1)
        tick(inv, at)
    s.publish("a", 1)  # a is seen again; b is now the least recently seen
    tick(inv, 4)
    s.publish("d", 1)
    assert sorted(rows(inv, "team1")) == ["a", "c", "d"]
    s.publish("c", 1)  # seen since the last tick: the eviction refreshes first, so a goes, not c
    tick(inv, 5)
    s.publish("c", 1)
    s.publish("e", 1)
    assert sorted(rows(inv, "team1")) == ["c", "d", "e"]
    assert inv.stats()["evictions"] == 2
    assert inv.count("team1") == 3


def test_bound_holds_for_a_team_publishing_to_ever_new_topics() -> None:
    inv = inventory(max_topics_per_team=200)
    s = FakeSession(inv, "team1")
    for i in range(2000):
        if i % 100 == 0:
            tick(inv, i / 100)
        s.publish(f"device/{i}", 1)
        assert inv.count("team1") <= 200
    assert "device/1999" in rows(inv, "team1")
    assert inv.stats()["evictions"] >= 1800


def test_ttl_expiry() -> None:
    inv = inventory(ttl=10)
    s = FakeSession(inv, "team1")
    s.publish("old", 1)
    tick(inv, 1)
    tick(inv, 5)
    s.publish("new", 1)
    tick(inv, 6)
    tick(inv, 11)
    assert sorted(rows(inv, "team1")) == ["new", "old"]
    tick(inv, 11.5)  # old: last seen at 1, more than ttl ago
    assert sorted(rows(inv, "team1")) == ["new"]
    tick(inv, 17)
    assert inv.snapshot("team1") == [] and inv.teams() == []
    assert inv.stats()["expirations"] == 2


def test_team_bound_evicts_the_least_recently_seen_team() -> None:
    inv = inventory(max_teams=2)
    a, b = FakeSession(inv, "a"), FakeSession(inv, "b")
    a.publish("t", 1)
    tick(inv, 1)
    b.publish("t", 1)
    tick(inv, 2)
    a.publish("t", 1)  # a is the more recent now
    tick(inv, 3)
    FakeSession(inv, "c").publish("t", 1)
    assert inv.teams() == ["a", "c"]
    assert inv.stats()["team_evictions"] == 1
    assert len(inv.teams()) <= 2


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Inventory(max_topics_per_team=0)
    with pytest.raises(ValueError):
        Inventory(ttl=0)


def test_long_topics_are_cut() -> None:
    inv = inventory()
    FakeSession(inv, "team1").publish("x" * 5000, 1)
    (topic,) = rows(inv, "team1")
    assert topic == "x" * TOPIC_CHARS + "…"


# ------------------------------------------------------------------ detached entries


def test_evicted_entry_held_by_a_session_comes_back_counting_from_its_return() -> None:
    inv = inventory(max_topics_per_team=2)
    holder, other = FakeSession(inv, "team1"), FakeSession(inv, "team1")
    for _ in range(5):
        holder.publish("held", 10)
    tick(inv, 1)
    other.publish("x", 1)
    tick(inv, 2)
    other.publish("y", 1)  # the team is full: held, the least recently seen, is evicted
    held = holder.cache[("held", False)]
    assert not held.attached and "held" not in rows(inv, "team1")
    for _ in range(3):
        holder.publish("held", 10)  # the session does not know: its fast path goes on counting
    tick(inv, 3)
    got = rows(inv, "team1")
    assert (got["held"]["messages"], got["held"]["bytes"], got["held"]["last_seen"]) == (3, 30, WALL0 + 3)
    assert held.attached and inv.count("team1") == 2  # back, and another topic made room
    assert inv.stats()["reattached"] == 1


def test_entry_meets_a_detached_topic_and_gives_back_the_same_object() -> None:
    inv = inventory(ttl=10)
    holder = FakeSession(inv, "team1")
    entry = holder.publish("t", 1)
    tick(inv, 1)
    tick(inv, 12)
    assert not entry.attached and inv.snapshot("team1") == []
    assert inv.stats()["detached"] == 1
    again = FakeSession(inv, "team1").publish("t", 4)  # another session's slow path
    assert again is entry and entry.attached
    assert rows(inv, "team1")["t"]["messages"] == 1
    holder.publish("t", 1)
    assert rows(inv, "team1")["t"]["messages"] == 2


def test_detached_entry_nobody_holds_is_forgotten() -> None:
    inv = inventory(ttl=10)
    FakeSession(inv, "team1").publish("t", 1)  # the session is gone at once
    tick(inv, 1)
    tick(inv, 12)
    gc.collect()
    assert inv.stats()["detached"] == 0
    assert inv.stats()["teams"] == 0


def test_evicted_team_comes_back_when_its_sessions_publish() -> None:
    inv = inventory(max_teams=1)
    a = FakeSession(inv, "a")
    a.publish("t", 1)
    tick(inv, 1)
    FakeSession(inv, "b").publish("t", 1)  # a evicted
    assert inv.teams() == ["b"]
    a.publish("t", 1)
    tick(inv, 2)  # a's entry published on: a comes back (b goes: one team)
    assert inv.teams() == ["a"]
    assert rows(inv, "a")["t"]["messages"] == 1


def test_detached_entries_come_back_in_turns_under_a_small_budget() -> None:
    inv = inventory(ttl=5, scan_per_tick=1)
    holders = [FakeSession(inv, f"team{i}") for i in range(3)]
    for h in holders:
        h.publish("t", 1)
    for at in range(1, 12):
        tick(inv, at)
    assert inv.teams() == [] and inv.stats()["detached"] == 3
    for h in holders:
        h.publish("t", 1)
    for at in range(12, 16):
        tick(inv, at)
    assert inv.teams() == ["team0", "team1", "team2"]
    assert all(h.cache[("t", False)].attached for h in holders)


def test_idle_detached_entry_stays_out() -> None:
    inv = inventory(ttl=10)
    holder = FakeSession(inv, "team1")
    holder.publish("t", 1)
    tick(inv, 1)
    tick(inv, 12)
    tick(inv, 13)
    assert inv.snapshot("team1") == []
    assert holder.cache[("t", False)].messages == 1  # the session's entry is untouched: nothing corrupted


# ------------------------------------------------------------------ payload kinds


def test_payload_kinds() -> None:
    assert classify(b'{"b": 1, "a": {"nested": 2}}') == PayloadKind("json", ("a", "b"))
    assert classify(b"[1, 2]") == PayloadKind("json")
    assert classify(b"42") == PayloadKind("json")
    assert classify(b"hello world") == PayloadKind("text")
    assert classify(b"{not json") == PayloadKind("text")  # invalid JSON that is UTF-8
    assert classify("température".encode()) == PayloadKind("text")
    assert classify(b"\xff\xfe\x00") == PayloadKind("binary")
    assert classify(b"") == PayloadKind("empty")
    assert classify(b"[" * 100_000) == PayloadKind("text")  # too deep for the parser: not JSON, still text


def test_json_keys_are_bounded() -> None:
    many = {f"k{i:03}": i for i in range(100)}
    kind = classify(json.dumps(many).encode())
    assert kind.keys is not None and len(kind.keys) == KEYS_MAX and kind.more_keys
    assert kind.keys == tuple(sorted(many)[:KEYS_MAX])
    long = classify(json.dumps({"x" * 500: 1}).encode())
    assert long.keys == ("x" * KEY_CHARS,)


def test_values_are_never_kept() -> None:
    inv = inventory(samples=3)
    FakeSession(inv, "team1").publish("t", 1, payload=b'{"password": "hunter2", "n": [1, 2]}')
    text = json.dumps(inv.snapshot("team1"))
    assert "hunter2" not in text and "password" in text


def test_sampling_stops_after_k_and_merges_to_the_widest_kind() -> None:
    inv = inventory(samples=3)
    s = FakeSession(inv, "team1")
    s.publish("t", 1, payload=b'{"a": 1}')
    s.publish("t", 1, payload=b'{"b": 1}')
    assert rows(inv, "team1")["t"]["payload"] == {"kind": "json", "keys": ["a", "b"], "more_keys": False}
    s.publish("t", 1, payload=b"plain")  # the third and last sample: JSON and text are text
    entry = s.publish("t", 1, payload=b"\xff")  # not sampled any more
    assert entry.samples_left == 0 and s.slow == 3  # cached for the fast path after its samples
    assert rows(inv, "team1")["t"]["payload"] == {"kind": "text"}
    assert PayloadKind("empty").merge(PayloadKind("json", ("k",))) == PayloadKind("json", ("k",))
    assert PayloadKind("json").merge(PayloadKind("empty")) == PayloadKind("json")
    assert PayloadKind("text").merge(PayloadKind("binary")) == PayloadKind("binary")


def test_sampling_off() -> None:
    inv = inventory(samples=0)
    s = FakeSession(inv, "team1")
    s.publish("t", 1, payload=b"{}")
    assert rows(inv, "team1")["t"]["payload"] is None and s.slow == 1


def test_large_payloads_are_classified_from_their_start() -> None:
    entry = TopicEntry("t", 1)
    big_json = json.dumps({"k": "é" * SAMPLE_BYTES}).encode()
    entry.sample(big_json)
    assert entry.payload == PayloadKind("text")  # cut inside a character: still text, not parsed as JSON
    entry = TopicEntry("t", 1)
    entry.sample(b"\x00\xff" * SAMPLE_BYTES)
    assert entry.payload == PayloadKind("binary")


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("qos", [0, 1])
def test_sample_publish_reads_the_payload_of_a_packet(v5: bool, qos: int) -> None:
    packet = b"junk" + encode_publish(qos, False, False, "a/b", 7 if qos else 0, {} if v5 else None, b'{"z": 0}')
    entry = TopicEntry("a/b", 2)
    entry.sample_publish(packet, 4, len(packet), v5)
    assert entry.payload == PayloadKind("json", ("z",)) and entry.samples_left == 1
    entry.sample_publish(b"\x30\x01\x00", 0, 3, v5)  # malformed: one sample spent, nothing learnt
    assert entry.samples_left == 0 and entry.payload == PayloadKind("json", ("z",))


# ------------------------------------------------------------------ workers, metrics


def test_merge_snapshots_of_worker_processes() -> None:
    one, two = inventory(samples=3), inventory(samples=3)
    FakeSession(one, "team1").publish("t", 10, payload=b'{"a": 1}')
    FakeSession(two, "team1").publish("t", 5, retained=True, payload=b'{"b": 1}')
    FakeSession(two, "team1").publish("u", 1)
    tick(two, 4)
    merged = merge_snapshots([one.snapshot("team1"), two.snapshot("team1")])
    assert [row["topic"] for row in merged] == ["t", "u"]
    t = merged[0]
    assert (t["messages"], t["bytes"], t["retained"], t["last_seen"]) == (2, 15, True, WALL0 + 4)
    assert t["payload"] == {"kind": "json", "keys": ["a", "b"], "more_keys": False}


def test_stats() -> None:
    inv = inventory(max_topics_per_team=2)
    s = FakeSession(inv, "team1")
    for topic in "abc":
        s.publish(topic, 1)
    assert inv.stats() == {
        "teams": 1,
        "topics": 2,
        "detached": 1,  # a, held by the session
        "evictions": 1,
        "expirations": 0,
        "team_evictions": 0,
        "reattached": 0,
    }


# ------------------------------------------------------------------ against a reference model

TEAMS = st.sampled_from(["t1", "t2", "t3"])
TOPICS = st.sampled_from(["a", "b", "c/d", "e/f/g", "h"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.integers(0, 3), TEAMS, TOPICS, st.integers(0, 5000), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0.1, 5.0)),
        st.tuples(st.just("drop"), st.integers(0, 3)),  # a session's caches emptied (cache bound, expired allows)
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_counts_match_a_dict_model_when_no_bound_is_hit(ops: list[tuple[object, ...]]) -> None:
    inv = inventory()
    sessions = [{team: FakeSession(inv, team) for team in ("t1", "t2", "t3")} for _ in range(4)]
    model: dict[tuple[str, str], list[int]] = {}
    retained: dict[tuple[str, str], bool] = {}
    at = 0.0
    for op in ops:
        if op[0] == "pub":
            _, i, team, topic, size, retain = op
            assert isinstance(i, int) and isinstance(team, str) and isinstance(topic, str) and isinstance(size, int)
            sessions[i][team].publish(topic, size, bool(retain))
            counts = model.setdefault((team, topic), [0, 0])
            counts[0] += 1
            counts[1] += size
            retained[(team, topic)] = retained.get((team, topic), False) or bool(retain)
        elif op[0] == "tick":
            assert isinstance(op[1], float)
            at += op[1]
            tick(inv, at)
        else:
            assert isinstance(op[1], int)
            for s in sessions[op[1]].values():
                s.cache.clear()
    got = {(team, str(row["topic"])): row for team in inv.teams() for row in inv.snapshot(team)}
    assert {key: [row["messages"], row["bytes"]] for key, row in got.items()} == model
    assert {key: row["retained"] for key, row in got.items()} == retained


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 3), st.integers(1, 2), st.floats(1.0, 8.0))
def test_bounds_always_hold_and_held_entries_stay_consistent(
    ops: list[tuple[object, ...]], max_topics: int, max_teams: int, ttl: float
) -> None:
    inv = inventory(max_topics_per_team=max_topics, max_teams=max_teams, ttl=ttl)
    sessions = [{team: FakeSession(inv, team) for team in ("t1", "t2", "t3")} for _ in range(4)]
    at = 0.0
    for op in ops:
        if op[0] == "pub":
            _, i, team, topic, size, retain = op
            assert isinstance(i, int) and isinstance(team, str) and isinstance(topic, str) and isinstance(size, int)
            sessions[i][team].publish(topic, size, bool(retain))
        elif op[0] == "tick":
            assert isinstance(op[1], float)
            at += op[1]
            tick(inv, at)
        else:
            assert isinstance(op[1], int)
            for s in sessions[op[1]].values():
                s.cache.clear()
        assert len(inv.teams()) <= max_teams
        assert all(inv.count(team) <= max_topics for team in inv.teams())
        # An attached entry a session holds is the one the inventory has for its topic: never two of them.
        for by_team in sessions:
            for team, s in by_team.items():
                for entry in s.cache.values():
                    if entry.attached:
                        assert inv._teams[team].topics[entry.topic] is entry
    for team in inv.teams():
        for row in inv.snapshot(team):
            assert isinstance(row["messages"], int) and row["messages"] >= 0
            assert isinstance(row["bytes"], int) and row["bytes"] >= 0

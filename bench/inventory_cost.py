"""What the topic inventory (broker/session/inventory.py) costs: per message, per new topic, per tick.

    .venv/bin/python -m bench.inventory_cost

Per message, the session only increments two attributes of the TopicEntry it keeps as the value of
its allowed-topic cache. Measured two ways, best of several runs:

- in isolation: the fast path's cache test (``topic in cache``) against the same loop that gets the
  entry from the cache and counts the message;
- in a real established Session, fed reads the way bench/session_cost.py feeds them: the fast path
  as it was before the inventory (a copy, ``topic in cache``: BEFORE), the Session as built with the
  inventory off (the cache holds True) and on (it holds the topic's entry, which it counts). Runs
  alternate so that all see the same machine.

Then the cost of ``Inventory.entry`` on a miss (a new topic; a new topic in a full team, which
evicts), of a hit (the slow path meeting a known topic again), of ``tick`` over 5,000 topics x 100
teams (idle, and with 1 % of the topics published on), of a snapshot of a 5,000-topic team, and the
memory per entry. Prints markdown tables.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acl.cache import BoundedCache
from broker.session.inventory import Inventory, TopicEntry

REPEAT = 7
TEAMS = 100
TOPICS = 5000


def best(fn: Callable[[], float], repeat: int = REPEAT) -> float:
    return min(fn() for _ in range(repeat))


# ------------------------------------------------------------------ per message, in isolation


def isolated() -> tuple[float, float, float]:
    """ns per message: the cache test alone, the test plus the inventory's counting, the loop alone."""
    cache: BoundedCache[bytes, TopicEntry] = BoundedCache()
    topics = [f"ff/v1/team1/p/proj{i}/in/sensor".encode() for i in range(8)]
    for raw in topics:
        cache[raw] = TopicEntry(raw.decode(), 0)
    packets = [(topics[i % 8], 0, 90 + i % 8) for i in range(200_000)]

    def empty() -> float:
        t0 = time.perf_counter()
        for _topic, _start, _end in packets:
            pass
        return (time.perf_counter() - t0) / len(packets) * 1e9

    def test_only() -> float:
        t0 = time.perf_counter()
        for topic, _start, _end in packets:
            if topic in cache:
                pass
        return (time.perf_counter() - t0) / len(packets) * 1e9

    def counting() -> float:
        t0 = time.perf_counter()
        for topic, start, end in packets:
            entry = cache.get(topic)
            if entry is not None:
                entry.messages += 1
                entry.bytes += end - start
                if entry.samples_left:
                    pass
        return (time.perf_counter() - t0) / len(packets) * 1e9

    results = {"empty": float("inf"), "test": float("inf"), "count": float("inf")}
    for _ in range(REPEAT):
        results["empty"] = min(results["empty"], empty())
        results["test"] = min(results["test"], test_only())
        results["count"] = min(results["count"], counting())
    return results["test"], results["count"], results["empty"]


# ------------------------------------------------------------------ per message, in the session

# The fast path as it was before the inventory (``topic in cache``, values True), for the "before" column;
# the other columns are the Session as built, with the inventory off and on.
BEFORE = """
def _client_publish(self, chunk, start, end):
    stats = self.stats
    stats.msgs_in += 1
    stats.bytes_in += end - start
    v5 = self.v5
    topic = plain_publish_topic(chunk, start, end, v5)
    if topic is not None:
        first = chunk[start]
        if topic in (self._publish_ok_retained if first & 1 else self._publish_ok):
            if not first & 6:
                return None
            packet_id = publish_packet_id(chunk, start, len(topic))
            if packet_id:
                acks = self._acks
                acks.seq += 1
                acks.inflight[packet_id] = acks.seq
                return None
    return self._client_publish_full(chunk, start, end, v5)
"""


def in_session() -> tuple[list[str], list[tuple[str, list[float]]]]:
    """ns/packet client -> upstream: before the inventory, inventory off, inventory on (a known topic)."""
    from acl.engine import AclEngine
    from acl.identity import parse_identity
    from bench.session_cost import READS, TOPIC, USER, reads, run
    from broker.mqtt.packets import Connect, PacketType, encode_connack, encode_connect
    from broker.mqtt.peek import plain_publish_topic, publish_packet_id
    from broker.session import AuthResult, Session, SessionSettings
    from broker.session.core import FROM_CLIENT

    namespace = {"plain_publish_topic": plain_publish_topic, "publish_packet_id": publish_packet_id}
    exec(BEFORE, namespace)
    before = type("Before", (Session,), {"__slots__": (), "_client_publish": namespace["_client_publish"]})
    before_table = tuple(before._client_publish if t == PacketType.PUBLISH else h for t, h in enumerate(FROM_CLIENT))
    inventory = Inventory()
    classes: list[tuple[str, type[Session], tuple[object, ...], Inventory | None]] = [
        ("before the inventory", before, before_table, None),
        ("inventory off", Session, FROM_CLIENT, None),
        ("**inventory on**", Session, FROM_CLIENT, inventory),
    ]

    def established(cls: type[Session], table: tuple[object, ...], inv: Inventory | None, v5: bool) -> Session:
        policy = AclEngine([], "flowfuse").for_client(parse_identity(USER), f"{USER}:n")
        settings = SessionSettings(upstream_username="front", upstream_password="pw", inventory=inv)
        s = cls(settings, peer="bench")
        s.receive_client(encode_connect(Connect(5 if v5 else 4, True, 60, f"{USER}:n", username=USER, password=b"x")))
        s.take_actions()
        s.auth_done(AuthResult(True, USER, policy, "team1"))
        s.take_actions()
        s.upstream_connected()
        s.receive_upstream(encode_connack(v5, False, 0))
        s.data_to_client()
        s.data_to_upstream()
        s._client_table = table
        if inv is None:
            s._publish_ok[TOPIC.encode()] = True
        else:
            entry = inv.entry("team1", TOPIC, False)
            entry.samples_left = 0
            s._publish_ok[TOPIC.encode()] = entry
        return s

    rows = []
    for v5 in (False, True):
        for qos in (0, 1):
            data = reads(v5, qos, TOPIC)
            results = [float("inf")] * len(classes)
            for _ in range(REPEAT):
                for i, (_, cls, table, inv) in enumerate(classes):  # alternating: the same machine state for all
                    s = established(cls, table, inv, v5)
                    results[i] = min(results[i], run(s.receive_client, s.data_to_upstream, data))
            rows.append((f"MQTT {'5' if v5 else '3.1.1'} QoS {qos}", results))
    assert inventory.entry("team1", TOPIC, False).messages >= READS * 4  # the inventory really counted
    return [name for name, _, _, _ in classes], rows


# ------------------------------------------------------------------ entry(), tick(), snapshot()


def filled(teams: int = TEAMS, topics: int = TOPICS) -> tuple[Inventory, list[list[TopicEntry]]]:
    inv = Inventory(max_topics_per_team=topics, max_teams=teams, scan_per_tick=10**9, monotonic=1.0, wall=1e9)
    held = [
        [inv.entry(f"team{j}", f"ff/v1/team{j}/p/proj{i % 50}/out/dev{i}", False) for i in range(topics)]
        for j in range(teams)
    ]
    return inv, held


def entry_costs() -> dict[str, float]:
    out: dict[str, float] = {}

    def miss() -> float:
        inv = Inventory(max_topics_per_team=TOPICS, max_teams=TEAMS)
        names = [f"ff/v1/team1/p/proj{i % 50}/out/dev{i}" for i in range(TOPICS)]
        t0 = time.perf_counter()
        for name in names:
            inv.entry("team1", name, False)
        return (time.perf_counter() - t0) / len(names) * 1e9

    def hit() -> float:
        inv = Inventory(max_topics_per_team=TOPICS, max_teams=TEAMS)
        names = [f"ff/v1/team1/p/proj{i % 50}/out/dev{i}" for i in range(TOPICS)]
        for name in names:
            inv.entry("team1", name, False)
        t0 = time.perf_counter()
        for name in names:
            inv.entry("team1", name, False)
        return (time.perf_counter() - t0) / len(names) * 1e9

    def churn() -> float:
        # A full team meeting ever new topics: each miss may evict (1/64th of the team per O(n) pass).
        inv = Inventory(max_topics_per_team=TOPICS, max_teams=TEAMS)
        for i in range(TOPICS):
            inv.entry("team1", f"old/{i}", False).messages += 1
        names = [f"new/{i}" for i in range(4 * TOPICS)]
        t0 = time.perf_counter()
        for n, name in enumerate(names):
            if n % 1000 == 0:
                inv.tick(2.0 + n / 1000, 1e9)
            inv.entry("team1", name, False).messages += 1
        return (time.perf_counter() - t0) / len(names) * 1e9

    out["entry() miss: a new topic"] = best(miss)
    out["entry() miss: a new topic in a full team (evicts)"] = best(churn, 3)
    out["entry() hit: the slow path meets a known topic"] = best(hit)
    return out


def tick_costs() -> dict[str, float]:
    inv, held = filled()
    gc.collect()
    now = [2.0]

    def tick_idle() -> float:
        now[0] += 1
        t0 = time.perf_counter()
        inv.tick(now[0], 1e9 + now[0])
        return (time.perf_counter() - t0) * 1e3

    def tick_busy() -> float:
        for team in held:
            for e in team[::100]:
                e.messages += 1
                e.bytes += 90
        now[0] += 1
        t0 = time.perf_counter()
        inv.tick(now[0], 1e9 + now[0])
        return (time.perf_counter() - t0) * 1e3

    out = {
        "tick(), all 500,000 topics refreshed, none published on": best(tick_idle),
        "tick(), all 500,000 topics refreshed, 1 % published on": best(tick_busy),
    }
    inv.scan_per_tick = 50_000  # the default: each team refreshed every 10 ticks
    out["tick(), default scan_per_tick=50,000 (10 of the 100 teams)"] = best(tick_busy)

    def snap() -> float:
        t0 = time.perf_counter()
        inv.snapshot("team7")
        return (time.perf_counter() - t0) * 1e3

    out["snapshot() of a 5,000-topic team"] = best(snap)
    assert inv.stats()["topics"] == TEAMS * TOPICS
    return out


def memory_per_entry() -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    inv, held = filled(10, TOPICS)
    for team in held:
        for e in team:
            e.messages += 1000  # counts past the small-int cache, as real ones are
            e.bytes += 100_000
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    return (after - before) / inv.stats()["topics"]


def main() -> None:
    print(f"python {sys.version.split()[0]}, best of {REPEAT}\n")
    test, count, empty = isolated()
    print("| per message, in isolation (200,000 messages, 8 topics) | ns |")
    print("|---|---|")
    print(f"| loop alone | {empty:.1f} |")
    print(f"| fast path's cache test: `topic in cache` | {test - empty:.1f} |")
    print(f"| inventory: `entry = cache.get(topic)`, 2 increments, samples test | {count - empty:.1f} |")
    print(f"| **added by the inventory** | **{count - test:.1f}** |")
    print()
    names, rows = in_session()
    if True:
        print("In an established Session, client -> upstream, ns/packet (added vs before the inventory, %):\n")
        print("| case | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for case, results in rows:
            base = results[0]
            cells = [f"{base:.0f}"] + [f"{r:.0f} ({r - base:+.0f}, {(r - base) / base:+.1%})" for r in results[1:]]
            print(f"| {case} | " + " | ".join(cells) + " |")
        print()
    print("| slow path and I/O layer | cost |")
    print("|---|---|")
    for name, ns in entry_costs().items():
        print(f"| {name} | {ns:,.0f} ns |")
    for name, ms in tick_costs().items():
        print(f"| {name} | {ms:.2f} ms |")
    print(f"| memory per entry (topic of ~35 chars, team dict, counts) | {memory_per_entry():.0f} B |")


if __name__ == "__main__":
    main()

"""Two ``mqtt-front run`` replicas behind a real HAProxy (TCP mode, PROXY v2, /readyz health checks), both in
front of one real Mosquitto (issue 14 item 1): clients spread, a replica killed or drained mid-stream loses
no QoS 1/2 message (the same scenario against Mosquitto alone for comparison), client-id takeover across
replicas is still prevented, and the replicas see the clients' own addresses.

HAProxy's roundrobin hands sequential connections to the two replicas in turn; the tests rely on that to
place clients, and check where each one landed with the replicas' admin APIs.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.mqtt.packets import PacketType, decode_connack
from broker.mqtt.properties import Prop
from tests.support.front import PASSWORD, uid
from tests.support.haproxy import HAProxy, start_haproxy
from tests.support.mosquitto import Mosquitto, start_mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.raw_client import RawClient
from tests.support.replicas import (
    SESSION_EXPIRY,
    SHUTDOWN_TIMEOUT,
    Publisher,
    Replica,
    Subscriber,
    launch_replica,
    wait_delivered,
)

pytestmark = pytest.mark.timeout(60)

PUBLISHER = "project:team1:p1"
SUBSCRIBER = "project:team1:p2"
THIEF = "project:team2:p3"
SESSION_TAKEN_OVER = 0x8E
UNSPECIFIED = 0x80
SERVER_SHUTTING_DOWN = 0x8B


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    # The default of 1,000 queued messages per session silently drops what queues up for a client that is
    # away (reconnecting through the balancer): a persistent session must keep all of it.
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"), "max_queued_messages 100000\n")
    yield broker
    broker.stop()


@dataclass
class Cluster:
    replicas: list[Replica]
    lb: HAProxy

    def holder(self, client_id: str) -> Replica:
        """The replica whose admin API lists ``client_id`` (exactly one must)."""
        found = [r for r in self.replicas if client_id in r.client_ids()]
        assert len(found) == 1, (client_id, [r.name for r in found])
        return found[0]

    def other(self, replica: Replica) -> Replica:
        return next(r for r in self.replicas if r is not replica)


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def make_cluster(tmp_path: Path, mosquitto: Mosquitto, users_file: Path) -> Iterator[ClusterFactory]:
    """Replicas "a" and "b" (``limits`` added to their config) behind HAProxy; all stopped afterwards."""
    started: list[Replica] = []
    balancers: list[HAProxy] = []

    def factory(limits: dict[str, Any] | None = None) -> Cluster:
        replicas = [launch_replica(tmp_path, name, mosquitto.url, users_file, limits) for name in ("a", "b")]
        started.extend(replicas)
        for replica in replicas:  # started together: their start-ups overlap
            replica.wait_ready()
        lb = start_haproxy(tmp_path, [r.backend() for r in replicas])
        balancers.append(lb)
        return Cluster(replicas, lb)

    yield factory
    for lb in balancers:
        lb.stop()
    for replica in started:
        replica.stop()


Clients = list[Subscriber | Publisher]


@pytest.fixture
def clients(make_cluster: ClusterFactory) -> Iterator[Clients]:
    """paho clients the test started: disconnected before the replicas stop (this fixture is torn down first)."""
    started: Clients = []
    yield started
    for client in started:
        client.close()


def assert_all_delivered(subscribers: list[Subscriber], expected: dict[int, set[int]]) -> None:
    """Every QoS 1 message at least once, every QoS 2 message exactly once, to every subscriber."""
    for sub in subscribers:
        q1, q2 = sub.counts(1), sub.counts(2)
        assert not expected[1] - set(q1), (sub.client_id, "QoS 1 lost", sorted(expected[1] - set(q1)))
        assert not expected[2] - set(q2), (sub.client_id, "QoS 2 lost", sorted(expected[2] - set(q2)))
        twice = sorted(n for n, times in q2.items() if times != 1)
        assert not twice, (sub.client_id, "QoS 2 delivered more than once", twice)
        assert set(q1) | set(q2) <= expected[1] | expected[2]


def subscribers(port: int, topic: str, pattern: list[bool], clients: Clients) -> list[Subscriber]:
    """Persistent subscribers (v5 where ``pattern`` says True), connected and subscribed one after the other."""
    subs = [
        Subscriber(port, SUBSCRIBER, PASSWORD, f"{SUBSCRIBER}:s{i}-{uid()}", v5, topic) for i, v5 in enumerate(pattern)
    ]
    for sub in subs:
        clients.append(sub)
        sub.start()
    return subs


def publisher(port: int, topic: str, count: int, clients: Clients, **kwargs: Any) -> Publisher:
    """A connected publisher (it starts publishing at ``begin()``)."""
    started = Publisher(port, PUBLISHER, PASSWORD, f"{PUBLISHER}:pub-{uid()}", topic, count, **kwargs)
    clients.append(started)
    started.start()
    return started


# Two v5 and two v3.1.1 in a row: roundrobin gives each replica one of each per four, whatever replica is next.
PATTERN = [True, True, False, False, True, True, False, False]


# ------------------------------------------------------------------ spread


def test_clients_spread_over_both_replicas(make_cluster: ClusterFactory, clients: Clients) -> None:
    cluster = make_cluster()
    topic = f"ff/v1/team1/c/spread-{uid()}"
    subs = subscribers(cluster.lb.port, topic, PATTERN[:6], clients)
    held = {r.name: r.client_ids() for r in cluster.replicas}
    ids = {sub.client_id for sub in subs}
    assert [len(held["a"] & ids), len(held["b"] & ids)] == [3, 3], held
    assert held["a"] | held["b"] == ids and not held["a"] & held["b"]
    for replica in cluster.replicas:
        assert replica.metrics().get("mqtt_front_connections", listener="mqtt", team="team1") == 3
    assert cluster.lb.sessions() == {"a": 3, "b": 3}
    # A message published on one replica reaches the subscribers on both (through the one Mosquitto).
    stream = publisher(cluster.lb.port, topic, 20, clients)
    stream.begin()
    stream.wait_acked()
    wait_delivered(subs, stream.expected)
    assert_all_delivered(subs, stream.expected)


# ------------------------------------------------------------------ a replica dies


@pytest.mark.parametrize("path", ["replicas", "mosquitto"])
def test_a_replica_killed_mid_stream_loses_no_qos1_or_qos2_message(
    make_cluster: ClusterFactory, clients: Clients, mosquitto: Mosquitto, path: str
) -> None:
    """Through HAProxy the victims' replica is SIGKILLed; side by side, against Mosquitto directly, the same
    subscribers' connections are cut. Both must end the same: every message, QoS 2 exactly once."""
    cluster = make_cluster() if path == "replicas" else None
    port = cluster.lb.port if cluster is not None else mosquitto.port
    topic = f"ff/v1/team1/c/kill-{uid()}"
    stream = publisher(port, topic, 600, clients, interval=0.0005)  # fast: deliveries are in flight at the cut
    subs = subscribers(port, topic, PATTERN, clients)
    if cluster is not None:
        survivor = cluster.holder(stream.client_id)  # the publisher keeps publishing throughout
        victim = cluster.other(survivor)
        on_victim = victim.client_ids()
        victims = [sub for sub in subs if sub.client_id in on_victim]
    else:
        victims = subs[::2]
    assert len(victims) == 4 and {sub.v5 for sub in victims} == {True, False}, [s.client_id for s in victims]
    stream.begin()
    stream.wait_sent(stream.count // 3)
    if cluster is not None:
        victim.kill()
    else:
        for sub in victims:
            sub.cut()
    cut_at = stream.sent()
    before = {sub.client_id: len(sub.received) for sub in victims}
    stream.wait_acked()
    wait_delivered(subs, stream.expected)
    assert cut_at < stream.count * 2 // 3  # the stream went on after the cut
    assert all(before.values()), before  # the victims were receiving when it happened
    assert_all_delivered(subs, stream.expected)
    for sub in victims:  # each reconnected by itself, into its old session
        assert len(sub.connects) == 2 and sub.connects[1], (sub.client_id, sub.connects)
    for sub in subs:
        if sub not in victims:
            assert sub.connects == [False] and not sub.disconnects, (sub.client_id, sub.connects)
    assert stream.connects == 1
    if cluster is not None:  # the victims moved to the survivor, and HAProxy took the dead one out
        assert {sub.client_id for sub in victims} <= survivor.client_ids()
        assert cluster.lb.server_state()[victim.name] == "DOWN"


# ------------------------------------------------------------------ a replica drains


def test_a_drained_replica_loses_nothing_and_its_clients_move_within_the_drain(
    make_cluster: ClusterFactory, clients: Clients
) -> None:
    cluster = make_cluster()
    port = cluster.lb.port
    topic = f"ff/v1/team1/c/drain-{uid()}"
    # One publisher on each replica (roundrobin), numbering apart: the drained one's publisher moves too.
    streams = [publisher(port, topic, 400, clients, first=1000 * i, interval=0.0005) for i in range(2)]
    subs = subscribers(port, topic, PATTERN, clients)
    expected = {qos: streams[0].expected[qos] | streams[1].expected[qos] for qos in (1, 2)}
    victim, survivor = cluster.replicas
    on_victim = victim.client_ids()
    moving = [sub for sub in subs if sub.client_id in on_victim]
    moving_streams = [p for p in streams if p.client_id in on_victim]
    assert len(moving) == 4 and {sub.v5 for sub in moving} == {True, False}, on_victim
    assert len(moving_streams) == 1, on_victim
    for stream in streams:
        stream.begin()
    for stream in streams:
        stream.wait_sent(stream.count // 3)
    started = time.monotonic()
    victim.proc.send_signal(signal.SIGTERM)
    at_signal = [p.sent() for p in streams]
    moved: float | None = None
    while time.monotonic() - started < SHUTDOWN_TIMEOUT + 5:
        if on_victim <= survivor.client_ids():
            moved = time.monotonic() - started
            break
        time.sleep(0.05)
    code = victim.proc.wait(SHUTDOWN_TIMEOUT + 5)
    for stream in streams:
        stream.wait_acked()
    wait_delivered(subs, expected)
    assert code == 0, victim.log_text()
    assert all(n < p.count * 2 // 3 for n, p in zip(at_signal, streams, strict=True))  # went on after it
    assert moved is not None and moved < SHUTDOWN_TIMEOUT, moved  # every client moved within the drain
    assert victim.events("drained"), victim.log_text()
    assert_all_delivered(subs, expected)
    for sub in moving:
        assert sub.connects == [False, True], (sub.client_id, sub.connects)
        if sub.v5:
            assert sub.disconnects[:1] == [SERVER_SHUTTING_DOWN], sub.disconnects
    assert moving_streams[0].connects == 2 and moving_streams[0].disconnects[:1] == [SERVER_SHUTTING_DOWN]
    assert all(sub.connects == [False] for sub in subs if sub not in moving)
    assert cluster.lb.server_state()[victim.name] == "DOWN"


# ------------------------------------------------------------------ client-id takeover across replicas


async def attempt(
    port: int, username: str, client_id: str, *, v5: bool, clean: bool = False, source: str = "127.0.0.1"
) -> tuple[RawClient, int | None, bool]:
    """A raw acknowledging client from ``source``: (it, the CONNACK code or None when closed without one,
    session present)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    client = RawClient(reader, writer, v5, acknowledge=True)
    props: dict[int, Any] = {Prop.SESSION_EXPIRY_INTERVAL: SESSION_EXPIRY} if v5 and not clean else {}
    client.send(connect(client_id, username, PASSWORD, v5=v5, clean=clean, props=props))
    async with asyncio.timeout(5):
        item = await client.control.get()
    if item is None:
        return client, None, False
    assert item[0] == PacketType.CONNACK, item
    connack = decode_connack(item[1], 0, len(item[1]), v5)
    return client, connack.reason_code, connack.session_present


def queued(client: RawClient) -> list[tuple[int, bytes] | None]:
    """The packets other than deliveries the client has received and nobody read yet (None: the close)."""
    items = []
    while not client.control.empty():
        items.append(client.control.get_nowait())
    return items


def address(client: RawClient) -> str:
    host, port = client.writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def test_client_id_takeover_is_refused_across_replicas_but_a_reconnect_takes_its_session(
    make_cluster: ClusterFactory, mosquitto: Mosquitto
) -> None:
    cluster = make_cluster()
    port = cluster.lb.port
    client_id = f"{PUBLISHER}:tk-{uid()}"
    topic = f"ff/v1/team1/c/tk-{uid()}"
    owner, code, _ = await attempt(port, PUBLISHER, client_id, v5=True)
    assert code == 0
    assert await owner.subscribe(f"{topic}/#", qos=1) == [1]
    home = await asyncio.to_thread(cluster.holder, client_id)
    other = cluster.other(home)
    feeder, _, _ = await RawClient.open(mosquitto.port, None, v5=False, password=None)  # straight into Mosquitto
    try:
        # team2 asks for team1's id: the next connection lands on the other replica (v5), the one after on
        # the owner's (v3.1.1); both refuse it (0x85 / 0x02 client identifier not valid).
        for v5, refused, replica in ((True, 0x85, other), (False, 0x02, home)):
            thief, code, _ = await attempt(port, THIEF, client_id, v5=v5)
            await thief.wait_closed()
            assert code == refused
            events = await asyncio.to_thread(replica.events, "connect_refused")
            assert [e["user"] for e in events if e.get("client") == client_id] == [THIEF], events
        assert not owner.closed.is_set() and client_id in await asyncio.to_thread(home.client_ids)
        await feeder.publish(f"{topic}/still-mine", b"1", qos=1)
        assert (await owner.next_message()).topic == f"{topic}/still-mine"
        # The owner's own reconnect, through the other replica, takes its session over upstream: the old
        # connection on the first replica is ended, the new one has the session and its subscription.
        again, code, present = await attempt(port, PUBLISHER, client_id, v5=True)
        assert code == 0 and present
        await owner.wait_closed()
        # Mosquitto 2.0 closes a taken-over connection without a DISCONNECT; the front then tells its v5 client
        # 0x80 "upstream connection lost" (0x8E session taken over, should the upstream send that).
        packets = [item for item in queued(owner) if item is not None]
        assert [(p[0], p[1][2] in (SESSION_TAKEN_OVER, UNSPECIFIED)) for p in packets] == [
            (PacketType.DISCONNECT, True)
        ], packets
        async with asyncio.timeout(5):  # the first replica forgets the old connection once it is closed
            while client_id in await asyncio.to_thread(home.client_ids):
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(cluster.holder, client_id) is other
        await feeder.publish(f"{topic}/moved", b"2", qos=1)
        assert (await again.next_message()).topic == f"{topic}/moved"
        await again.disconnect()
    finally:
        await owner.close()
        await feeder.close()


# ------------------------------------------------------------------ PROXY v2: the clients' own addresses


async def test_proxy_v2_addresses_are_the_ones_in_logs_limits_and_the_admin_api(make_cluster: ClusterFactory) -> None:
    # A burst of 2 per source and replica, refilled every 10 s: the third connection of a source is refused.
    cluster = make_cluster({"connect_rate": {"per_source": 0.1, "burst": 2}})
    port = cluster.lb.port
    accepted: list[RawClient] = []
    refused: list[RawClient] = []

    async def from_source(source: str, ok: bool) -> None:
        client, code, _ = await attempt(port, SUBSCRIBER, f"{SUBSCRIBER}:px-{uid()}", v5=True, clean=True,
                                        source=source)
        (accepted if ok else refused).append(client)
        if ok:
            assert code == 0, (source, code)
        else:
            await client.wait_closed()
            assert code is None, (source, code)  # closed at accept, before any CONNACK

    try:
        for _ in range(4):  # two on each replica: 127.0.0.2's burst is spent on both
            await from_source("127.0.0.2", True)
        for _ in range(2):  # refused by each replica
            await from_source("127.0.0.2", False)
        for _ in range(2):  # another source (the same balancer) still gets in, on both
            await from_source("127.0.0.3", True)
        ours = {address(c) for c in accepted}
        assert {a.split(":")[0] for a in ours} == {"127.0.0.2", "127.0.0.3"}
        connects: set[str] = set()
        for replica in cluster.replicas:
            peers = {e["peer"] for e in await asyncio.to_thread(replica.events, "connect")}
            listed = {c["peer"] for c in await asyncio.to_thread(replica.clients)}
            assert len(peers) == 3 and peers == listed, (replica.name, peers, listed)
            connects |= peers
            limits = await asyncio.to_thread(replica.events, "limit_exceeded")
            assert [(e["limit"], e["peer"].split(":")[0]) for e in limits] == [("connect_rate", "127.0.0.2")]
            scrape = await asyncio.to_thread(replica.metrics)
            assert scrape.get("mqtt_front_limit_hits_total", limit="connect_rate") == 1
        assert connects == ours  # never HAProxy's 127.0.0.1, and the very ports the clients used
        limited = {e["peer"] for r in cluster.replicas for e in r.events("limit_exceeded")}
        assert limited == {address(c) for c in refused}
    finally:
        for client in accepted + refused:
            await client.close()

"""mqtt-front in front of a broker cluster: ``upstream.urls: [node1, node2]``, two real Mosquittos standing in
for two cluster nodes (issue 14, item 3).

What a node's death does to the clients connected through it, where they land when they reconnect, what
becomes of their sessions, where new connections go once the node is back, and what /readyz and the upstream
metrics say meanwhile. Two independent Mosquittos share nothing, unlike the nodes of a real cluster (EMQX,
VerneMQ, HiveMQ), so sessions and messages stay on the node that has them: the tests assert that too, since
it is exactly what the README's "Deploying" section warns about. Already covered elsewhere
(tests/e2e/test_upstream_failover.py): a dead first upstream skipped, round robin spreading connections,
nothing reachable refused with "server unavailable"; /readyz with one upstream: test_readiness_upstream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import broker.upstream.targets as targets
from broker.config import parse_config
from broker.mqtt.packets import PacketType, decode_connack, decode_disconnect
from broker.mqtt.properties import Prop
from broker.mqtt.reasons import DisconnectReason
from broker.server import FrontBroker
from tests.support.front import PASSWORD, VERSIONS, front_port, uid
from tests.support.mosquitto import Mosquitto, mosquitto_log, start_mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.ops import Scrape, get_json, scrape
from tests.support.raw_client import RawClient, connect_ok

NOT_AUTHORIZED_V5, SUBACK_FAIL_V3 = 0x87, 0x80

FrontStarter = Callable[..., Awaitable[FrontBroker]]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Mosquitto]]:
    """Two Mosquittos: node1 and node2 of the "cluster" (each test stops or kills them, so one pair per test)."""
    started = [start_mosquitto(tmp_path / "node1"), start_mosquitto(tmp_path / "node2")]
    yield started
    for node in started:
        node.stop()


@pytest.fixture
async def start_front(users_file: Path, nodes: list[Mosquitto]) -> AsyncIterator[FrontStarter]:
    """Start a front broker with ``upstream.urls`` = the nodes, in order, and a metrics port."""
    started: list[FrontBroker] = []

    async def factory(strategy: str = "failover", urls: list[str] | None = None) -> FrontBroker:
        urls = urls if urls is not None else [n.url for n in nodes]
        config = parse_config(
            {
                "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                "upstream": {"urls": urls, "strategy": strategy, "connect_timeout": 1},
                "auth": {"users_file": str(users_file)},
                "acl": {"preset": "flowfuse"},
                "metrics": {"bind": "127.0.0.1:0"},
            }
        )
        front = FrontBroker(config)
        await front.start()
        started.append(front)
        return front

    yield factory
    for front in started:
        await front.stop()


def kill(node: Mosquitto, how: str) -> None:
    """``crash``: SIGKILL, the node vanishes at once; ``stop``: SIGTERM, Mosquitto's own clean exit."""
    if how == "crash":
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(5)
    else:
        node.stop()


def label(node: Mosquitto) -> str:
    return f"127.0.0.1:{node.port}"  # the `upstream` label of the mqtt_front_upstream_* metrics


def per_node(metrics: Scrape, name: str, nodes: list[Mosquitto]) -> list[float]:
    """One sample of ``name`` per node, in configured order."""
    return [metrics.get(name, upstream=label(n)) for n in nodes]


def opened(front: FrontBroker) -> list[int]:
    """Upstream connections open now, per node in configured order."""
    return [t.open for t in front.upstream.targets]


async def until_opened(front: FrontBroker, expected: list[int]) -> None:
    async with asyncio.timeout(5):
        while opened(front) != expected:
            await asyncio.sleep(0.02)


async def goodbye(client: RawClient) -> bytes | None:
    """What the client got when its connection ended: the DISCONNECT packet, or None for a plain close."""
    await client.wait_closed()
    packets = []
    while (item := client.control.get_nowait()) is not None:
        packets.append(item)
    assert all(ptype == PacketType.DISCONNECT for ptype, _ in packets) and len(packets) <= 1, packets
    return packets[0][1] if packets else None


async def open_session(port: int, user: str, client_id: str, v5: bool) -> tuple[RawClient, bool]:
    """A persistent session (v5: clean start false, expiry 300 s; v3.1.1: clean session false): the client and
    the CONNACK's session present flag."""
    client = await RawClient.attach(port, v5)
    props: dict[int, Any] = {Prop.SESSION_EXPIRY_INTERVAL: 300} if v5 else {}
    client.send(connect(client_id, user, PASSWORD, v5=v5, clean=False, props=props))
    packet = await client.expect(PacketType.CONNACK)
    connack = decode_connack(packet, 0, len(packet), v5)
    assert connack.reason_code == 0, f"CONNACK 0x{connack.reason_code:02x}"
    return client, connack.session_present


# -- a node dies under its clients ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["crash", "stop"])
@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_dead_node_closes_its_clients_and_the_next_node_serves_them(
    start_front: FrontStarter, nodes: list[Mosquitto], v5: bool, how: str
) -> None:
    node1, node2 = nodes
    front = await start_front()
    port, t = front_port(front), uid()
    names = {"sub1": "project:team1:p1", "pub1": "project:team1:p2", "sub2": "project:team2:p3",
             "pub2": "project:team2:p3"}
    ids = {role: f"{user}:{role}-{t}" for role, user in names.items()}
    clients = {role: await connect_ok(port, names[role], v5, client_id=ids[role]) for role in names}
    assert opened(front) == [4, 0]  # failover: every new client goes to the first node while it answers
    assert all(f"as {cid}" in mosquitto_log(node1) for cid in ids.values())

    kill(node1, how)
    notices = [await goodbye(client) for client in clients.values()]
    if not v5:
        assert notices == [None] * 4  # MQTT 3.1.1 has no DISCONNECT from the server: the connection closes
    else:
        # The front tells a v5 client itself, whether the node crashed or stopped: Mosquitto 2.0 closes its
        # connections on SIGTERM without a DISCONNECT (a broker that sends one has it relayed as it came).
        assert None not in notices
        goodbyes = [decode_disconnect(n, 0, len(n), True) for n in notices if n is not None]
        assert {(d.reason_code, (d.properties or {}).get(Prop.REASON_STRING)) for d in goodbyes} == {
            (DisconnectReason.UNSPECIFIED, "upstream connection lost")}
    await until_opened(front, [0, 0])
    assert (await get_json(front, "/readyz")) == (200, {"status": "ready"})  # node2 answers: still ready

    # The clients reconnect (same client ids): node1 is tried once, refused, then skipped for RETRY_AFTER.
    clients = {role: await connect_ok(port, names[role], v5, client_id=ids[role]) for role in names}
    assert opened(front) == [0, 4]
    assert [tg.failures for tg in front.upstream.targets] == [1, 0]
    assert all(f"as {cid}" in mosquitto_log(node2) for cid in ids.values())
    metrics = await scrape(front)
    assert per_node(metrics, "mqtt_front_upstream_connections", nodes) == [0, 4]
    assert per_node(metrics, "mqtt_front_upstream_connect_failures_total", nodes) == [1, 0]

    # node2 serves publish/subscribe, and the teams stay apart on it.
    spy = await connect_ok(node2.port, None, True, client_id=f"spy-{t}")
    assert await spy.subscribe("#", qos=1) == [1]
    sub1, pub1, sub2, pub2 = clients["sub1"], clients["pub1"], clients["sub2"], clients["pub2"]
    assert await sub1.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    assert await sub2.subscribe("ff/v1/team2/p/+/out/#", qos=1) == [1]
    assert await sub2.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [NOT_AUTHORIZED_V5 if v5 else SUBACK_FAIL_V3]
    evil, own1, own2 = (f"ff/v1/team1/p/p2/out/evil-{t}", f"ff/v1/team1/p/p2/out/{t}", f"ff/v1/team2/p/p3/out/{t}")
    assert await pub2.publish(evil, b"x", qos=1) == (NOT_AUTHORIZED_V5 if v5 else 0)  # v3.1.1: acked, dropped
    assert await pub1.publish(own1, b"1", qos=1) == 0
    assert await pub2.publish(own2, b"2", qos=1) == 0  # after the attempt on the same connection: a barrier
    assert [m.topic for m in await sub1.until(own1)] == [own1]
    assert [m.topic for m in await sub2.until(own2)] == [own2]
    assert evil not in [m.topic for m in await spy.until(own2)]  # it never reached the node
    for client in (*clients.values(), spy):
        await client.disconnect()


# -- sessions live on one node ------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_persistent_session_stays_with_its_node(
    start_front: FrontStarter, nodes: list[Mosquitto], v5: bool
) -> None:
    """While node1 is up every reconnect lands on it (failover order), so the session is found and taken over;
    once node1 is dead the reconnect lands on node2, which never heard of it: session present false and what
    was queued for it is gone. A real cluster finds the session from any node (README "Deploying")."""
    node1, _ = nodes
    front = await start_front()
    port, t = front_port(front), uid()
    user, cid = "project:team1:p1", f"project:team1:p1:{t}"
    topic = f"ff/v1/team1/p/p2/out/{t}"

    first, present = await open_session(port, user, cid, v5)
    assert not present
    assert await first.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    await first.disconnect()
    pub = await connect_ok(port, "project:team1:p2", v5)
    assert await pub.publish(topic, b"queued on node1", qos=1) == 0

    again, present = await open_session(port, user, cid, v5)
    assert present  # the same node: its session, with the message queued while it was away
    assert (await again.next_message()).payload == b"queued on node1"
    third, present = await open_session(port, user, cid, v5)  # a reconnect while the old connection is open
    assert present
    # node1 took the session over and closed the previous connection. Mosquitto 2.0 closes it without a
    # DISCONNECT (one that sends 0x8E, session taken over, has it relayed), so the front's own notice is seen.
    notice = await goodbye(again)
    if v5:
        assert notice is not None
        assert decode_disconnect(notice, 0, len(notice), True).reason_code == DisconnectReason.UNSPECIFIED
    else:
        assert notice is None
    assert opened(front) == [2, 0]
    await third.disconnect()
    assert await pub.publish(topic, b"lost with node1", qos=1) == 0

    kill(node1, "crash")
    await pub.wait_closed()
    back, present = await open_session(port, user, cid, v5)
    assert opened(front) == [0, 1]
    assert not present  # node2 has no such session: independent brokers share nothing
    assert await back.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    pub = await connect_ok(port, "project:team1:p2", v5)
    assert await pub.publish(topic, b"after the failover", qos=1) == 0
    assert (await back.next_message()).payload == b"after the failover"  # the first one: the queued one is gone
    await back.disconnect()
    await pub.disconnect()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_round_robin_over_independent_nodes_splits_a_client_id(
    start_front: FrontStarter, nodes: list[Mosquitto], v5: bool
) -> None:
    """round_robin sends a client's reconnect to the next node: over brokers that are not one cluster its
    session is not there and nothing takes the old connection over, so one client id is live twice."""
    front = await start_front("round_robin")
    port, cid = front_port(front), f"project:team1:p1:{uid()}"
    first, present = await open_session(port, "project:team1:p1", cid, v5)
    assert not present and opened(front) == [1, 0]
    second, present = await open_session(port, "project:team1:p1", cid, v5)
    assert not present and opened(front) == [1, 1]
    assert await first.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]  # still connected: no takeover
    assert not first.closed.is_set()
    await first.disconnect()
    await second.disconnect()


# -- node1 comes back ---------------------------------------------------------------------------------------


async def test_failover_returns_to_the_first_node_once_it_answers_again(
    start_front: FrontStarter, nodes: list[Mosquitto], tmp_path: Path
) -> None:
    """A node that failed is tried last for RETRY_AFTER seconds (5), then first again: new connections
    go back to node1 while those already on node2 stay there, so with independent brokers the clients are split
    and do not see each other's messages. /readyz stays ready while either node answers; the metrics show each
    node's connections and failures."""
    node1 = nodes[0]
    front = await start_front()
    port, t = front_port(front), uid()
    topic = f"ff/v1/team1/p/p2/out/{t}"

    early = await connect_ok(port, "project:team1:p1", True)
    kill(node1, "crash")
    await early.wait_closed()
    assert (await get_json(front, "/readyz")) == (200, {"status": "ready"})
    sub = await connect_ok(port, "project:team1:p1", True)  # node1 refused, node2 took it
    assert await sub.subscribe("ff/v1/team1/p/+/out/#", qos=1) == [1]
    assert opened(front) == [0, 1]

    nodes[0] = node1 = start_mosquitto(tmp_path / "node1", port=node1.port)  # back, same address
    on_node2 = await connect_ok(port, "project:team1:p2", True)  # within RETRY_AFTER: still node2
    assert opened(front) == [0, 2]
    first = front.upstream.targets[0]
    assert first.last_failure is not None
    first.last_failure -= targets.RETRY_AFTER  # as if RETRY_AFTER had passed, without waiting 5 s
    on_node1 = await connect_ok(port, "project:team1:p2", True)  # then node1 is first again
    assert opened(front) == [1, 2]
    metrics = await scrape(front)
    assert per_node(metrics, "mqtt_front_upstream_connections", nodes) == [1, 2]
    assert per_node(metrics, "mqtt_front_upstream_connect_failures_total", nodes) == [1, 0]

    # The split: a message published on node1 reaches node1's subscribers only.
    spy = await connect_ok(node1.port, None, True, client_id=f"spy-{t}")
    assert await spy.subscribe("#", qos=1) == [1]
    assert await on_node1.publish(topic + "/split", b"node1", qos=1) == 0
    assert [m.topic for m in await spy.until(topic + "/split")] == [topic + "/split"]
    assert await on_node2.publish(topic, b"node2", qos=1) == 0
    assert [m.topic for m in await sub.until(topic)] == [topic]  # node1's message is not on node2

    # Both nodes down: not ready, and the reason names each one.
    for node in nodes:
        kill(node, "crash")
    for client in (sub, on_node1, on_node2):
        await client.wait_closed()
    code, body = await get_json(front, "/readyz")
    assert code == 503 and all(f"{label(n)}: " in body["reason"] for n in nodes), body
    await spy.close()


# -- a node that does not answer at all ---------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[str]:
    """The URL of an address whose SYNs go unanswered, like a host that vanished (no refusal, only silence):
    a listener with a full accept queue that never accepts, so the kernel drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield f"mqtt://127.0.0.1:{port}"
    for sock in (*fillers, listener):
        sock.close()


async def test_a_silent_node_is_retried_by_one_connection_at_a_time(
    start_front: FrontStarter, nodes: list[Mosquitto], black_hole: str
) -> None:
    """Once RETRY_AFTER has passed, the first login tries the silent node1 again and waits out the connect
    timeout; the logins that arrive meanwhile go to node2 at once instead of queueing behind the same timeout
    (they all did: a login storm paid connect_timeout, 5 s by default, every RETRY_AFTER)."""
    front = await start_front(urls=[black_hole, nodes[1].url])
    port = front_port(front)
    first_login = await connect_ok(port, "project:team1:p1", True)  # node1 times out (1 s), node2 serves
    silent = front.upstream.targets[0]
    assert silent.failures == 1 and opened(front) == [0, 1]

    assert silent.last_failure is not None
    silent.last_failure -= targets.RETRY_AFTER  # as if RETRY_AFTER had passed
    storm = await asyncio.gather(*(connect_ok(port, "project:team1:p1", True) for _ in range(10)))
    assert silent.failures == 2  # one retry, not ten
    assert opened(front) == [0, 11] and silent.retrying == 0
    for client in (first_login, *storm):
        await client.disconnect()


@pytest.fixture
async def hung_node() -> AsyncIterator[str]:
    """An mqtt:// URL of a "broker" that accepts connections and never answers a byte (a wedged node)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_readyz_asks_a_hung_node_with_a_connect_of_its_own(
    start_front: FrontStarter, nodes: list[Mosquitto], v5: bool
) -> None:
    """The only node accepts TCP but never answers CONNECT: once a client has waited out the CONNACK timeout,
    /readyz is 503 (a TCP probe would say ready), and it finds out by itself, with no client, when the node
    answers again: a balancer sends no client to a replica that says 503, so no client could tell it."""
    answering = asyncio.Event()
    connects: list[bytes] = []
    held: list[asyncio.StreamWriter] = []

    async def node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            first = await reader.read(1024)
            if answering.is_set():
                connects.append(first)
                writer.write(b"\x20\x02\x00\x05")  # CONNACK "not authorized": the broker answers
                await writer.drain()
            await reader.read()

    server = await asyncio.start_server(node, "127.0.0.1", 0)
    url = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        front = await start_front(urls=[url])
        front.readiness.probe_interval = 0.05
        assert (await get_json(front, "/readyz"))[0] == 200  # it accepts TCP: nothing known yet
        client, code, _ = await RawClient.open(front_port(front), "project:team1:p1", v5=v5,
                                               client_id=f"project:team1:p1:{uid()}")
        assert code == (0x88 if v5 else 0x03)
        await client.close()
        assert front.upstream.targets[0].silent
        code, body = await get_json(front, "/readyz")
        assert code == 503 and "did not answer CONNECT" in body["reason"], body
        answering.set()
        await asyncio.sleep(0.1)
        code, body = await get_json(front, "/readyz")
        assert code == 200, body
        assert not front.upstream.targets[0].silent
        assert connects and connects[-1][0] == 0x10 and b"mqtt-front-readyz-" in connects[-1]
        assert b"project:team1" not in connects[-1]  # its own CONNECT, no client's credentials
    finally:
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_node_that_never_answers_connect_counts_as_failed(
    start_front: FrontStarter, nodes: list[Mosquitto], hung_node: str, v5: bool
) -> None:
    """node1 accepts TCP but never sends CONNACK: the client waiting on it gets "server unavailable" after the
    CONNACK timeout, and node1 then counts as failed, so the next clients go to node2 at once."""
    front = await start_front(urls=[hung_node, nodes[1].url])
    port = front_port(front)
    started = asyncio.get_running_loop().time()
    first, code, _ = await RawClient.open(port, "project:team1:p1", v5=v5, client_id=f"project:team1:p1:{uid()}")
    assert code == (0x88 if v5 else 0x03) and asyncio.get_running_loop().time() - started >= 0.9
    await first.close()
    hung = front.upstream.targets[0]
    assert hung.failures == 1 and hung.failing()
    later = [await connect_ok(port, "project:team1:p1", v5) for _ in range(3)]
    assert opened(front) == [0, 3]  # straight to node2
    metrics = await scrape(front)
    assert metrics.get("mqtt_front_upstream_connect_failures_total", upstream=hung_node.split("//")[1]) == 1
    # Once RETRY_AFTER has passed, one connection probes node1 again. Its TCP connect succeeds, which proves
    # nothing for a hung node: the logins meanwhile still go to node2 at once (a review finding: they all
    # went back to node1 and waited out the timeout, in blocks, every RETRY_AFTER).
    assert hung.last_failure is not None and hung.last_ok is not None
    hung.last_failure -= targets.RETRY_AFTER  # as if RETRY_AFTER had passed (its first TCP connect too)
    hung.last_ok -= targets.RETRY_AFTER
    loop = asyncio.get_running_loop()

    async def timed_login() -> tuple[float, int]:
        begun = loop.time()
        client, code, _ = await RawClient.open(port, "project:team1:p1", v5=v5, client_id=f"project:team1:p1:{uid()}")
        later.append(client)
        return loop.time() - begun, code

    first_probe = asyncio.ensure_future(timed_login())
    await asyncio.sleep(0.1)  # the probe is connected to node1 and waits for its CONNACK
    assert hung.probing
    quick = await asyncio.gather(*(timed_login() for _ in range(8)))
    assert all(code == 0 and took < 0.5 for took, code in quick), quick
    took, code = await first_probe
    assert code == (0x88 if v5 else 0x03) and took >= 0.9  # the probe alone paid the timeout
    assert hung.failures == 2 and not hung.probing
    for client in later:
        if not client.closed.is_set():
            await client.disconnect()

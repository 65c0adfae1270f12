"""Persistent MQTT 5 clients for ``bench.replicas``, run in a child process of their own (spawned), so that
their CPU is not the front broker's.

Raw asyncio sockets on uvloop, as ``bench.loadgen``; packets are cut by ``broker.mqtt.framer.Framer`` and
read with ``broker.mqtt.packets``. Every client:

- connects with clean start false and a session expiry (its session outlives the connection), subscribes
  QoS 1 to a topic of its own and proves the subscription works: it publishes one probe (QoS 1) to that
  topic and waits until the probe is delivered back to it;
- when its connection closes (its replica died), reconnects through the balancer with the **reconnect
  policy** below until a CONNACK 0 arrives; if the session is not present it subscribes again; then it
  proves it receives again with a new probe. Its reconnect is over when that probe comes back.

Reconnect policy: the first attempt 0-50 ms after the loss (jittered, as a fleet's clients notice at
slightly different times), then a wait drawn uniformly from 0.1-0.5 s after every failed attempt (refused
connection, closed before CONNACK, CONNACK other than 0, no CONNACK within 30 s: MQTT.js's connect
timeout). Clients are bound to ``sources`` loopback addresses in turn (127.0.1.x), as a fleet comes from
many addresses: the front broker, told the real address by PROXY v2, keeps each address to an eighth of
its pending password checks.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from bench.harness import cpu_seconds
from broker.mqtt.framer import Framer
from broker.mqtt.packets import (
    Connect,
    Subscribe,
    decode_connack,
    decode_publish,
    decode_suback,
    encode_connect,
    encode_publish,
    encode_subscribe,
)
from broker.mqtt.properties import Prop

HOST = "127.0.0.1"
SESSION_EXPIRY = 600  # seconds: longer than any trial
FIRST_JITTER = (0.0, 0.05)
BACKOFF = (0.1, 0.5)
ATTEMPT_TIMEOUT = 30.0
# DISCONNECT 0x00 with Session Expiry Interval 0: the session ends now (clean-up between trials).
DISCONNECT_END_SESSION = b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"


def source_address(index: int, sources: int) -> str:
    return f"127.0.1.{index % sources + 1}"


class Refused(Exception):
    """A CONNACK or SUBACK that is not a success; the reason code names the failure."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} 0x{code:02x}")
        self.kind = f"{what} 0x{code:02x}"


class Link:
    """One TCP connection: a reader task acknowledges deliveries, resolves probes and hands over the rest."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = Framer()
        self.control: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.probes: dict[bytes, asyncio.Future[None]] = {}
        self.closed = asyncio.Event()
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while data := await self.reader.read(65536):
                chunk, ends = self.framer.feed(data)
                start = 0
                for end in ends:
                    self._packet(chunk, start, end)
                    start = end
        except (OSError, ValueError):
            pass  # a reset or a malformed stream: both end this connection
        finally:
            self.closed.set()
            self.control.put_nowait(None)
            for future in self.probes.values():
                if not future.done():
                    future.set_exception(ConnectionError("closed before the probe came back"))

    def _packet(self, buf: bytes, start: int, end: int) -> None:
        if buf[start] >> 4 != 3:
            self.control.put_nowait(buf[start:end])
            return
        publish = decode_publish(buf, start, end, True)
        if publish.qos:
            self.writer.write(b"\x40\x02" + publish.packet_id.to_bytes(2, "big"))
        future = self.probes.get(buf[publish.payload_start : end])
        if future is not None and not future.done():
            future.set_result(None)

    async def expect(self, kind: int) -> bytes:
        """The next packet of type ``kind``; PUBACKs of our probes in between are skipped."""
        while True:
            packet = await self.control.get()
            if packet is None:
                raise ConnectionError("closed")
            if packet[0] >> 4 == kind:
                return packet

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


@dataclass
class Episode:
    """One loss of the connection and the reconnect that followed (monotonic seconds, 0 = not reached)."""

    lost: float
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connack: float = 0.0
    session_present: bool = False
    resubscribed: bool = False
    ready: float = 0.0


class Client:
    def __init__(self, port: int, client_id: str, username: str, password: str, topic: str, source: str) -> None:
        self.port, self.client_id, self.topic, self.source = port, client_id, topic, source
        self.username, self.password = username, password
        self.link: Link | None = None
        self.packet_id = 0
        self.probe_seq = 0
        self.episodes: list[Episode] = []
        self.subscribed_at = 0.0

    def _next_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    async def connect(self) -> bool:
        """CONNECT (clean start false, session expiry) to CONNACK 0; True when the session was present."""
        reader, writer = await asyncio.open_connection(HOST, self.port, local_addr=(self.source, 0))
        self.link = link = Link(reader, writer)
        writer.write(encode_connect(Connect(
            level=5, clean_start=False, keepalive=600, client_id=self.client_id,
            properties={Prop.SESSION_EXPIRY_INTERVAL: SESSION_EXPIRY}, username=self.username,
            password=self.password.encode(),
        )))
        packet = await link.expect(2)
        connack = decode_connack(packet, 0, len(packet), True)
        if connack.reason_code:
            raise Refused("CONNACK", connack.reason_code)
        return connack.session_present

    async def subscribe(self) -> None:
        assert self.link is not None
        self.link.writer.write(encode_subscribe(Subscribe(self._next_id(), [(self.topic, 1)]), True))
        packet = await self.link.expect(9)
        code = decode_suback(packet, 0, len(packet), True).reason_codes[0]
        if code > 1:
            raise Refused("SUBACK", code)

    async def probe(self) -> None:
        """Publish to our own topic and wait until it is delivered back: the subscription works."""
        assert self.link is not None
        self.probe_seq += 1
        token = f"probe {self.client_id} {self.probe_seq}".encode()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.link.probes[token] = future
        self.link.writer.write(encode_publish(1, False, False, self.topic, self._next_id(), {}, token))
        try:
            await future
        finally:
            self.link.probes.pop(token, None)

    def drop(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    async def establish(self, resubscribe_always: bool) -> tuple[bool, bool]:
        """Connect, subscribe unless the session is present, probe; (session present, subscribed)."""
        present = await self.connect()
        subscribed = False
        if resubscribe_always or not present:
            await self.subscribe()
            subscribed = True
        await self.probe()
        return present, subscribed

    async def reconnect(self, episode: Episode) -> None:
        await asyncio.sleep(random.uniform(*FIRST_JITTER))
        while True:
            episode.attempts += 1
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT):
                    present = await self.connect()
                    episode.connack = time.monotonic()
                    episode.session_present = present
                    if not present:
                        await self.subscribe()
                        episode.resubscribed = True
                    await self.probe()
                episode.ready = time.monotonic()
                return
            except (OSError, ConnectionError, TimeoutError, Refused) as exc:
                kind = exc.kind if isinstance(exc, Refused) else type(exc).__name__
                episode.failures[kind] = episode.failures.get(kind, 0) + 1
                self.drop()
                await asyncio.sleep(random.uniform(*BACKOFF))

    async def live(self, stopping: asyncio.Event) -> None:
        """Stay connected: after every loss, reconnect; until ``stopping``."""
        while not stopping.is_set():
            assert self.link is not None
            closed = asyncio.ensure_future(self.link.closed.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([closed, stop], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            stop.cancel()
            if stopping.is_set():
                return
            episode = Episode(time.monotonic())
            self.episodes.append(episode)
            self.drop()
            await self.reconnect(episode)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover
        asyncio.run(coro)


async def _wait(event: Any) -> None:
    while not event.is_set():
        await asyncio.sleep(0.005)


def run_persistent_clients(port: int, specs: list[tuple[str, str, str, str]], sources: int, concurrency: int,
                           killed: Any, check: Any, release: Any, out: Any) -> None:
    """``specs``: (client id, username, password, topic) per client. Reports to ``out`` three times:

    1. once every client is connected, subscribed and probed: {"connected", "failed", "seconds", "cpu"};
    2. after ``killed`` is set, once every client that lost its connection is ready again (or 120 s
       passed): {"episodes": [[index, lost, attempts, failures, connack, present, resubscribed, ready]],
       "cpu"};
    3. after ``check`` is set: every client probes once more: {"answering", "silent"}.

    Then, on ``release``, every client ends its session (DISCONNECT with session expiry 0) and leaves.
    """
    _run(_persistent(port, specs, sources, concurrency, killed, check, release, out))


async def _persistent(port: int, specs: list[tuple[str, str, str, str]], sources: int, concurrency: int,
                      killed: Any, check: Any, release: Any, out: Any) -> None:
    clients = [Client(port, cid, user, pw, topic, source_address(i, sources))
               for i, (cid, user, pw, topic) in enumerate(specs)]
    gate = asyncio.Semaphore(concurrency)
    failed = 0
    start = time.monotonic()
    cpu0 = cpu_seconds(os.getpid())

    async def first(client: Client) -> bool:
        async with gate:
            for _ in range(5):  # an initial login storm may meet "server busy": retry as a client would
                try:
                    async with asyncio.timeout(ATTEMPT_TIMEOUT * 2):
                        await client.establish(resubscribe_always=True)
                    return True
                except (OSError, ConnectionError, TimeoutError, Refused):
                    client.drop()
                    await asyncio.sleep(random.uniform(*BACKOFF))
        return False

    ok = await asyncio.gather(*(first(c) for c in clients))
    failed = ok.count(False)
    up = [c for c, good in zip(clients, ok, strict=True) if good]
    out.put({"connected": len(up), "failed": failed, "seconds": time.monotonic() - start,
             "cpu": cpu_seconds(os.getpid()) - cpu0})
    stopping = asyncio.Event()
    lives = [asyncio.ensure_future(c.live(stopping)) for c in up]
    await _wait(killed)
    cpu0 = cpu_seconds(os.getpid())
    await asyncio.sleep(1.0)  # every connection of the dead replica has been closed by now
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(e.ready == 0.0 for c in up for e in c.episodes):
        await asyncio.sleep(0.05)
    episodes = [[i, e.lost, e.attempts, e.failures, e.connack, e.session_present, e.resubscribed, e.ready]
                for i, c in enumerate(up) for e in c.episodes]
    out.put({"episodes": episodes, "cpu": cpu_seconds(os.getpid()) - cpu0})
    await _wait(check)

    async def answers(client: Client) -> bool:
        try:
            async with asyncio.timeout(10):
                await client.probe()
            return True
        except (OSError, ConnectionError, TimeoutError, AssertionError):
            return False

    answered = await asyncio.gather(*(answers(c) for c in up))
    out.put({"answering": answered.count(True), "silent": answered.count(False)})
    await _wait(release)
    stopping.set()
    await asyncio.gather(*lives, return_exceptions=True)
    for client in up:
        if client.link is not None:
            client.link.writer.write(DISCONNECT_END_SESSION)
    await asyncio.sleep(0.5)
    for client in up:
        client.drop()

"""The one raw MQTT 3.1.1/5 client of the tests, on a plain asyncio stream: exact about bytes and reason codes.

Two ways to drive it:

- hand-driven (``RawClient.stream``): the test sends bytes and reads whole packets itself
  (``read_packet``, ``read_until_closed``), nothing is answered for it;
- acknowledging (``RawClient.attach``, ``RawClient.open``): a reader task acknowledges incoming
  QoS 1/2 deliveries like a compliant client, queues them as ``Msg``, and queues every other
  packet for ``expect``; ``subscribe`` and ``publish`` run the whole flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from broker.mqtt.framer import Framer
from broker.mqtt.packets import (
    PacketType,
    Subscribe,
    Will,
    decode_ack,
    decode_connack,
    decode_publish,
    decode_suback,
    encode_ack,
    encode_subscribe,
)
from broker.mqtt.properties import Properties
from tests.support.front import PASSWORD, uid
from tests.support.mqtt_bytes import connect, publish

TIMEOUT = 5.0
NO_MATCHING_SUBSCRIBERS = 0x10


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


async def read_packet(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """One whole packet (fixed header included)."""
    async with asyncio.timeout(timeout):
        head = await reader.readexactly(1)
        length = 0
        shift = 0
        while True:
            b = (await reader.readexactly(1))[0]
            head += bytes((b,))
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        return head + await reader.readexactly(length)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = TIMEOUT, *, reset_ok: bool = False) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout).

    ``reset_ok``: a reset ends the read like a close (otherwise it is an error)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                if not reset_ok:
                    raise
                break
            if not chunk:
                break
            data += chunk
    return data


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, v5: bool = False,
                 *, acknowledge: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.v5 = v5
        self.messages: asyncio.Queue[Msg] = asyncio.Queue()
        self.control: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._next_id = 0
        self._task = asyncio.ensure_future(self._read()) if acknowledge else None

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    async def stream(cls, port: int, limit: int = 2**16) -> RawClient:
        """A hand-driven client (TCP_NODELAY): nothing is read but what the test reads."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    @classmethod
    async def attach(cls, port: int, v5: bool) -> RawClient:
        """An acknowledging client, not connected at the MQTT level yet."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, v5, acknowledge=True)

    @classmethod
    async def open(
        cls,
        port: int,
        username: str | None,
        *,
        v5: bool,
        client_id: str | None = None,
        password: str | None = PASSWORD,
        clean: bool = True,
        will: Will | None = None,
        props: Properties | None = None,
    ) -> tuple[RawClient, int, Properties]:
        """Connect an acknowledging client; returns it, the CONNACK code and (v5) the CONNACK properties."""
        client = await cls.attach(port, v5)
        if client_id is None:
            client_id = f"{username}:{uid()}" if username else f"raw-{uid()}"
        client.send(connect(client_id, username, None if username is None else password, v5=v5, clean=clean,
                            will=will, props=dict(props or {})))
        packet = await client.expect(PacketType.CONNACK)
        connack = decode_connack(packet, 0, len(packet), v5)
        return client, connack.reason_code, connack.properties

    # -- bytes ------------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def read_packet(self, timeout: float = TIMEOUT) -> bytes:
        """One whole packet (fixed header included); hand-driven clients only."""
        assert self._task is None, "an acknowledging client reads by itself: use expect()"
        return await read_packet(self.reader, timeout)

    async def read_until_closed(self, timeout: float = TIMEOUT, *, reset_ok: bool = False) -> bytes:
        assert self._task is None, "an acknowledging client reads by itself: use wait_closed()"
        return await read_until_closed(self.reader, timeout, reset_ok=reset_ok)

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT."""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close the connection without DISCONNECT."""
        self.writer.close()
        if self._task is None:
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            return
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    # -- the acknowledging reader -------------------------------------------------------------------

    async def _read(self) -> None:
        framer = Framer()
        try:
            while data := await self.reader.read(65536):
                chunk, ends = framer.feed(data)
                start = 0
                for end in ends:
                    self._dispatch(chunk[start:end])
                    start = end
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.control.put_nowait(None)

    def _dispatch(self, packet: bytes) -> None:
        ptype = packet[0] >> 4
        if ptype == PacketType.PUBLISH:
            pub = decode_publish(packet, 0, len(packet), self.v5)
            if pub.qos == 1:
                self.send(encode_ack(PacketType.PUBACK, self.v5, pub.packet_id))
            elif pub.qos == 2:
                self.send(encode_ack(PacketType.PUBREC, self.v5, pub.packet_id))
            payload = packet[pub.payload_start :]
            self.messages.put_nowait(Msg(pub.topic, payload, pub.qos, pub.retain, pub.properties))
        elif ptype == PacketType.PUBREL:
            ack = decode_ack(packet, 0, len(packet), self.v5)
            self.send(encode_ack(PacketType.PUBCOMP, self.v5, ack.packet_id))
        elif ptype != PacketType.PINGRESP:
            self.control.put_nowait((ptype, packet))

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def expect(self, ptype: PacketType, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            item = await self.control.get()
        assert item is not None, f"connection closed while waiting for {ptype.name}"
        got, packet = item
        assert got == ptype, f"expected {ptype.name}, got {PacketType(got).name}: {packet!r}"
        return packet

    async def wait_closed(self, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()

    async def disconnect(self) -> None:
        self.send(bytes((PacketType.DISCONNECT << 4, 0)))
        await self.close()

    # -- MQTT operations (acknowledging clients) ----------------------------------------------------

    async def subscribe(self, *filters: str, qos: int = 2, props: Properties | None = None) -> list[int]:
        pid = self.packet_id()
        self.send(encode_subscribe(Subscribe(pid, [(f, qos) for f in filters], props), self.v5))
        packet = await self.expect(PacketType.SUBACK)
        suback = decode_suback(packet, 0, len(packet), self.v5)
        assert suback.packet_id == pid
        return suback.reason_codes

    async def publish(
        self,
        topic: str,
        payload: bytes = b"x",
        qos: int = 0,
        retain: bool = False,
        props: Properties | None = None,
    ) -> int:
        """Publish and complete the QoS flow; returns the PUBACK/PUBREC reason code (0 for QoS 0)."""
        pid = self.packet_id() if qos else 0
        self.send(publish(topic, payload, v5=self.v5, qos=qos, packet_id=pid, retain=retain, props=props))
        if qos == 0:
            return 0
        packet = await self.expect(PacketType.PUBACK if qos == 1 else PacketType.PUBREC)
        ack = decode_ack(packet, 0, len(packet), self.v5)
        assert ack.packet_id == pid
        if ack.reason_code == NO_MATCHING_SUBSCRIBERS:
            ack.reason_code = 0  # v5 success: Mosquitto had no subscriber for it
        if qos == 2 and ack.reason_code < 0x80:
            self.send(encode_ack(PacketType.PUBREL, self.v5, pid))
            comp = await self.expect(PacketType.PUBCOMP)
            assert decode_ack(comp, 0, len(comp), self.v5).packet_id == pid
        return ack.reason_code

    async def next_message(self, timeout: float = TIMEOUT) -> Msg:
        async with asyncio.timeout(timeout):
            return await self.messages.get()

    async def until(self, topic: str, timeout: float = TIMEOUT) -> list[Msg]:
        """Every message received up to and including the first one on `topic`."""
        seen: list[Msg] = []
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.messages.get()
                seen.append(msg)
                if msg.topic == topic:
                    return seen

    def drain(self) -> list[Msg]:
        """The messages queued so far."""
        out: list[Msg] = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out


async def connect_ok(port: int, username: str | None, v5: bool, **kw: Any) -> RawClient:
    client, code, _ = await RawClient.open(port, username, v5=v5, **kw)
    assert code == 0, f"CONNACK 0x{code:02x} for {username!r}"
    return client


def topics(msgs: list[Msg]) -> list[str]:
    return [m.topic for m in msgs]

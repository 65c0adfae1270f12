"""Issue 13 (a): a CONNECT refused before login as malformed or over a cap is answered at once, but its
connection is closed only linger.Tarpit.HOLD seconds later, so a client sending such CONNECTs in a loop
cannot churn thousands of connections a second; ordinary refusals (a wrong password) close at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.linger import Tarpit
from broker.mqtt.packets import decode_connack
from tests.support.front import VERSIONS, FrontFactory, front_port, uid
from tests.support.mqtt_bytes import connect, connect_raw
from tests.support.raw_client import connect_ok, read_packet, read_until_closed

USER = "project:team1:p1"
T = "ff/v1/team1/c"
LIMITS: dict[str, Any] = {"max_packet_size": 1_048_576, "connect_timeout": 5, "max_connect_size": 4096}


async def answer_and_close(port: int, data: bytes, v5: bool) -> tuple[bytes, float, float]:
    """Send ``data``; what came back, seconds to the first answer (or the close), seconds to the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(data)
    got = b""
    if v5:
        got = await read_packet(reader)
    answered = time.monotonic() - started
    got += await read_until_closed(reader, timeout=5.0, reset_ok=True)
    closed = time.monotonic() - started
    writer.close()
    return got, answered, closed


@pytest.mark.parametrize("v5", VERSIONS)
async def test_an_oversized_connect_is_answered_at_once_and_closed_later(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits=LIMITS)
    port = front_port(front)
    big = connect(f"{USER}:{uid()}", USER, "p" * 8000, v5=v5)
    held = asyncio.ensure_future(answer_and_close(port, big, v5))
    await asyncio.sleep(0.2)
    # While it is held, everyone else is served as usual.
    client = await connect_ok(port, USER, v5)
    await client.subscribe(f"{T}/x", qos=1)
    await client.publish(f"{T}/x", b"hi", qos=1)
    assert (await client.next_message()).payload == b"hi"
    await client.close()
    got, answered, closed = await held
    if v5:
        assert decode_connack(got, 0, len(got), True).reason_code == 0x95 and answered < 0.5
    assert Tarpit.HOLD * 0.8 <= closed < Tarpit.HOLD + 2


async def test_a_malformed_connect_is_held_too(make_front: FrontFactory) -> None:
    front = await make_front(limits=LIMITS)
    _, _, closed = await answer_and_close(front_port(front), connect_raw(name=b"MQTX"), False)
    assert closed >= Tarpit.HOLD * 0.8


@pytest.mark.parametrize("v5", VERSIONS)
async def test_a_wrong_password_is_closed_at_once(make_front: FrontFactory, v5: bool) -> None:
    front = await make_front(limits=LIMITS)
    got, _, closed = await answer_and_close(front_port(front), connect(f"{USER}:{uid()}", USER, "wrong", v5=v5), v5)
    assert got and closed < 0.5 * Tarpit.HOLD  # refused by the backend: no tarpit


async def test_a_full_tarpit_closes_at_once() -> None:
    class Transport:
        closed = paused = 0

        def close(self) -> None:
            self.closed += 1

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0

    tarpit = Tarpit(size=2)
    tarpit.HOLD = 0.05
    held = [Transport() for _ in range(3)]
    assert [tarpit.hold(t) for t in held] == [True, True, False]  # the third: the caller closes it
    assert [t.paused for t in held] == [1, 1, 0]
    await asyncio.sleep(0.15)
    assert [t.closed for t in held] == [1, 1, 0] and tarpit.held == 0
    assert tarpit.hold(held[2])  # room again

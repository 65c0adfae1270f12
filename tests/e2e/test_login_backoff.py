"""Issue 13, item 3: failed logins back off per username and address, before bcrypt, against a real
Mosquitto; one misconfigured client does not slow the others behind the same address."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.auth import backoff
from tests.support.front import PASSWORD, VERSIONS, FrontFactory, front_port, uid
from tests.support.raw_client import RawClient


async def code(port: int, username: str, password: str, v5: bool) -> int:
    client, reason, _ = await RawClient.open(port, username, v5=v5, password=password, client_id=f"{username}:{uid()}")
    await client.close()
    return reason


@pytest.mark.parametrize("v5", VERSIONS)
async def test_repeated_failures_back_off_and_a_success_clears_them(
    make_front: FrontFactory, v5: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backoff, "FIRST", 0.5)
    front = await make_front()
    port = front_port(front)
    bad, busy = (0x86, 0x89) if v5 else (0x04, 0x03)
    for _ in range(backoff.PAIR_FREE):
        assert await code(port, "project:team1:p1", "wrong", v5) == bad
    # Past the allowance: refused at once as busy, the right password too, before any bcrypt check.
    started = time.monotonic()
    assert await code(port, "project:team1:p1", "wrong", v5) == busy
    assert await code(port, "project:team1:p1", PASSWORD, v5) == busy
    assert time.monotonic() - started < 0.3
    # Another identity behind the same address is not slowed.
    assert await code(port, "project:team1:p2", PASSWORD, v5) == 0
    # The back-off ends; a success clears the count.
    await asyncio.sleep(0.6)
    assert await code(port, "project:team1:p1", PASSWORD, v5) == 0
    assert await code(port, "project:team1:p1", "wrong", v5) == bad

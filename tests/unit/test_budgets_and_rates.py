"""The Sans-I/O side of work budgets and publish rates: a session that yields (Continue) or waits for the
rate limiter (RateCheck) keeps every packet, in order; the token buckets never let more through than
their burst plus their rate."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.mqtt.packets import Connect, encode_connack, encode_connect
from broker.session import AuthResult, Continue, RateCheck, SessionSettings
from broker.session.ratelimit import ConnectRates, PublishLimiter, PublishRates, RatePair, TokenBucket
from tests.support.mqtt_bytes import publish, split_packets, subscribe
from tests.support.session_driver import DrivenSession
from tests.unit.test_session_live import Readable


def established(settings: SessionSettings) -> DrivenSession:
    s = DrivenSession(settings, peer="test")
    s.receive_client(encode_connect(Connect(5, True, 60, "alice", username="alice", password=b"pw")))
    s.auth_done(AuthResult(True, "alice", Readable("a/"), "team1"))
    s.upstream_connected()
    s.receive_upstream(encode_connack(True, False, 0))
    s.out_client.clear()
    s.out_upstream.clear()
    s.actions.clear()
    return s


def topics_upstream(s: DrivenSession) -> list[bytes]:
    got = split_packets(b"".join(s.out_upstream))
    s.out_upstream.clear()
    return got


def test_a_read_over_its_work_budget_continues_next_turn_in_order() -> None:
    s = established(SessionSettings(work_budget=2048))
    burst = [publish(f"a/cold/{i}", b"x" * 100, v5=True) for i in range(100)]
    burst += [subscribe([(f"a/s/{i}", 0)], v5=True, packet_id=i + 1) for i in range(50)]
    s.receive_client(b"".join(burst))
    turns = 1
    while s.actions:
        assert s.actions == [Continue()]
        assert not s.reading_client  # the I/O layer stops reading the client meanwhile
        s.actions.clear()
        s.continue_client()
        turns += 1
    assert turns > 5
    assert topics_upstream(s) == burst
    assert s.reading_client
    assert s.stats.msgs_in == 100 and s.stats.limit_hits["work_budget"] == turns - 1


def test_fast_path_packets_are_not_charged() -> None:
    s = established(SessionSettings(work_budget=1024))
    s.receive_client(publish("a/warm", b"1", v5=True))
    s.receive_client(b"".join(publish("a/warm", b"x", v5=True) for _ in range(1000)))
    assert s.actions == [] and len(topics_upstream(s)) == 1001


def test_publishes_past_the_allowance_wait_for_the_rate_check() -> None:
    s = established(SessionSettings())
    s.allow_publishes(10, 1 << 40)
    burst = [publish("a/t", str(i).encode(), v5=True) for i in range(25)]
    s.receive_client(b"".join(burst))
    assert s.actions == [RateCheck()] and s.stats.msgs_in == 10
    assert topics_upstream(s) == burst[:10]
    s.actions.clear()
    s.receive_client(publish("a/t", b"later", v5=True))  # read while held: queued behind, in order
    assert topics_upstream(s) == []
    s.allow_publishes(0, 0)  # nothing left in the bucket: the held one still goes (the bucket runs into debt)
    assert topics_upstream(s) == burst[10:11] and s.actions == [RateCheck()]
    s.actions.clear()
    s.allow_publishes(100, 1 << 40)
    assert topics_upstream(s) == [*burst[11:], publish("a/t", b"later", v5=True)]
    assert s.stats.msgs_in == 26


def test_a_byte_allowance_smaller_than_one_packet_still_makes_progress() -> None:
    s = established(SessionSettings())
    s.allow_publishes(1 << 40, 10)
    big = publish("a/t", b"p" * 500, v5=True)
    s.receive_client(big + big)
    for _ in range(2):
        if s.actions:
            s.actions.clear()
            s.allow_publishes(1 << 40, 10)
    assert topics_upstream(s) == [big, big]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(1, 1000),
    burst=st.floats(1, 1000),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 500)), min_size=1, max_size=50),
)
def test_a_bucket_never_lets_more_than_burst_plus_rate_times_time(
    rate: float, burst: float, steps: list[tuple[float, int]]
) -> None:
    """Whatever the pattern, what goes through while the bucket is not in debt (the caller waits otherwise)
    is at most burst + rate x elapsed, plus the one take that ran it into debt."""
    bucket = TokenBucket(rate, burst, 0.0)
    now, sent, last = 0.0, 0.0, 0.0
    for delay, amount in steps:
        now += delay
        wait = bucket.take(amount, now)
        sent += amount
        last = amount
        if wait:
            now += wait  # the caller waits until the debt is paid
    assert sent <= burst + rate * now + last + 1e-6


def test_the_allowance_is_a_tenth_of_a_second_at_most_and_the_team_shares() -> None:
    client = RatePair(1000, 5000, None, None, 0.0)
    team = RatePair(400, 400, None, None, 0.0)
    assert PublishLimiter(client, None).allowance(0.0)[0] == 100
    assert PublishLimiter(client, team).allowance(0.0)[0] == 40  # the team's tenth (40) is below a quarter (100)
    limiter = PublishLimiter(None, RatePair(None, None, 1000, 100, 0.0))
    assert limiter.allowance(0.0)[1] == 25  # a quarter of the team's 100 bytes


def test_a_reload_retunes_team_buckets_in_place() -> None:
    rates = PublishRates(None, (100, 100, None, None))
    held = rates.limiter("team1", 0.0)
    assert held is not None and isinstance(held.team, RatePair)
    rates.configure(None, (10, 10, None, None), 0.0)
    assert held.team.messages is not None and held.team.messages.rate == 10
    rates.configure(None, None, 0.0)
    assert held.team.messages is None  # the team limit is gone for connections already holding it too
    assert rates.limiter("team1", 0.0) is None


def test_connect_rates_per_source_are_bounded_in_memory() -> None:
    rates = ConnectRates(1, 2)
    rates.MAX_SOURCES = 10
    assert rates.allow("a", 0.0) and rates.allow("a", 0.0) and not rates.allow("a", 0.0)
    assert rates.allow("b", 0.0)
    for i in range(50):
        rates.allow(f"x{i}", 0.0)
    assert len(rates._buckets) <= 10
    assert rates.allow("a", 1.0)  # a token back after a second


async def test_password_checks_take_turns_by_source_and_username() -> None:
    """One worker; 20 checks queued from one address, then one from another: the other runs second, not
    21st. Inside one address, usernames take turns too."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from broker.auth.fair_queue import FairQueue

    order: list[str] = []
    gate = threading.Event()

    def job(name: str) -> str:
        gate.wait(5)
        time.sleep(0.002)
        order.append(name)
        return name

    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = FairQueue(pool, 1)
        tasks = [asyncio.ensure_future(queue.run("10.0.0.1", "guess", job, f"flood{i}")) for i in range(20)]
        tasks += [asyncio.ensure_future(queue.run("10.0.0.1", "alice", job, "alice"))]
        tasks += [asyncio.ensure_future(queue.run("10.0.0.2", "bob", job, "bob"))]
        await asyncio.sleep(0.01)
        assert queue.queued == 21  # one is running (waiting at the gate)
        gate.set()
        results = await asyncio.gather(*tasks)
    assert sorted(results) == sorted(order)
    assert order[0] == "flood0"
    assert set(order[1:4]) == {"bob", "alice", "flood1"}  # each of the others gets a turn before the flood goes on


async def test_the_same_credentials_checked_at_once_cost_one_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet reconnecting after an outage: 50 CONNECTs with the same credentials, one bcrypt check; a wrong
    password among them is checked on its own and refused."""
    import bcrypt

    from broker.auth import users as users_module

    calls: list[bytes] = []
    real = users_module._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(users_module, "_checkpw", counting)
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))
    auth = users_module.Authenticator({"alice": hashed}, allow_anonymous=False, cache_ttl=0)
    try:
        verdicts = await asyncio.gather(
            *(auth.check("alice", b"pw", f"10.0.0.{i % 5}") for i in range(50)), auth.check("alice", b"wrong")
        )
    finally:
        auth.close()
    assert [v.ok for v in verdicts] == [True] * 50 + [False]
    assert sorted(calls) == [b"pw", b"wrong"]
    assert auth.pending == 0


async def test_one_address_holds_at_most_an_eighth_of_the_queue_and_leavers_free_their_place() -> None:
    import bcrypt

    from broker.auth.users import Authenticator

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=12))  # slow enough to keep the queue full
    auth = Authenticator({"alice": hashed}, allow_anonymous=False, cache_ttl=0, workers=1, max_pending=64)
    try:
        flood = [asyncio.ensure_future(auth.check("alice", f"guess{i}".encode(), "10.0.0.9")) for i in range(20)]
        await asyncio.sleep(0.05)
        verdicts = [f.result() for f in flood if f.done()]
        assert len(verdicts) == 20 - 8 and all(v.busy for v in verdicts)  # 8 pending (an eighth of 64), the rest busy
        other = asyncio.ensure_future(auth.check("alice", b"wrong", "10.0.0.7"))  # another address is not busy
        await asyncio.sleep(0.05)
        assert not other.done()
        for f in flood:
            f.cancel()  # the flood's clients leave: their queued checks are not run
        await asyncio.sleep(0.05)
        assert auth._queue.queued_for("10.0.0.9") == 0 and auth._pending_by_source.get("10.0.0.9", 0) <= 1
        verdict = await asyncio.wait_for(other, 10)
        assert not verdict.ok and not verdict.busy
    finally:
        auth.close()

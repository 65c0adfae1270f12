"""LoginBackoff: per (address, username), per username and per address allowances, doubling, bounds."""

from __future__ import annotations

import pytest

from broker.auth import backoff
from broker.auth.backoff import LoginBackoff, source_of


def fail(b: LoginBackoff, source: str, user: str | None, n: int, now: float = 0.0) -> None:
    for _ in range(n):
        b.failed(source, user, now)


def test_a_pair_is_blocked_once_its_allowance_is_used_and_the_block_doubles() -> None:
    b = LoginBackoff()
    fail(b, "10.0.0.1", "alice", backoff.PAIR_FREE - 1)
    assert not b.blocked("10.0.0.1", "alice", 0.0)
    b.failed("10.0.0.1", "alice", 0.0)
    assert b.blocked("10.0.0.1", "alice", 0.0) and not b.blocked("10.0.0.1", "alice", backoff.FIRST)
    b.failed("10.0.0.1", "alice", 10.0)
    assert b.blocked("10.0.0.1", "alice", 10.0 + backoff.FIRST) and not b.blocked(
        "10.0.0.1", "alice", 12.0 + 2 * backoff.FIRST
    )
    assert not b.blocked("10.0.0.2", "alice", 0.0)  # the same user elsewhere: its own allowance
    assert not b.blocked("10.0.0.1", "bob", 0.0)  # another user behind the same address
    b.succeeded("10.0.0.1", "alice")
    assert not b.blocked("10.0.0.1", "alice", 10.0)


def test_the_block_is_capped_and_forgotten() -> None:
    b = LoginBackoff()
    fail(b, "a", "u", backoff.PAIR_FREE + 30)
    assert b.blocked("a", "u", backoff.LONGEST - 0.01) and not b.blocked("a", "u", backoff.LONGEST + 0.01)
    fail(b, "a", "u", 1, now=1.0)
    assert not b.blocked("a", "u", 1.0 + backoff.FORGET + 1)  # left alone long enough: forgotten


def test_a_username_guessed_from_many_addresses_and_a_sprayer_are_blocked() -> None:
    b = LoginBackoff()
    for i in range(backoff.USER_FREE):
        b.failed(f"10.0.{i}.1", "alice", 0.0)
    assert b.blocked("10.9.9.9", "alice", 0.0)
    assert not b.blocked("10.9.9.9", "bob", 0.0)
    for i in range(backoff.SOURCE_FREE):
        b.failed("10.1.1.1", f"user{i}", 0.0)
    assert b.blocked("10.1.1.1", "someone-new", 0.0)


def test_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff, "MAX_KEYS", 10)
    b = LoginBackoff()
    for i in range(100):
        b.failed(f"s{i}", f"u{i}", 0.0)
    assert len(b) <= 30


def test_a_full_table_evicts_its_oldest_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the bound a sixteenth of the oldest keys goes at once (one at a time, every insert walked past all the
    slots deleted before: 70 µs per insert at 100,000 keys); the newest failures are all still counted."""
    monkeypatch.setattr(backoff, "MAX_KEYS", 160)
    b = LoginBackoff()
    for i in range(1_000):
        b.failed(f"10.0.{i // 256}.{i % 256}", f"u{i}", 0.0)
    assert len(b) <= 3 * 160
    for i in range(990, 1_000):  # the last ten sources are remembered
        for k in range(backoff.SOURCE_FREE - 1):  # blocked only if its first failure is still counted
            b.failed(f"10.0.{i // 256}.{i % 256}", f"v{i}-{k}", 0.0)
        assert b.blocked(f"10.0.{i // 256}.{i % 256}", "w", 0.0)


def test_a_key_failing_thousands_of_times_stays_at_the_longest_back_off() -> None:
    b = LoginBackoff()
    for _ in range(5_000):
        b.failed("10.0.0.1", "alice", 0.0)
    assert b.blocked("10.0.0.1", "alice", backoff.LONGEST - 1)
    assert not b.blocked("10.0.0.1", "alice", backoff.LONGEST + 1)


def test_source_of() -> None:
    assert source_of("127.0.0.1:5555") == "127.0.0.1"
    assert source_of("[::1]:5555") == "[::1]"
    assert source_of("?") == "?"

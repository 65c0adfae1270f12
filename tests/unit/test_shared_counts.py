"""The counts the workers of one process share (broker.shared_counts): caps, a dead worker's share, buckets."""

from __future__ import annotations

import multiprocessing
import os
import signal

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.session.ratelimit import PublishRates
from broker.shared_counts import CONNECTIONS, LocalCounts, SharedCounts, SharedRatePair


def test_local_and_shared_counts_answer_alike() -> None:
    shared = SharedCounts(2, slots=64, buckets=16)
    for counts in (LocalCounts(), shared.attach(0)):
        assert counts.take("team:a", 2) and counts.take("team:a", 2)
        assert not counts.take("team:a", 2)  # the cap: nothing counted
        assert counts.total("team:a") == 2
        counts.release("team:a")
        assert counts.take("team:a", 2)
        assert counts.take("team:b", None)  # no cap
        assert counts.add(CONNECTIONS, 1) == 1 and counts.add(CONNECTIONS, 1) == 2
        assert counts.add(CONNECTIONS, -1) == 1


def test_two_workers_share_one_cap() -> None:
    shared = SharedCounts(2, slots=64, buckets=16)
    one, two = shared.attach(0), shared.attach(1)
    assert one.take("team:a", 3) and two.take("team:a", 3) and one.take("team:a", 3)
    assert not two.take("team:a", 3) and not one.take("team:a", 3)
    one.release("team:a")
    assert two.take("team:a", 3)  # a slot freed by one worker is the other's
    assert one.total("team:a") == two.total("team:a") == 3


def _take_many(shared: SharedCounts, index: int, attempts: int, cap: int, out: multiprocessing.Queue[int]) -> None:
    counts = shared.attach(index)
    out.put(sum(counts.take("team:race", cap) for _ in range(attempts)))


def test_forked_workers_racing_never_exceed_the_cap() -> None:
    shared = SharedCounts(4, slots=64, buckets=16)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_take_many, args=(shared, i, 2000, 1000, out)) for i in range(4)]
    for proc in procs:
        proc.start()
    taken = sum(out.get(timeout=30) for _ in procs)
    for proc in procs:
        proc.join(10)
    assert taken == 1000  # 8,000 attempts from 4 processes at once: exactly the cap
    assert shared.attach(0).total("team:race") == 1000


def _hold_and_die(shared: SharedCounts, index: int) -> None:
    counts = shared.attach(index)
    for _ in range(5):
        counts.take("team:a", None)
    counts.add(CONNECTIONS, 7)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_workers_share_is_freed_by_the_parent() -> None:
    shared = SharedCounts(2, slots=64, buckets=16)
    alive = shared.attach(0)
    alive.take("team:a", None)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_hold_and_die, args=(shared, 1))
    proc.start()
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert alive.total("team:a") == 6 and alive.total(CONNECTIONS) == 7
    assert shared.free_worker(1) == 12
    assert alive.total("team:a") == 1 and alive.total(CONNECTIONS) == 0
    assert alive.take("team:a", 2) and not alive.take("team:a", 2)  # the lock was not left held either


def test_a_full_table_refuses_a_new_key_and_keeps_the_others() -> None:
    shared = SharedCounts(1, slots=8, buckets=4)
    counts = shared.attach(0)
    for i in range(8):
        assert counts.take(f"team:{i}", None)
    assert not counts.take("team:new", None)  # no row left: a cap fails closed
    counts.release("team:3")  # a freed row makes room
    assert counts.take("team:new", None)
    assert all(counts.total(f"team:{i}") == (0 if i == 3 else 1) for i in range(8))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans(), st.integers(0, 1)), max_size=300))
def test_shared_counts_match_a_dict_under_any_sequence(steps: list[tuple[int, bool, int]]) -> None:
    # A small table: probe chains wrap, rows move back on delete; totals must stay what a dict says.
    shared = SharedCounts(2, slots=64, buckets=4)
    workers = [shared.attach(0), shared.attach(1)]
    held: dict[tuple[int, str], int] = {}  # what each worker counted
    for key, up, worker in steps:
        name = f"k{key}"
        if up:
            assert workers[worker].take(name, None)
            held[worker, name] = held.get((worker, name), 0) + 1
        elif held.get((worker, name), 0):
            workers[worker].release(name)
            held[worker, name] -= 1
    for key in range(41):
        name = f"k{key}"
        assert workers[0].total(name) == held.get((0, name), 0) + held.get((1, name), 0)
    live = {name for (_, name), count in held.items() if count}
    assert sum(1 for k in shared.keys if k) == len(live)  # rows whose total fell to 0 were deleted


def test_team_buckets_are_shared_by_the_workers() -> None:
    shared = SharedCounts(2, slots=64, buckets=16)
    spec = (100.0, 100.0, None, None)  # 100 messages/s, burst 100
    one = SharedRatePair(shared.attach(0), "team1", spec)
    two = SharedRatePair(shared.attach(1), "team1", spec)
    assert one.allowance(0.0)[0] == 10  # a tenth of a second's rate at most
    assert one.take(60, 0, 0.0) == 0.0
    assert two.allowance(0.0)[0] == 10 and two.take(60, 0, 0.0) > 0  # 120 of 100: the other worker is in debt
    assert abs(one.take(0, 0, 0.0) - 0.2) < 1e-9  # 20 in debt at 100/s: both wait 0.2 s
    assert one.take(0, 0, 0.3) == 0.0  # refilled for everyone
    other = SharedRatePair(shared.attach(1), "team2", spec)
    assert other.take(50, 0, 0.3) == 0.0  # another team has its own bucket


def test_publish_rates_use_shared_team_buckets_when_given() -> None:
    shared = SharedCounts(2, slots=64, buckets=16)
    spec = (10.0, 10.0, None, None)
    one = PublishRates(None, spec, lambda team, spec, _now: SharedRatePair(shared.attach(0), team, spec))
    two = PublishRates(None, spec, lambda team, spec, _now: SharedRatePair(shared.attach(1), team, spec))
    first, second = one.limiter("team1", 0.0), two.limiter("team1", 0.0)
    assert first is not None and second is not None
    assert first.charge(10, 100, 0.0) == 0.0
    assert second.charge(5, 50, 0.0) > 0  # the team's 10 messages went through the other worker


def test_a_full_bucket_table_forgets_full_buckets_then_gives_up() -> None:
    shared = SharedCounts(1, slots=8, buckets=2)
    counts = shared.attach(0)
    rates = (10.0, 10.0, 0.0, 0.0)
    assert counts.buckets("a", 10, 0, 0.0, rates) == (0.0, float("inf"))
    assert counts.buckets("b", 10, 0, 0.0, rates) is not None
    assert counts.buckets("c", 1, 0, 0.0, rates) is None  # both in use and not refilled
    assert counts.buckets("c", 1, 0, 5.0, rates) == (9.0, float("inf"))  # refilled ones are forgotten

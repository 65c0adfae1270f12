"""The counts the workers of one process share (broker.shared_counts): caps, a dead worker's share, buckets."""

from __future__ import annotations

import multiprocessing
import os
import signal

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.session.ratelimit import PublishRates
from broker.shared_counts import AUTH_PENDING, CONNECTIONS, LocalCounts, SharedCounts, SharedRatePair, _key


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


def test_a_table_at_its_bound_refuses_capped_keys_and_lets_uncapped_ones_in_uncounted() -> None:
    shared = SharedCounts(1, slots=8, buckets=4)
    counts = shared.attach(0)
    for i in range(6):  # three quarters of 8: the bound (a probe always finds an empty slot)
        assert counts.take(f"team:{i}", 5)
    assert not counts.take("team:new", 5)  # no row left: a cap fails closed
    assert counts.take("team:free", None) and counts.total("team:free") == 0  # no cap: in, uncounted
    counts.release("team:free")  # finds no row: nothing else is touched
    assert all(counts.total(f"team:{i}") == 1 for i in range(6))
    counts.release("team:3")  # a freed row makes room
    assert counts.take("team:new", 5)
    # The process-wide counts have rows of their own: never refused for want of one.
    assert counts.add(CONNECTIONS, 1) == 1 and counts.take(AUTH_PENDING, 10)


def test_a_release_never_takes_another_workers_count() -> None:
    shared = SharedCounts(2, slots=16, buckets=4)
    one, two = shared.attach(0), shared.attach(1)
    assert one.take("team:a", None)
    two.release("team:a")  # worker two counted none: a stray release changes nothing
    two.release("team:b")
    assert one.total("team:a") == 1 and one.total("team:b") == 0


def test_free_worker_rebuilds_rows_a_dead_worker_left_half_moved() -> None:
    shared = SharedCounts(2, slots=16, buckets=4)
    one, two = shared.attach(0), shared.attach(1)
    assert one.take("team:a", None) and two.take("team:a", None)
    slot = shared.counts.find(_key("team:a"), insert=False)
    twin = (slot + 3) & 15  # as a move killed half way leaves it: the key twice, the columns split
    shared.keys[twin] = shared.keys[slot]
    shared.columns[0][twin], shared.columns[0][slot] = shared.columns[0][slot], 0
    shared.used[0] += 1
    shared.free_worker(1)
    assert sum(1 for k in shared.keys if k) == 1 and one.total("team:a") == 1  # one row, worker one's count


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


def test_a_full_bucket_table_forgets_refilled_buckets_at_most_once_a_second() -> None:
    shared = SharedCounts(1, slots=8, buckets=4)
    counts = shared.attach(0)
    rates = (10.0, 10.0, 0.0, 0.0)
    assert counts.buckets("a", 10, 0, 1.0, rates) == (0.0, float("inf"))  # full again at 2.0
    assert counts.buckets("b", 10, 0, 1.0, rates) is not None
    assert counts.buckets("c", 10, 0, 1.0, rates) is not None  # three rows: the bound of 4
    assert counts.buckets("d", 1, 0, 1.5, rates) is None  # none refilled yet
    assert counts.buckets("d", 1, 0, 1.8, rates) is None  # no second sweep within a second
    assert counts.buckets("d", 1, 0, 5.0, rates) == (9.0, float("inf"))  # refilled ones are forgotten


def test_refilled_rows_are_judged_by_their_own_rates() -> None:
    # Per-source connect buckets and team buckets share the table: a new source's connect must not drop a
    # team bucket that is in debt at its own (slower) rate (a review finding).
    shared = SharedCounts(1, slots=8, buckets=16)
    counts = shared.attach(0)
    team = SharedRatePair(counts, "team1", (10.0, 1000.0, None, None))
    assert team.take(990, 0, 1.0) == 0.0  # 10 tokens left, full again at 100 s
    for i in range(20):  # connect buckets (1/s, burst 1) fill the table and refill after a second
        counts.buckets(f"\x00connect:10.0.0.{i}", 1, 0, 2.0 + i, (1.0, 1.0, 0.0, 0.0))
    tokens = counts.buckets(team.name, 0, 0, 30.0, team.rates)
    assert tokens is not None and abs(tokens[0] - 300.0) < 1e-6  # its row kept: 10 + 29 s x 10, not a fresh 1000
    assert team._own is None


def test_a_team_without_a_row_gets_a_bucket_of_its_worker() -> None:
    shared = SharedCounts(1, slots=8, buckets=4)
    counts = shared.attach(0)
    spec = (10.0, 10.0, None, None)
    held = [SharedRatePair(counts, f"team{i}", spec) for i in range(3)]
    for pair in held:
        pair.take(10, 0, 1.0)
    late = SharedRatePair(counts, "team9", spec)
    assert late.take(10, 0, 1.2) == 0.0 and late.take(10, 0, 1.2) > 0  # limited, by its own bucket
    assert late._own is not None

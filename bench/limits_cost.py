"""The rate limiter's and keep-alive's cost on the relay path (issue 13): CPU per message within 5 %.

    .venv/bin/python -m bench.limits_cost [--repeat 5] [--count 300000] [--workers 2]

Rate limiter: two fronts side by side, identical but for ``limits.publish_rate`` (off, and on with limits
the run never reaches: client 1,000,000 messages/s, team 2,000,000, so every PUBLISH pays the two counter
compares and a checkpoint every 100,000 messages, but no waiting), the same clients and topics, QoS 0,
runs alternating; mqtt-front CPU per message (user+sys from /proc), median [min-max] of paired runs.

With ``--workers 2`` both fronts run two workers, and the team bucket is the one the workers share in
memory (broker.shared_counts): what sharing adds per message. The cost of each shared-counts operation
(a cap's take and release, a bucket charge) against the single-process dict is printed too.

Keep-alive: its per-packet cost is one integer increment per read, in every run above; the rest is the
0.5 s sweep, measured here in-process over 10,000 established connections (µs per sweep, and the share
of one core it takes at one sweep per 0.5 s).
"""

from __future__ import annotations

import argparse
import time

from bench.harness import FrontSetup
from bench.paired import TOPIC_SETS, print_paired, run_off_on

RATES = {"client": {"messages": 1_000_000, "bytes": 1e9}, "team": {"messages": 2_000_000}}


def sweep_cost(connections: int = 10_000, sweeps: int = 50) -> float:
    """µs per keep-alive sweep over ``connections`` established connections (no socket: the sweep only
    reads counters)."""
    from broker.relay import ClientConnection
    from broker.session import State

    conns = []
    for _ in range(connections):
        conn = ClientConnection.__new__(ClientConnection)
        conn.session = type("S", (), {"keep_alive": 60, "state": State.ESTABLISHED})()
        conn._closed = False
        conn._read_paused = False
        conn.reads = 0
        conn._swept_reads = -1
        conn.quiet_since = 0.0
        conns.append(conn)
    start = time.perf_counter()
    for i in range(sweeps):
        now = time.monotonic()
        for conn in conns:
            conn.reads += i & 1  # half the sweeps see traffic
            conn.sweep_keep_alive(now)
    return (time.perf_counter() - start) / sweeps * 1e6


def shared_costs(n: int = 200_000) -> dict[str, float]:
    """µs per operation: a cap's take+release and a team bucket charge, shared by 2 workers and local."""
    import timeit

    from broker.session.ratelimit import RatePair
    from broker.shared_counts import LocalCounts, SharedCounts, SharedRatePair, WorkerCounts

    shared, local = SharedCounts(2).attach(0), LocalCounts()

    def cycle(counts: LocalCounts | WorkerCounts) -> None:
        counts.take("t", None)
        counts.release("t")

    spec = (1e9, 1e9, None, None)
    pair, own = SharedRatePair(shared, "team1", spec), RatePair(*spec, 0.0)
    return {
        "take+release, shared": timeit.timeit(lambda: cycle(shared), number=n) / n,
        "take+release, local": timeit.timeit(lambda: cycle(local), number=n) / n,
        "team bucket charge, shared": timeit.timeit(lambda: pair.take(10, 640, 1.0), number=n) / n,
        "team bucket charge, local": timeit.timeit(lambda: own.take(10, 640, 1.0), number=n) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    w = args.workers
    off = FrontSetup(name=f"-limits-off-w{w}", workers=w)
    on = FrontSetup(limits={"publish_rate": RATES}, name=f"-limits-on-w{w}", workers=w)
    runs, overlaps = run_off_on("limits-cost-", off, on, args.repeat, args.count)
    print(f"\n--workers {args.workers}")
    print_paired(runs, TOPIC_SETS, "publish_rate", args.count, args.repeat, overlaps)
    print("\nshared counts, µs per operation: " + ", ".join(f"{k} {v * 1e6:.2f}" for k, v in shared_costs().items()))
    cost = sweep_cost()
    print(f"\nkeep-alive sweep over 10,000 connections: {cost:.0f} µs per sweep, {cost / 5e5 * 100:.2f} % of a core")


if __name__ == "__main__":
    main()

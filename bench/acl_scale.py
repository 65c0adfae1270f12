"""ACL check cost with 1 team vs 10,000 teams' worth of literal rules (plus the flowfuse preset).

Run: .venv/bin/python bench/acl_scale.py
Caches are disabled (cache_size=0) so every call walks the compiled index.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acl import AclEngine, Action, ClientAcl, Effect, Rule, parse_identity


def team_rules(teams: int) -> list[Rule]:
    """Per-team literal rules as an operator might write them (the last team is the measured one)."""
    rules: list[Rule] = []
    for n in range(teams):
        team = f"team{n}"
        rules += [
            Rule("teamclient", Effect.DENY, Action.BOTH, f"ff/v1/{team}/c/locked/#"),
            Rule("any", Effect.ALLOW, Action.SUBSCRIBE, f"ff/v1/{team}/c/public/${{username}}/#"),
            Rule("user", Effect.ALLOW, Action.BOTH, f"ff/v1/{team}/u/{n}/#"),
        ]
    return rules


def per_call_ns(fn: Callable[[str], bool], args: list[str], rounds: int) -> float:
    timer = timeit.Timer(lambda: [fn(a) for a in args])
    return min(timer.repeat(repeat=5, number=rounds)) / (rounds * len(args)) * 1e9


def bench(label: str, acl: ClientAcl, rounds: int = 300) -> None:
    # 64 distinct topics: with cache_size=0 nothing is remembered anyway.
    pub = [f"ff/v1/team1/p/p{i}/in/msg" for i in range(64)]
    recv = [f"ff/v1/team1/p/p{i}/out/msg" for i in range(64)]
    subs = ["ff/v1/team1/p/+/out/#", "ff/v1/team1/c/#", "ff/v1/+/p/+/out/#", "#"] * 16
    print(
        f"{label:>14}  publish {per_call_ns(acl.check_publish, pub, rounds):6.0f} ns"
        f"  receive {per_call_ns(acl.check_receive, recv, rounds):6.0f} ns"
        f"  subscribe {per_call_ns(acl.check_subscribe, subs, rounds):6.0f} ns"
    )


def main() -> None:
    identity = parse_identity("project:team1:p1")
    for teams in (1, 10_000):
        engine = AclEngine(team_rules(teams), preset="flowfuse")
        acl = engine.for_client(identity, "project:team1:p1:n", cache_size=0)
        bench(f"{teams} teams", acl)
        platform = engine.for_client(parse_identity("forge_platform"), "forge_platform:0", cache_size=0)
        wide = ["ff/v1/+/c/#", "ff/v1/team1/c/#", "ff/v1/+/p/+/out/#", "ff/v1/#"] * 16
        wide_ns = per_call_ns(platform.check_subscribe, wide, 50)
        print(f"{'':>14}  platform subscribe (team wildcards) {wide_ns:6.0f} ns")
    # For reference: the same checks with the default per-client cache.
    bench("10000 + cache", engine.for_client(identity, "project:team1:p1:n"))


if __name__ == "__main__":
    main()

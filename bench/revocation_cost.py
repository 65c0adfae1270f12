"""Live revocation (issue 12): how long one rule change takes to re-evaluate every connected session.

    .venv/bin/python -m bench.revocation_cost [--sessions 10000] [--repeat 5]

In this process: a FrontBroker built from a config file on disk (FlowFuse preset, a users file of
``--sessions`` project identities over 1,000 teams) holds ``--sessions`` established sessions (real
:class:`broker.session.Session` objects, driven through CONNECT, CONNACK, a SUBSCRIBE of two filters and
its SUBACK; no sockets, so the figure is the front broker's own work, not Mosquitto's). The config file
is then rewritten with one deny rule (``ff/v1/${team}/c/secret/#`` for projects) and
``FrontBroker.reload_config()`` is timed: reading and checking the file and the users file, building the
new ACL, swapping, and re-evaluating every session, which revokes one subscription each (an UNSUBSCRIBE
handed to the upstream side). Then the rule is removed again (nothing revoked, every session rebuilt).
Target: all sessions re-evaluated in under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from broker.config import load_config
from broker.mqtt.packets import Connect, Subscribe, encode_connack, encode_connect, encode_suback, encode_subscribe
from broker.mqtt.reasons import DisconnectReason
from broker.server import FrontBroker
from broker.session import AccessPolicy, AuthResult, Session, SessionSettings

SECRET_DENY = {"who": "project", "effect": "deny", "action": "subscribe", "pattern": "ff/v1/${team}/c/secret/#"}


class BenchConnection:
    """What FrontBroker.reevaluate needs of a connection: its session, and the two ways to change it."""

    def __init__(self, session: Session, peer: str) -> None:
        self.session = session
        self.peer = peer
        self.written = 0  # bytes the session handed over for the upstream (the UNSUBSCRIBEs)

    def _drain(self) -> None:
        self.written += sum(len(b) for b in self.session.data_to_upstream())
        self.session.data_to_client()
        self.session.take_actions()

    def replace_policy(self, policy: AccessPolicy) -> list[str]:
        revoked = self.session.replace_policy(policy)
        self._drain()
        return revoked

    def disconnect(self, reason: DisconnectReason, why: str, discard_will: bool = False) -> None:
        self.session.disconnect(reason, why, discard_will)
        self._drain()


def established(front: FrontBroker, username: str, team: str) -> Session:
    session = Session(SessionSettings(), peer="bench")
    session.receive_client(encode_connect(Connect(5, True, 60, username, username=username, password=b"pw")))
    result = front.admission._bind(username, username, "bench")
    session.auth_done(AuthResult(True, username, result.policy, team))
    session.upstream_connected()
    session.receive_upstream(encode_connack(True, False, 0))
    filters = [(f"ff/v1/{team}/c/secret/#", 1), (f"ff/v1/{team}/p/+/out/#", 1)]
    session.receive_client(encode_subscribe(Subscribe(1, filters, {}), True))
    session.receive_upstream(encode_suback(True, 1, [1, 1]))
    session.data_to_client()
    session.data_to_upstream()
    session.take_actions()
    return session


async def run(sessions: int, repeat: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="revocation-"))
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    names = [(f"project:team{i % 1000}:p{i}", f"team{i % 1000}") for i in range(sessions)]
    (folder / "users.yaml").write_text(
        yaml.safe_dump({"users": [{"username": u, "password_hash": hashed} for u, _ in names]})
    )
    base: dict[str, Any] = {
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "upstream": {"url": "mqtt://127.0.0.1:1"},
        "auth": {"users_file": "users.yaml"},
        "acl": {"preset": "flowfuse"},
        "logging": {"level": "warning"},
    }
    path = folder / "front.yaml"
    path.write_text(yaml.safe_dump(base))
    front = FrontBroker(load_config(path), config_path=str(path))
    add, remove, built = [], [], []
    unsubscribe_bytes = 0
    for _ in range(repeat):
        # Fresh sessions each round, every one holding both filters: the rule change revokes one each.
        front.grants.clear()
        start = time.perf_counter()
        for username, team in names:
            conn = BenchConnection(established(front, username, team), "bench")
            front.grants[conn] = front.admission.grant(  # type: ignore[index]
                AuthResult(True, username, conn.session.policy, team), username, "mqtt"
            )
        built.append(time.perf_counter() - start)
        for rules, into in (([SECRET_DENY], add), ([], remove)):
            path.write_text(yaml.safe_dump({**base, "acl": {"preset": "flowfuse", "rules": rules}}))
            start = time.perf_counter()
            report = await front.control.reload()
            into.append((time.perf_counter() - start, report))
        unsubscribe_bytes += sum(c.written for c in front.grants)  # type: ignore[attr-defined]
    return {
        "sessions": sessions,
        "setup_s": statistics.median(built),
        "add": add,
        "remove": remove,
        "unsubscribe_bytes": unsubscribe_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    out = asyncio.run(run(args.sessions, args.repeat))
    print(f"\n{out['sessions']} established sessions (built in {out['setup_s']:.1f} s), {args.repeat} rounds")
    print(f"UNSUBSCRIBE bytes handed to the upstream side: {out['unsubscribe_bytes']}\n")
    print("| reload | seconds, median [min-max] | µs per session | sessions checked | subscriptions revoked |")
    print("|---|---|---|---|---|")
    for name, runs in (("deny rule added", out["add"]), ("deny rule removed", out["remove"])):
        secs = [s for s, _ in runs]
        report = runs[-1][1]
        med = statistics.median(secs)
        print(
            f"| {name} | {med:.3f} [{min(secs):.3f}-{max(secs):.3f}] | {med / out['sessions'] * 1e6:.1f} | "
            f"{report['sessions_checked']} | {report['subscriptions_revoked']} |"
        )


if __name__ == "__main__":
    main()

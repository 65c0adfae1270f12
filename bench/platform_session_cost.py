"""The session's own work per relayed packet with ``acl.source: http`` (warm cache) vs ``local``, no sockets.

    .venv/bin/python -m bench.platform_session_cost

The end-to-end comparison (``python -m bench.platform_cost relay``) moves by 5-10 % between runs on
this machine, as large as the 10 % target. This isolates what ``acl.source`` changes, the way
``bench/session_cost.py`` does for the relay: one established MQTT 3.1.1 session of a project client fed
reads of 8 QoS 0 PUBLISH packets, from the client and from the upstream, best of 7, in ns per packet,
with its policy either the local engine (FlowFuse preset) or ``PlatformPolicy`` over a real
``PlatformClient`` whose cache already holds an allow for every topic (filled before the run, as a warm
platform cache would be; nothing is sent). One topic: the session's own topic caches answer every
packet after the first. 2,048 topics cycled: more than those caches hold (1,024), so every packet asks
the policy.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from acl.engine import AclEngine
from acl.identity import parse_identity
from broker.auth.platform import PlatformClient
from broker.auth.platform_acl import PlatformPolicy
from broker.config import HttpAuthConfig
from broker.mqtt.packets import Connect, encode_connack, encode_connect, encode_publish
from broker.session import AccessPolicy, AuthResult, Session, SessionSettings

USER = "project:team1:proj1"
CLIENT_ID = f"{USER}:n"
PER_READ = 8
READS = 20_000
REPEAT = 7


def policy(source: str, topics: list[str]) -> AccessPolicy:
    if source == "local":
        return AclEngine([], "flowfuse").for_client(parse_identity(USER), CLIENT_ID)
    client = PlatformClient(HttpAuthConfig(auth_url="http://127.0.0.1:9/auth", acl_url="http://127.0.0.1:9/acls",
                                           cache_ttl=3600))
    for topic in topics:  # a warm cache: what earlier checks of these topics left (bench shortcut: no requests)
        for action in ("publish", "deliver"):
            client._store(client._key(USER, CLIENT_ID, action, topic), True)
    return PlatformPolicy(client, USER, CLIENT_ID)


def established(pol: AccessPolicy) -> Session:
    s = Session(SessionSettings(upstream_username="front", upstream_password="pw"), peer="bench")
    s.receive_client(encode_connect(Connect(4, True, 60, CLIENT_ID, username=USER, password=b"x")))
    s.take_actions()
    s.auth_done(AuthResult(True, USER, pol, "team1"))
    s.take_actions()
    s.upstream_connected()
    s.receive_upstream(encode_connack(False, False, 0))
    s.data_to_client()
    s.data_to_upstream()
    return s


def reads(topics: list[str]) -> list[bytes]:
    packets = [encode_publish(0, False, False, t, 0, None, b"x" * 64) for t in topics]
    out = []
    k = 0
    for _ in range(READS):
        out.append(b"".join(packets[(k + i) % len(packets)] for i in range(PER_READ)))
        k = (k + PER_READ) % len(packets)
    return out


def run(feed: Callable[[bytes], None], drain: Callable[[], list[bytes]], data: list[bytes]) -> float:
    start = time.perf_counter()
    for chunk in data:
        feed(chunk)
        drain()
    return (time.perf_counter() - start) / (len(data) * PER_READ) * 1e9


def main() -> None:
    print(f"python {sys.version.split()[0]}, {READS:,} reads of {PER_READ} QoS 0 packets, best of {REPEAT}, ns/packet")
    print("| topics | direction | acl.source local | acl.source http (warm) | http/local |\n|---|---|---|---|---|")
    for name, topics_in, topics_out in (
        ("1", ["ff/v1/team1/p/proj2/in/sensor"], ["ff/v1/team1/p/proj2/out/sensor"]),
        ("2,048", [f"ff/v1/team1/p/proj2/in/k{k:04d}" for k in range(2048)],
         [f"ff/v1/team1/p/proj2/out/k{k:04d}" for k in range(2048)]),
    ):
        inbound, outbound = reads(topics_in), reads(topics_out)
        best: dict[tuple[str, str], float] = {}
        for _ in range(REPEAT):
            for source in ("local", "http"):
                s = established(policy(source, topics_in + topics_out))
                key = (source, "client->upstream")
                best[key] = min(best.get(key, float("inf")), run(s.receive_client, s.data_to_upstream, inbound))
                s = established(policy(source, topics_in + topics_out))
                key = (source, "upstream->client")
                best[key] = min(best.get(key, float("inf")), run(s.receive_upstream, s.data_to_client, outbound))
        for direction in ("client->upstream", "upstream->client"):
            lo, hi = best[("local", direction)], best[("http", direction)]
            print(f"| {name} | {direction} | {lo:.0f} | {hi:.0f} | {hi / lo:.2f}x |")


if __name__ == "__main__":
    main()

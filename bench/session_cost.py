"""CPU per relayed packet inside the Sans-I/O session, without sockets or an event loop.

    .venv/bin/python bench/session_cost.py

The end-to-end suite (``python -m bench``) measures the whole process against Mosquitto, but its
figures move 10-20 % between runs on a shared 2-core machine. This script isolates the part the
front broker's own code decides: one established session (FlowFuse preset ACL, a project client)
fed reads of QoS 0 and QoS 1 PUBLISH packets from the client and deliveries from the upstream, the
way the connection pump feeds it (receive, then hand the bytes over). It reports the best of
several runs in nanoseconds per packet, so a refactor of the hot path can be compared before and
after on the same machine within a few percent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acl.engine import AclEngine
from acl.identity import parse_identity
from acl.rules import Action, Effect, Rule
from broker.mqtt.packets import Connect, encode_connack, encode_connect, encode_publish
from broker.session import AuthResult, Session, SessionSettings

USER = "project:team1:proj1"
TOPIC = "ff/v1/team1/p/proj2/in/sensor"
DELIVERY = "ff/v1/team1/p/proj2/out/sensor"
PER_READ = 8  # packets per read: what one socket read holds under moderate load
READS = 20_000
REPEAT = 7


def established(v5: bool, mount: str = "") -> Session:
    # Mounted sessions' rules are relative to the mount (as FlowFuse's Team Broker rules are).
    acl = AclEngine([Rule("any", Effect.ALLOW, Action.BOTH, "p/#")], "none") if mount else AclEngine([], "flowfuse")
    policy = acl.for_client(parse_identity(USER), f"{USER}:n")
    s = Session(SessionSettings(upstream_username="front", upstream_password="pw"), peer="bench")
    s.receive_client(encode_connect(Connect(5 if v5 else 4, True, 60, f"{USER}:n", username=USER, password=b"x")))
    s.take_actions()
    s.auth_done(AuthResult(True, USER, policy, "team1", mountpoint=mount))
    s.take_actions()
    s.upstream_connected()
    s.receive_upstream(encode_connack(v5, False, 0))
    s.data_to_client()
    s.data_to_upstream()
    return s


def reads(v5: bool, qos: int, topic: str) -> list[bytes]:
    props = {} if v5 else None
    out = []
    pid = 1
    for _ in range(READS):
        packets = []
        for _ in range(PER_READ):
            packets.append(encode_publish(qos, False, False, topic, pid if qos else 0, props, b"x" * 64))
            pid = pid % 65535 + 1
        out.append(b"".join(packets))
    return out


def run(feed: Callable[[bytes], None], drain: Callable[[], list[bytes]], data: list[bytes]) -> float:
    start = time.perf_counter()
    for chunk in data:
        feed(chunk)
        drain()
    return (time.perf_counter() - start) / (len(data) * PER_READ) * 1e9


def main() -> None:
    print(f"python {sys.version.split()[0]}, {READS:,} reads of {PER_READ} packets, best of {REPEAT}")
    for v5 in (False, True):
        for qos in (0, 1):
            inbound = reads(v5, qos, TOPIC)
            outbound = reads(v5, 0, DELIVERY)
            best_in = best_out = float("inf")
            for _ in range(REPEAT):
                s = established(v5)
                best_in = min(best_in, run(s.receive_client, s.data_to_upstream, inbound))
                s = established(v5)
                best_out = min(best_out, run(s.receive_upstream, s.data_to_client, outbound))
            name = f"MQTT {'5' if v5 else '3.1.1'} QoS {qos}"
            print(f"  {name:<16} client->upstream {best_in:7.0f} ns/packet   upstream->client (QoS 0) {best_out:7.0f}")
    # A mounted session (a Team Broker client under ff/v1/<team>/c/): every topic is rewritten both ways.
    mount = "ff/v1/team1/"  # the preset's rules see client topics p/..., upstream topics ff/v1/team1/p/...
    inbound = reads(True, 0, TOPIC.removeprefix(mount))
    outbound = reads(True, 0, DELIVERY)
    best_in = best_out = float("inf")
    for _ in range(REPEAT):
        s = established(True, mount)
        best_in = min(best_in, run(s.receive_client, s.data_to_upstream, inbound))
        s = established(True, mount)
        best_out = min(best_out, run(s.receive_upstream, s.data_to_client, outbound))
    name = "MQTT 5, mounted"
    print(f"  {name:<16} client->upstream {best_in:7.0f} ns/packet   upstream->client (QoS 0) {best_out:7.0f}")


if __name__ == "__main__":
    main()

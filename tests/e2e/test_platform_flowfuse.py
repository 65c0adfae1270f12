"""FlowFuse's semantics end to end, decided by the platform (``auth.http`` + ``acl.source: http``).

The FakePlatform answers as FlowFuse's platform does (``../shared/flowfuse-reference.md``): project-link regexes
over the literal ``ff/v1/...`` topic for ``project:<team>:<project>``, Team Broker rule lists relative to the
mountpoint ``ff/v1/<team>/c/`` for ``<name>@<team>`` (emqx style only: the mountpoint comes from the answer's
``client_attrs``, which go-auth's protocol does not have), and ``$share`` groups limited to ``platform``,
``browser`` and the project's own id. A spy straight on Mosquitto shows what reached the internal broker.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.front import VERSIONS, FrontFactory, uid
from tests.support.mosquitto import Mosquitto
from tests.support.platform import FakePlatform
from tests.support.platform_e2e import (
    STYLES,
    asked,
    auth_bodies,
    auth_body,
    connack,
    login,
    platform_front,
    puback_refused,
    spy_on,
    suback_refused,
)
from tests.support.raw_client import Msg, connect_ok, topics

PA, PB, PC = "project:team1:pa", "project:team1:pb", "project:team2:pc"
ALICE, BOB, CAROL = "alice@team1", "bob@team2", "carol@team1"


def mine(msgs: list[Msg], marker: str) -> list[str]:
    return [m.topic for m in msgs if marker in m.topic]


# -- project link -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_project_link_rules_and_team_isolation(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    for user in (PA, PB, PC):
        platform.add(user)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    t = uid()
    no = suback_refused(v5)
    spy = await spy_on(mosquitto)
    pa = await login(front, platform, PA, v5)
    assert await pa.subscribe(
        "ff/v1/team1/p/+/out/#",  # any project's broadcasts of its team
        f"ff/v1/team1/p/pa/in/{t}/#",  # its own inbox
        "ff/v1/team1/p/pa/res/#",  # replies to its calls
        f"ff/v1/team1/c/{t}/#",  # the team's shared space
        "ff/v1/team1/p/pb/in/#",  # another project's inbox: no
        "ff/v1/+/p/+/out/#",  # every team's broadcasts: no
        "#",
        qos=1,
    ) == [1, 1, 1, 1, no, no, no]
    pc = await login(front, platform, PC, v5)  # team2
    assert await pc.subscribe("ff/v1/team1/#", "ff/v1/team1/p/+/out/#", f"ff/v1/team1/c/{t}/#", qos=1) == [no] * 3
    assert await pc.subscribe(f"ff/v1/team2/p/+/out/{t}/#", qos=1) == [1]
    # team2 cannot write into team1: every topic refused (v5 PUBACK 0x87), nothing reaches Mosquitto.
    for topic in (f"ff/v1/team1/p/pa/in/{t}/x", f"ff/v1/team1/p/pc/out/{t}", f"ff/v1/team1/c/{t}/x",
                  "ff/v1/team1/p/pa/res/x"):
        assert await pc.publish(topic, b"evil", qos=1) == puback_refused(v5, 1), topic
    own = f"ff/v1/team2/p/pc/out/{t}"
    assert await pc.publish(own, b"ok", qos=1) == 0  # its own team still works: the barrier
    assert mine(await spy.until(own), t) == [own]
    assert topics(await pc.until(own)) == [own]

    pb = await login(front, platform, PB, v5)
    sent = [
        f"ff/v1/team1/p/pb/out/{t}",  # its own broadcast
        f"ff/v1/team1/p/pa/in/{t}/x",  # "send to instance" pa
        "ff/v1/team1/p/pa/res/" + t,  # a reply to pa's call
        f"ff/v1/team1/c/{t}/x",  # the team's space
    ]
    for topic in sent:
        assert await pb.publish(topic, b"hi", qos=1) == 0, topic
    assert await pb.publish(f"ff/v1/team1/p/pa/out/{t}", b"x", qos=1) == puback_refused(v5, 1)  # pa's broadcast
    assert mine(await pa.until(sent[-1]), t) == sent
    # Team2 saw nothing of it: a barrier on its own subscription comes next, and nothing before it.
    assert await pc.publish(own, b"again", qos=1) == 0
    assert [m.topic for m in await pc.until(own)] == [own]
    for c in (spy, pa, pb, pc):
        await c.close()


# -- $share groups ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
@pytest.mark.parametrize("style", STYLES)
async def test_share_groups(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, style: str, v5: bool
) -> None:
    for user in (PA, PB, PC):
        platform.add(user)
    front = await platform_front(make_front, platform, style, cache_ttl=30, negative_cache_ttl=30)
    t = uid()
    inbox = f"ff/v1/team1/p/pa/in/{t}/#"
    no = suback_refused(v5)
    # HA mode: two instances of pa share their inbox in the group named after the project.
    members = [await login(front, platform, PA, v5, client_id=f"{PA}:n:{i:04x}") for i in range(2)]
    for member in members:
        assert await member.subscribe(f"$share/pa/{inbox}", qos=1) == [1]
    others = [await login(front, platform, PA, v5) for _ in range(2)]
    assert await others[0].subscribe(f"$share/platform/{inbox}", qos=1) == [1]
    assert await others[1].subscribe(f"$share/browser/{inbox}", qos=1) == [1]
    assert await others[0].subscribe(f"$share/evil/{inbox}", f"$share/pb/{inbox}", qos=1) == [no, no]
    # Another team cannot join pa's group to take its messages, nor another project of the team.
    thief = await login(front, platform, PC, v5)
    assert await thief.subscribe(f"$share/pa/{inbox}", f"$share/platform/{inbox}", qos=1) == [no, no]
    pb = await login(front, platform, PB, v5)
    assert await pb.subscribe(f"$share/pa/{inbox}", qos=1) == [no]  # pb may not read pa's inbox at all
    sent = [f"ff/v1/team1/p/pa/in/{t}/{i}" for i in range(6)]
    for topic in sent:
        assert await pb.publish(topic, b"job", qos=1) == 0
    # Each message reaches exactly one member of the group, and the one member of each of the other groups.
    for other in others:
        assert sorted([(await other.next_message()).topic for _ in sent]) == sorted(sent)
    got: list[str] = []
    async with asyncio.timeout(5):
        while len(got) < len(sent):
            await asyncio.sleep(0.01)
            for member in members:
                got += [m.topic for m in member.drain()]
    assert sorted(got) == sorted(sent)
    # Nothing reached the refused subscribers: a message on their own topics comes first.
    for client, topic in ((thief, f"ff/v1/team2/c/{t}/barrier"), (pb, f"ff/v1/team1/p/pb/in/{t}/barrier")):
        assert await client.subscribe(topic, qos=1) == [1]
        assert await client.publish(topic, qos=1) == 0
        assert topics(await client.until(topic)) == [topic]
    for c in (*members, *others, thief, pb):
        await c.close()


# -- Team Broker (emqx: the mountpoint comes from client_attrs.team) --------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_team_broker_clients_live_in_their_mount(
    make_front: FrontFactory, mosquitto: Mosquitto, platform: FakePlatform, v5: bool
) -> None:
    t = uid()
    alice_pw = platform.add(ALICE, rules=[(f"{t}/sensors/#", "both"), (f"{t}/cmd/+", "subscribe")])
    bob_pw = platform.add(BOB)  # the fake's default rules: ("#", "both"), relative to ff/v1/team2/c/
    carol_pw = platform.add(CAROL, rules=[(f"{t}/sensors/#", "subscribe")])
    platform.add(PA)
    front = await platform_front(make_front, platform, "emqx", cache_ttl=30, negative_cache_ttl=30)
    no = suback_refused(v5)
    spy = await spy_on(mosquitto)
    mount1 = "ff/v1/team1/c/"
    # FlowFuse's rule: a Team Broker client's id is its username.
    assert await connack(front, ALICE, alice_pw, v5, client_id=f"{ALICE}:x") == (0x85 if v5 else 0x02)
    alice = await connect_ok(front.bound["mqtt"][1], ALICE, v5, client_id=ALICE, password=alice_pw)
    assert auth_bodies(platform, "emqx")[-1] == auth_body("emqx", ALICE, alice_pw, ALICE)
    project = await login(front, platform, PA, v5)
    assert await project.subscribe(f"{mount1}{t}/#", qos=1) == [1]
    assert await alice.subscribe(
        f"{t}/sensors/#",
        f"{t}/cmd/#",  # FlowFuse matches the filter as a topic: cmd/+ lets it subscribe cmd/#
        f"{t}/other/#",
        qos=1,
    ) == [1, 1, no]
    # The platform saw the client-visible topics and filters (its rules are relative to the mount).
    alice_asked = [(a, topic) for user, a, topic in asked(platform, "emqx") if user == ALICE]
    assert alice_asked == [("subscribe", f"{t}/sensors/#"), ("subscribe", f"{t}/cmd/#"), ("subscribe", f"{t}/other/#")]
    # A shared subscription inside the mount: $share/<group>/ stays in front, the mount goes before the filter.
    carol = await connect_ok(front.bound["mqtt"][1], CAROL, v5, client_id=CAROL, password=carol_pw)
    assert await carol.subscribe(f"$share/g/{t}/sensors/#", qos=1) == [1]
    assert ("subscribe", f"$share/g/{t}/sensors/#") in [(a, tp) for u, a, tp in asked(platform, "emqx") if u == CAROL]

    # Alice publishes inside her mount: Mosquitto and the team's projects see the full topic, she sees hers.
    assert await alice.publish(f"{t}/sensors/temp", b"21", qos=1) == 0
    assert mine(await spy.until(f"{mount1}{t}/sensors/temp"), t) == [f"{mount1}{t}/sensors/temp"]
    assert topics(await project.until(f"{mount1}{t}/sensors/temp")) == [f"{mount1}{t}/sensors/temp"]
    assert (await alice.next_message()).topic == f"{t}/sensors/temp"
    assert (await carol.next_message()).topic == f"{t}/sensors/temp"
    assert await alice.publish(f"{t}/cmd/go", b"x", qos=1) == puback_refused(v5, 1)  # subscribe-only rule

    # Commands from the project: cmd/go is delivered, cmd/go/deep is not (the literal topic matches no rule).
    for topic in (f"{mount1}{t}/cmd/go/deep", f"{mount1}{t}/cmd/go"):
        assert await project.publish(topic, b"c", qos=1) == 0
    assert [m.topic for m in await alice.until(f"{t}/cmd/go")] == [f"{t}/cmd/go"]
    assert ("subscribe", f"{t}/cmd/go/deep") in [(a, tp) for u, a, tp in asked(platform, "emqx") if u == ALICE]

    # Bob (team2, rules "#") subscribes to everything he can: that is team2's space only.
    bob = await connect_ok(front.bound["mqtt"][1], BOB, v5, client_id=BOB, password=bob_pw)
    assert await bob.subscribe("#", "+/#", f"$share/g/{t}/#", qos=1) == [1, 1, 1]
    assert await alice.publish(f"{t}/sensors/secret", b"team1 only", qos=1) == 0
    assert await bob.publish(f"{t}/sensors/temp", b"team2", qos=1) == 0  # lands in ff/v1/team2/c/
    seen = [m.topic for m in await spy.until(f"ff/v1/team2/c/{t}/sensors/temp") if t in m.topic]
    assert seen[-2:] == [f"{mount1}{t}/sensors/secret", f"ff/v1/team2/c/{t}/sensors/temp"]
    bob_got = await bob.until(f"{t}/sensors/temp")
    assert {m.topic for m in bob_got} == {f"{t}/sensors/temp"}  # never team1's message
    assert [m.topic for m in await alice.until(f"{t}/sensors/secret")] == [f"{t}/sensors/secret"]
    bob_asked = {topic for user, _, topic in asked(platform, "emqx") if user == BOB}
    assert not any(topic.startswith("ff/v1/") for topic in bob_asked)  # relative: the mount is not his to name
    for c in (spy, alice, bob, carol, project):
        await c.close()


# -- the team's schema agent ------------------------------------------------------------------------------


@pytest.mark.parametrize("v5", VERSIONS)
async def test_the_schema_agent_connects_with_the_client_id_flowfuse_gives_it(
    make_front: FrontFactory, platform: FakePlatform, v5: bool
) -> None:
    agent, other = "agent:team1@team1", "agent:team2@team2"
    platform.add(agent)
    platform.add(other)
    front = await platform_front(make_front, platform, "emqx")
    # FlowFuse's agent uses `<team>-agent@<team>`; another team's agent cannot take that id.
    assert await connack(front, agent, platform.passwords[agent], v5, client_id="team1-agent@team1") == 0
    refused = 0x85 if v5 else 0x02
    assert await connack(front, other, platform.passwords[other], v5, client_id="team1-agent@team1") == refused
    assert await connack(front, agent, platform.passwords[agent], v5, client_id="team2-agent@team2") == refused

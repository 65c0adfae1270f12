"""What a reload or a revoke must not let through: a login checked across it, a will that is now denied,
a packet id the client is using, a worker's share of the platform bound."""

from __future__ import annotations

import asyncio
import time

import bcrypt
import jwt as pyjwt
import pytest

from acl.identity import parse_identity
from broker.admission import Grant
from broker.auth.jwt import JwtVerifier
from broker.auth.users import Authenticator
from broker.config import parse_config
from broker.mqtt.packets import Connect, PacketType, Will, decode_unsubscribe, encode_connack, encode_connect
from broker.mqtt.reasons import DisconnectReason
from broker.reload import worker_share
from broker.server import FrontBroker
from broker.session import Authenticate, AuthResult, SessionSettings
from tests.support.mqtt_bytes import publish, split_packets
from tests.support.session_driver import DrivenSession
from tests.unit.test_session_live import Readable, subscribed

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))


async def test_a_password_check_that_spans_a_reload_refuses_and_is_not_cached() -> None:
    auth = Authenticator({"alice": HASH}, allow_anonymous=False, cache_ttl=60)
    try:
        checking = asyncio.ensure_future(auth.check("alice", b"pw"))
        await asyncio.sleep(0)  # bcrypt runs in its thread now
        auth.replace_users({})  # alice removed meanwhile
        assert not (await checking).ok
        auth.replace_users({"alice": HASH})
        assert (await auth.check("alice", b"pw")).ok  # nothing stale was remembered either way
    finally:
        auth.close()


def front(rules: list[dict[str, object]] | None = None) -> FrontBroker:
    acl = {"preset": "none", "rules": rules} if rules is not None else {}
    return FrontBroker(
        parse_config(
            {
                "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                "upstream": {"url": "mqtt://127.0.0.1:1"},
                "auth": {"allow_anonymous": True},
                "acl": acl,
            }
        )
    )


ANYONE = Readable("")  # the policy the login was checked with (the tests below only compare it)


def test_a_login_admitted_across_a_revoke_of_its_identity_or_team_is_refused() -> None:
    f = front()
    try:
        grant = Grant("anonymous", None, "c1", "", team=None)
        since = f.control.generation
        assert f.control.admitted(grant, since, ANYONE) is ANYONE  # nothing ran meanwhile
        f.control.revoke(team="team1")
        team1 = Grant("platform", "project:team1:p1", "project:team1:p1", "", team="team1")
        team2 = Grant("platform", "project:team2:p3", "project:team2:p3", "", team="team2")
        assert f.control.admitted(team1, since, ANYONE) == "credentials revoked"
        assert not isinstance(f.control.admitted(team2, since, ANYONE), str)
        assert f.control.admitted(team1, f.control.generation, ANYONE) is ANYONE
        f.control.revoke(username="project:team2:p3")
        assert f.control.admitted(team2, since, ANYONE) == "credentials revoked"
    finally:
        f.authenticator.close()


def test_a_login_admitted_across_a_reload_that_turns_anonymous_off_is_refused() -> None:
    f = front()
    try:
        since = f.control.generation
        f.authenticator.allow_anonymous = False
        f.control._generation += 1  # what a reload does
        assert f.control.admitted(Grant("anonymous", None, "c1", ""), since, ANYONE) == "anonymous access turned off"
    finally:
        f.authenticator.close()


def test_a_login_admitted_across_a_reload_gets_the_rules_now_in_force() -> None:
    """The policy was bound before the reload (then the login waited: the platform, bcrypt, limits.store):
    the session must not keep the old rules until the next reload."""
    f = front([{"who": "anonymous", "effect": "allow", "action": "both", "pattern": "a/#"}])
    after = front([{"who": "anonymous", "effect": "allow", "action": "both", "pattern": "b/#"}])
    try:
        since = f.control.generation
        grant = Grant("anonymous", None, "c1", "")
        old = f.admission.acl.for_client(parse_identity(None), "c1")
        f.admission.acl = after.admission.acl
        f.control._generation += 1  # what a reload does
        policy = f.control.admitted(grant, since, old)
        assert not isinstance(policy, str) and policy is not old
        assert (policy.check_publish("a/x"), policy.check_publish("b/x")) == (False, True)
    finally:
        f.authenticator.close()
        after.authenticator.close()


@pytest.mark.parametrize("v5", [True, False])
def test_a_will_that_is_no_longer_allowed_ends_the_session_without_it(v5: bool) -> None:
    s = DrivenSession(SessionSettings(), peer="test")
    will = Will("b/status", b"gone", 1, False)
    s.receive_client(
        encode_connect(Connect(5 if v5 else 4, True, 60, "alice", username="alice", password=b"pw", will=will))
    )
    s.auth_done(AuthResult(True, "alice", Readable("a/", "b/"), "team1"))
    s.upstream_connected()
    s.receive_upstream(encode_connack(v5, False, 0))
    s.out_upstream.clear()
    s.out_client.clear()
    assert s.replace_policy(Readable("a/")) == []
    assert s.closed
    assert s.out_upstream == [b"\xe0\x00"]  # a normal DISCONNECT upstream: the broker drops the will
    if v5:
        assert s.out_client[0][0] >> 4 == PacketType.DISCONNECT


def test_revoked_and_removed_sessions_drop_their_will_an_operators_kick_does_not() -> None:
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(encode_connect(Connect(5, True, 60, "alice", username="alice", password=b"pw")))
    s.auth_done(AuthResult(True, "alice", Readable("a/"), "team1"))
    s.upstream_connected()
    s.receive_upstream(encode_connack(True, False, 0))
    s.out_upstream.clear()
    s.disconnect(DisconnectReason.ADMINISTRATIVE_ACTION, "kicked")
    assert s.out_upstream == []


def test_our_packet_id_avoids_the_clients_publishes_in_flight() -> None:
    s = DrivenSession(SessionSettings(), peer="test")
    s.receive_client(encode_connect(Connect(5, True, 60, "alice", username="alice", password=b"pw")))
    s.auth_done(AuthResult(True, "alice", Readable("a/", "b/"), "team1"))
    s.upstream_connected()
    s.receive_upstream(encode_connack(True, False, 0))
    s.out_upstream.clear()
    s.out_client.clear()  # the CONNACK
    subscribed(s, True, ["b/#"])
    s.receive_client(publish("a/x", b"1", v5=True, qos=1, packet_id=65535))  # its PUBACK has not come yet
    s.out_upstream.clear()
    s.replace_policy(Readable("a/"))
    (unsub,) = split_packets(b"".join(s.out_upstream))
    assert decode_unsubscribe(unsub, 0, len(unsub), True).packet_id == 65534


def test_a_reloaded_config_keeps_each_workers_share_of_the_platform_bound() -> None:
    config = parse_config(
        {
            "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
            "auth": {"http": {"auth_url": "http://127.0.0.1:3000/a", "max_concurrency": 64}},
        }
    )
    assert worker_share(config, 2).auth.http.max_concurrency == 32  # type: ignore[union-attr]


async def test_a_jwt_login_checked_before_a_reload_that_drops_its_key_is_refused() -> None:
    """The token was verified by the verifier before the reload; the grant is made after it. It must
    carry the fingerprint of the verifier that checked it, so that admitted() checks it again."""
    old_secret, new_secret = "s" * 40, "t" * 40
    f = FrontBroker(
        parse_config(
            {
                "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                "upstream": {"url": "mqtt://127.0.0.1:1"},
                "auth": {"allow_anonymous": False, "jwt": {"secret": old_secret, "algorithms": ["HS256"]}},
            }
        )
    )
    try:
        token = pyjwt.encode({"sub": "project:team1:p1", "exp": int(time.time()) + 300}, old_secret).encode()
        client_id = "project:team1:p1:n"
        since = f.control.generation
        result = await f.admission.admit(Authenticate("jwt", token, client_id), "mqtt", None, "127.0.0.1:1")
        assert result.ok and result.policy is not None
        assert f.admission.jwt is not None
        new_config = f.admission.jwt.config.model_copy(update={"secret": new_secret})
        f.admission.jwt = JwtVerifier(new_config)  # the reload's swap, while the login was still waiting
        f.control._generation += 1
        grant = f.admission.grant(result, client_id, "mqtt", ("jwt", token))
        assert f.control.admitted(grant, since, result.policy) == "token no longer accepted: bad signature"
    finally:
        f.authenticator.close()

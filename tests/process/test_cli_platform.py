"""`mqtt-front acl explain` and `mqtt-front check` with the platform (auth.http), JWT keys and mountpoints.

The platform is tests/support/platform.py's FakePlatform, a real HTTP server on its own event loop thread;
the commands run in-process through ``broker.cli.main`` (their own event loop, or none) or as subprocesses.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.auth.users import hash_password
from broker.cli import main
from tests.support.cli import ROOT, run_cli
from tests.support.platform import EMQX_ACL, EMQX_AUTH, FakePlatform

pytestmark = pytest.mark.timeout(60)

MOUNT = "ff/v1/team1/c/"
HEADER_SECRET = "Bearer hdr-s3cret-0123456789"
URL_PASSWORD = "url-pa55word-xyz"


@pytest.fixture
def platform() -> Iterator[FakePlatform]:
    with FakePlatform().in_thread() as running:
        yield running


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "front.yaml") -> str:
    data = {"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}], **data}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # an invalid configuration file ends the command before it starts
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def platform_config(tmp_path: Path, platform: FakePlatform, style: str = "emqx", **http: Any) -> str:
    base = platform.emqx_config(**http) if style == "emqx" else platform.go_auth_config(**http)
    return write_config(tmp_path, {"auth": {"http": base}, "acl": {"source": "http"}})


def line_starting(out: str, prefix: str) -> str:
    found = [line.strip() for line in out.splitlines() if line.lstrip().startswith(prefix)]
    assert found, f"no line starting with {prefix!r} in:\n{out}"
    return found[0]


# ---------------------------------------------------------------- acl explain, acl.source: http


def test_explain_http_not_asked_shows_the_request(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    config = platform_config(tmp_path, platform)
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "project:team1:p1",
                       "--publish", "ff/v1/team1/p/p1/out/x")
    assert code == 3, out
    lines = out.splitlines()
    assert lines[0] == "identity: project user='project:team1:p1' team='team1'"
    assert lines[2] == "UNDECIDED publish 'ff/v1/team1/p/p1/out/x'"
    assert lines[3].startswith("decided by the platform (acl.source: http, style emqx): not asked")
    body = {"username": "project:team1:p1", "topic": "ff/v1/team1/p/p1/out/x", "action": "publish"}
    assert f"POST {platform.base_url}{EMQX_ACL} {json.dumps(body, separators=(',', ':'))}" in lines[3]
    assert platform.acl.count == 0 and platform.auth.count == 0  # nothing was asked


@pytest.mark.parametrize(
    ("user", "args", "allowed", "sent"),
    [
        ("project:team1:p1", ["--publish", "ff/v1/team1/p/p1/out/x"], True,
         {"topic": "ff/v1/team1/p/p1/out/x", "action": "publish"}),
        ("project:team2:p2", ["--publish", "ff/v1/team1/p/p1/out/x"], False,
         {"topic": "ff/v1/team1/p/p1/out/x", "action": "publish"}),
        ("project:team1:p1", ["--subscribe", "ff/v1/team1/p/+/out/#"], True,
         {"topic": "ff/v1/team1/p/+/out/#", "action": "subscribe"}),
        # A shared subscription goes to the platform as the client sent it; FlowFuse checks the group.
        ("project:team1:p1", ["--subscribe", "$share/p1/ff/v1/team1/p/+/out/#"], True,
         {"topic": "$share/p1/ff/v1/team1/p/+/out/#", "action": "subscribe"}),
        ("project:team1:p1", ["--subscribe", "$share/p9/ff/v1/team1/p/+/out/#"], False,
         {"topic": "$share/p9/ff/v1/team1/p/+/out/#", "action": "subscribe"}),
        # A delivery check is a subscribe of the literal topic (EMQX's protocol has no "deliver").
        ("project:team1:p1", ["--receive", "ff/v1/team1/p/p2/out/status"], True,
         {"topic": "ff/v1/team1/p/p2/out/status", "action": "subscribe"}),
        ("forge_platform", ["--publish", "ff/v1/team7/d/dev1/command"], True,
         {"topic": "ff/v1/team7/d/dev1/command", "action": "publish"}),
    ],
)
def test_explain_asks_the_platform_emqx(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    platform: FakePlatform,
    user: str,
    args: list[str],
    allowed: bool,
    sent: dict[str, str],
) -> None:
    platform.add(user)
    config = platform_config(tmp_path, platform)
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", user, *args, "--ask-platform")
    assert code == (0 if allowed else 2), out
    lines = out.splitlines()
    assert lines[2].startswith("ALLOW " if allowed else "DENY "), out
    assert lines[3].startswith("decided by the platform (acl.source: http, style emqx): POST ")
    assert lines[3].split(" -> ")[1].startswith("allow in " if allowed else "deny in "), out
    assert platform.acl.requests == [{"username": user, **sent}]
    assert platform.auth.count == 0  # explain never logs in: that could consume a one-time credential


def test_explain_asks_the_platform_go_auth(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    platform.add("project:team1:p1")
    config = platform_config(tmp_path, platform, style="go-auth")
    user = ["--user", "project:team1:p1", "--client-id", "project:team1:p1:n"]
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, *user, "--subscribe", "ff/v1/team1/p/p1/in/#",
                       "--ask-platform")
    assert code == 0, out
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, *user, "--receive", "ff/v1/team2/p/x/out/a",
                       "--ask-platform")
    assert code == 2, out
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, *user, "--publish", "ff/v1/team1/p/p9/in/a",
                       "--ask-platform")
    assert code == 0, out
    assert "style go-auth" in out
    base = {"username": "project:team1:p1", "clientid": "project:team1:p1:n"}
    assert platform.go_acl.requests == [
        {**base, "topic": "ff/v1/team1/p/p1/in/#", "acc": 4},
        {**base, "topic": "ff/v1/team2/p/x/out/a", "acc": 1},
        {**base, "topic": "ff/v1/team1/p/p9/in/a", "acc": 2},
    ]
    assert platform.go_auth.count == 0


@pytest.mark.parametrize("style", ["emqx", "go-auth"])
@pytest.mark.parametrize("args", [["--publish", "ff/v1/team1/c/a"], ["--subscribe", "$share/g/ff/v1/team1/c/#"],
                                  ["--receive", "ff/v1/team1/c/b"]])
def test_explain_shows_the_request_it_sends(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform, style: str, args: list[str]
) -> None:
    config = platform_config(tmp_path, platform, style=style)
    base = ["acl", "explain", "-c", config, "--user", "project:team1:p1", "--client-id", "project:team1:p1:n", *args]
    code, out, _ = cli(capsys, *base)
    assert code == 3, out
    shown = json.loads(out.splitlines()[3].split(" sends POST ", 1)[1].split(" ", 1)[1])
    code, out, _ = cli(capsys, *base, "--ask-platform")
    endpoint = platform.acl if style == "emqx" else platform.go_acl
    assert endpoint.requests == [shown]


def test_explain_missing_header_env_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    config = platform_config(tmp_path, platform, headers={"X-Token": "env:MQTT_FRONT_NOT_SET_ANYWHERE"})
    code, out, err = cli(capsys, "acl", "explain", "-c", config, "--user", "alice@team1", "--publish", "a",
                         "--ask-platform")
    assert code == 1
    assert "auth.http.headers.X-Token: environment variable MQTT_FRONT_NOT_SET_ANYWHERE is not set" in err
    assert "form:" not in out
    assert platform.acl.count == 0


def test_explain_with_a_mountpoint_asks_about_the_client_visible_topic(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    platform.add("alice@team1", rules=[("sensors/#", "both")])
    config = platform_config(tmp_path, platform)
    base = ["acl", "explain", "-c", config, "--user", "alice@team1", "--mountpoint", MOUNT, "--ask-platform"]

    code, out, _ = cli(capsys, *base, "--subscribe", "sensors/#")
    assert code == 0, out
    assert f"mountpoint: '{MOUNT}' (--mountpoint); the ACL checks the client-visible topic 'sensors/#'" in out
    assert f"upstream: subscribe '{MOUNT}sensors/#'" in out
    code, out, _ = cli(capsys, *base, "--subscribe", "$share/g1/sensors/+")
    assert code == 0, out
    assert f"upstream: subscribe '$share/g1/{MOUNT}sensors/+'" in out
    code, out, _ = cli(capsys, *base, "--publish", "sensors/t1")
    assert code == 0, out
    assert f"upstream: publish '{MOUNT}sensors/t1'" in out
    code, out, _ = cli(capsys, *base, "--receive", "sensors/t2")
    assert code == 0, out
    assert f"upstream: a message on '{MOUNT}sensors/t2' reaches the client as 'sensors/t2'" in out
    code, out, _ = cli(capsys, *base, "--publish", "other/t")
    assert code == 2, out
    assert f"upstream: publish '{MOUNT}other/t'" in out
    # The platform saw the topics as the client sees them, never the mounted ones.
    assert [r["topic"] for r in platform.acl.requests] == [
        "sensors/#", "$share/g1/sensors/+", "sensors/t1", "sensors/t2", "other/t"
    ]


def test_explain_without_a_mountpoint_says_where_it_comes_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    platform.add("alice@team1", rules=[("sensors/#", "both")])
    config = platform_config(tmp_path, platform)
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "alice@team1", "--publish", "sensors/a",
                       "--ask-platform")
    assert code == 0, out
    assert "mountpoint: set by the platform's answer at login (client_attrs.team" in out
    assert "upstream:" not in out
    assert line_starting(out, "authenticated by:").startswith("authenticated by: the platform (auth.http auth_url")
    assert line_starting(out, "form:") == (
        "form: teamclient team='team1'; a Team Broker form (FlowFuse mounts it at ff/v1/<team>/c/)"
    )
    assert line_starting(out, "client id:") == (
        "client id: 'alice@team1' allowed; rule exact: the username only (acl.client_id_suffix: false)"
    )


def test_explain_platform_failures_fail_closed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    platform.add("project:team1:p1")
    config = platform_config(tmp_path, platform, timeout=0.5)
    args = ["acl", "explain", "-c", config, "--user", "project:team1:p1", "--publish", "ff/v1/team1/c/x",
            "--ask-platform"]
    platform.acl.fail = 500
    code, out, err = cli(capsys, *args)
    assert code == 2, out
    assert out.splitlines()[2] == "DENY publish 'ff/v1/team1/c/x'"
    assert "no usable answer (error): refused, the broker fails closed" in out
    assert "platform_error" in err and "status 500" in err
    platform.acl.reset()
    platform.acl.garbage = b"<html>oops</html>"
    code, out, _ = cli(capsys, *args)
    assert code == 2 and "(error)" in out, out
    platform.acl.reset()
    platform.acl.delay = 2.0
    code, out, _ = cli(capsys, *args)
    assert code == 2, out
    assert "no answer within 0.5s (timeout): refused, the broker fails closed" in out


def test_explain_platform_down(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with FakePlatform().in_thread() as stopped:
        config = platform_config(tmp_path, stopped, timeout=2)
    code, out, err = cli(capsys, "acl", "explain", "-c", config, "--user", "project:team1:p1",
                         "--publish", "ff/v1/team1/c/x", "--ask-platform")
    assert code == 2, out
    assert "(error): refused, the broker fails closed" in out
    assert "platform_error" in err


def test_explain_invalid_topic_is_not_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    config = platform_config(tmp_path, platform)
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "project:team1:p1",
                       "--publish", "ff/v1/+/x", "--ask-platform")
    assert code == 2, out
    assert "decided by invalid topic name" in out
    assert platform.acl.count == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mountpoint", "ff/v1/team1/c"], "--mountpoint: mountpoint 'ff/v1/team1/c' must end with '/'"),
        (["--mountpoint", "ff/v1/+/c/"], "must be a plain topic prefix"),
        (["--subscribe", "a/#", "--retain"], "--retain goes with --publish"),
    ],
)
def test_explain_bad_arguments_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform, args: list[str], message: str
) -> None:
    config = platform_config(tmp_path, platform)
    if "--subscribe" not in args:
        args = [*args, "--publish", "a/b"]
    code, _, err = cli(capsys, "acl", "explain", "-c", config, "--user", "alice@team1", *args)
    assert code == 1
    assert message in err


def test_explain_ask_platform_needs_acl_source_http(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, {"acl": {"preset": "flowfuse"}})
    code, _, err = cli(capsys, "acl", "explain", "-c", config, "--user", "project:t:p", "--publish", "a",
                       "--ask-platform")
    assert code == 1
    assert "acl.source is local" in err


# ---------------------------------------------------------------- acl explain, local mountpoints and identities


def users_file(tmp_path: Path, *names: str) -> str:
    path = tmp_path / "users.yaml"
    hashed = hash_password("pw", 4)
    path.write_text(yaml.safe_dump({"users": [{"username": n, "password_hash": hashed} for n in names]}))
    return str(path)


def test_explain_local_mountpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "auth": {"users_file": users_file(tmp_path, "alice@team1", "device:team1:d1", "project:team1:pA")},
        "acl": {
            "preset": "flowfuse",
            "mountpoints": {"teamclient": "ff/v1/${team}/c/", "project": "ff/v1/${team}/p/${project}/"},
            "rules": [{"who": "teamclient", "effect": "allow", "action": "both", "pattern": "#"}],
        },
    })
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "alice@team1", "--publish", "sensors/t")
    assert code == 0, out
    assert out.splitlines()[3] == "decided by rules[0]: allow both '#' for teamclient"
    assert line_starting(out, "authenticated by:").startswith("authenticated by: the users file")
    assert f"mountpoint: '{MOUNT}' (acl.mountpoints.teamclient 'ff/v1/${{team}}/c/'); " in out
    assert f"upstream: publish '{MOUNT}sensors/t'" in out
    # The ACL sees the client-visible topic: the preset's full-topic rule does not match it.
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "alice@team1", "--subscribe", "$SYS/#")
    assert code == 2, out
    assert f"upstream: subscribe '{MOUNT}$SYS/#'" in out
    # A kind without an entry is not mounted.
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "device:team1:d1",
                       "--publish", "ff/v1/team1/d/d1/status")
    assert code == 0, out
    assert "mountpoint: none (acl.mountpoints has no entry for this kind)" in out
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", "project:team1:pA",
                       "--subscribe", "in/#")
    assert "mountpoint: 'ff/v1/team1/p/pA/'" in out
    assert "upstream: subscribe 'ff/v1/team1/p/pA/in/#'" in out


@pytest.mark.parametrize(
    ("user", "first", "form"),
    [
        ("mq:hosted:team1:inst1", "identity: teamnode user='mq:hosted:team1:inst1' team='team1'",
         "form: teamnode team='team1' project='inst1'; a Team Broker form"),
        ("mq:remote:team1:dev1", "identity: teamnode user='mq:remote:team1:dev1' team='team1'",
         "form: teamnode team='team1' device='dev1'; a Team Broker form"),
        ("agent:team1@team1", "identity: teamagent user='agent:team1@team1' team='team1'",
         "form: teamagent team='team1'; a Team Broker form"),
        ("frontend:team1:dev1", "identity: frontend user='frontend:team1:dev1' team='team1'",
         "form: frontend team='team1' device='dev1'; a one-time credential"),
        ("fe-team:u1:team1:s1", "identity: teamfrontend user='fe-team:u1:team1:s1' team='team1'",
         "form: teamfrontend team='team1' user='u1' session='s1'; a one-time credential"),
        ("expert-client:u1:s1", "identity: expertclient user='expert-client:u1:s1' team=None",
         "form: expertclient user='u1' session='s1'; a one-time credential"),
        ("expert-agent:api:v1", "identity: expertagent user='expert-agent:api:v1' team=None", "form: expertagent"),
        ("mq:other:t:i", "identity: user user='mq:other:t:i' team=None", "form: user; no FlowFuse form"),
    ],
)
def test_explain_flowfuse_identity_forms(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform, user: str, first: str, form: str
) -> None:
    config = platform_config(tmp_path, platform)
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", user, "--publish", "x/y")
    assert code == (2 if user == "mq:other:t:i" else 3), out  # that one is refused at CONNECT
    assert out.splitlines()[0] == first
    assert line_starting(out, "form:").startswith(form), out
    if user == "mq:other:t:i":
        assert "this username cannot log in" in line_starting(out, "authenticated by:")


@pytest.mark.parametrize(
    ("user", "client_id", "suffix", "verdict"),
    [
        ("alice@team1", "alice@team1", False, "'alice@team1' allowed; rule exact"),
        ("alice@team1", "alice@team1:phone", False, "'alice@team1:phone' refused (CONNACK 0x85 / 0x02); rule exact"),
        ("alice@team1", "alice@team1:phone", True,
         "'alice@team1:phone' allowed; rule prefix: the username or '<username>:<suffix>' (acl.client_id_suffix"),
        ("agent:team1@team1", "team1-agent@team1", False, "'team1-agent@team1' allowed"),
        ("agent:team1@team1", "team2-agent@team2", False, "'team2-agent@team2' refused"),
        ("project:team1:p1", "project:team1:p1:n:ab12", False, "'project:team1:p1:n:ab12' allowed; rule prefix"),
        ("project:team1:p1", "project:team1:p1:", False, "'project:team1:p1:' refused (CONNACK 0x85"),
        ("mq:hosted:team1:i1", "mq:hosted:team1:i1:ha1", False, "'mq:hosted:team1:i1:ha1' allowed; rule prefix"),
        ("project:team1:p1", "", False, "empty: the broker assigns 'project:team1:p1:auto-<hex>'"),
        ("", "anything", False, "any; namespaced upstream as 'anonymous:<id>'"),
    ],
)
def test_explain_client_id_rule(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, user: str, client_id: str, suffix: bool, verdict: str
) -> None:
    config = write_config(tmp_path, {"acl": {"client_id_suffix": suffix}})
    code, out, _ = cli(capsys, "acl", "explain", "-c", config, "--user", user, "--client-id", client_id,
                       "--publish", "a/b")
    assert code == 2, out
    assert line_starting(out, "client id:").startswith(f"client id: {verdict}"), out


# ---------------------------------------------------------------- check: the new keys


def ec_public_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return path


def full_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """auth.http (headers from a file and the environment, a CA file) and auth.jwt (a secret file, a key)."""
    (tmp_path / "token").write_text(HEADER_SECRET + "\n")
    (tmp_path / "jwt-secret").write_text("s" * 40 + "\n")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "platform-ca.pem"))
    ec_public_key(tmp_path / "jwt.pem")
    http = {
        "style": "emqx",
        "auth_url": "https://forge.example:3000/api/comms/v2/auth",
        "acl_url": "https://forge.example:3000/api/comms/v2/acls",
        "headers": {"Authorization": f"file:{tmp_path / 'token'}", "X-Env-Token": "env:MQTT_FRONT_TEST_TOKEN"},
        "ca_file": "platform-ca.pem",
        **overrides.pop("http", {}),
    }
    jwt = {"secret_file": "jwt-secret", "public_keys": ["jwt.pem"], "audience": "mqtt", **overrides.pop("jwt", {})}
    acl = {"source": "http", "mountpoints": {}, **overrides.pop("acl", {})}
    return {"auth": {"http": http, "jwt": jwt}, "acl": acl, **overrides}


def test_check_new_keys_valid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_FRONT_TEST_TOKEN", "env-s3cret-token")
    config = write_config(tmp_path, full_config(tmp_path))
    code, out, err = cli(capsys, "check", "-c", config)
    assert code == 0, err
    http_line = line_starting(out, "auth.http:")
    assert "style emqx" in http_line
    assert "auth_url https://forge.example:3000/api/comms/v2/auth" in http_line
    assert "acl_url https://forge.example:3000/api/comms/v2/acls (every topic check)" in http_line
    assert "timeout 5s, cache 60s allow / 5s deny, at most 64 requests in flight" in http_line
    headers = f"headers: Authorization (from file {tmp_path / 'token'}), X-Env-Token (from $MQTT_FRONT_TEST_TOKEN)"
    assert headers in http_line
    assert f"CA file {tmp_path / 'platform-ca.pem'}" in http_line
    jwt_line = line_starting(out, "auth.jwt:")
    assert "token in the password (the username is ignored)" in jwt_line
    assert "2 keys (auth.jwt.secret_file, auth.jwt.public_keys.0)" in jwt_line
    assert "aud mqtt" in jwt_line
    assert line_starting(out, "auth chain:") == (
        "auth chain: JWT -> platform (one request per CONNECT, never retried) -> anonymous refused"
    )
    assert line_starting(out, "acl: source http")
    for secret in (HEADER_SECRET, "hdr-s3cret", "env-s3cret-token", "s" * 40):
        assert secret not in out + err


def test_check_flowfuse_platform_example() -> None:
    result = run_cli("check", "-c", str(ROOT / "config" / "flowfuse-platform.yaml"))
    assert result.returncode == 0, result.stderr
    assert "auth.http: style emqx, auth_url http://forge:3000/api/comms/v2/auth" in result.stdout
    assert "acl: source http" in result.stdout
    assert "listener ws: ws on 0.0.0.0:8080" in result.stdout


def test_check_local_mountpoints(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, {"acl": {"mountpoints": {
        "teamclient": "ff/v1/${team}/c/", "teamnode": "ff/v1/${team}/i/${project}/",
    }}})
    code, out, err = cli(capsys, "check", "-c", config)
    assert code == 0, err
    assert "acl.mountpoints.teamclient: 'ff/v1/${team}/c/'" in out
    assert "acl.mountpoints.teamnode: 'ff/v1/${team}/i/${project}/' (refused for the form of mq:remote:t:d" in out
    assert "warning: acl.mountpoints.teamclient: no acl.rules for teamclient" in out


BAD: dict[str, tuple[dict[str, Any], list[str]]] = {
    "bad-auth-url": ({"http": {"auth_url": "ftp://forge/api"}}, ["auth.http.auth_url", "not an http:// or https://"]),
    "bad-acl-url": ({"http": {"acl_url": "forge:3000/acls"}}, ["auth.http.acl_url"]),
    "missing-header-file": (
        {"http": {"headers": {"Authorization": "file:/nonexistent/token"}}},
        ["auth.http.headers.Authorization: cannot read /nonexistent/token"],
    ),
    "unset-header-env": (
        {"http": {"headers": {"X-Token": "env:MQTT_FRONT_NOT_SET_ANYWHERE"}}},
        ["auth.http.headers.X-Token: environment variable MQTT_FRONT_NOT_SET_ANYWHERE is not set"],
    ),
    "bad-ca-file": ({"http": {"ca_file": "no-such-ca.pem"}}, ["auth.http.ca_file: cannot load"]),
    "bad-jwt-key-file": ({"jwt": {"public_keys": ["garbage.pem"]}}, ["auth.jwt.public_keys.0", "not a PEM public key"]),
    "missing-jwt-secret-file": ({"jwt": {"secret_file": "nowhere"}}, ["auth.jwt.secret_file: cannot read"]),
    "short-jwt-secret": ({"jwt": {"secret": "short"}}, ["auth.jwt.secret", "HS256 needs at least 32"]),
    "acl-source-http-without-acl-url": (
        {"http": {"acl_url": None}}, ["acl.source: http needs auth.http.acl_url"],
    ),
    "mountpoint-no-slash": ({"acl": {"mountpoints": {"teamclient": "ff/v1/${team}/c"}}},
                            ["acl.mountpoints.teamclient", "must end with '/'"]),
    "mountpoint-unknown-placeholder": ({"acl": {"mountpoints": {"teamclient": "ff/${tenant}/"}}},
                                       ["acl.mountpoints.teamclient: unknown placeholder ${tenant}"]),
    "mountpoint-no-value": ({"acl": {"mountpoints": {"device": "ff/v1/${session}/"}}},
                            ["acl.mountpoints.device", "every CONNECT would be refused"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_new_keys_invalid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setenv("MQTT_FRONT_TEST_TOKEN", "env-s3cret-token")
    (tmp_path / "garbage.pem").write_text("not a key\n")
    overrides, expected = BAD[case]
    data = full_config(tmp_path, **json.loads(json.dumps(overrides)))
    if data["auth"]["http"].get("acl_url") is None:
        del data["auth"]["http"]["acl_url"]
    config = write_config(tmp_path, data)
    code, out, err = cli(capsys, "check", "-c", config)
    assert code == 1, out
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert HEADER_SECRET not in out + err


def test_check_invalid_subprocess_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"auth": {"http": {"auth_url": "forge/auth"}}})
    result = run_cli("check", "-c", config)
    assert result.returncode == 1
    assert "auth.http.auth_url: 'forge/auth' is not an http:// or https:// URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_warns_about_unused_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "auth": {"http": {"auth_url": "http://forge.internal:3000/a", "acl_url": "http://forge.internal:3000/b"}},
        "acl": {"source": "http", "rules": [{"who": "any", "effect": "deny", "action": "both", "pattern": "x/#"}]},
    })
    code, out, _ = cli(capsys, "check", "-c", config)
    assert code == 0
    assert "warning: acl.rules (1) and the preset are not used with acl.source: http" in out
    assert "plain http: CONNECT passwords cross the network unencrypted" in out


# ---------------------------------------------------------------- check --probe


def secret_config(tmp_path: Path, base: dict[str, Any]) -> str:
    """The platform's URLs with userinfo, and a header from a file: nothing of either may be printed."""
    (tmp_path / "token").write_text(HEADER_SECRET + "\n")
    http = dict(base)
    for key in ("auth_url", "acl_url"):
        http[key] = http[key].replace("://", f"://probe:{URL_PASSWORD}@")
    http["headers"] = {"X-Platform-Token": f"file:{tmp_path / 'token'}"}
    return write_config(tmp_path, {"auth": {"http": http}, "acl": {"source": "http"}})


def assert_no_secrets(text: str) -> None:
    for secret in (HEADER_SECRET, "hdr-s3cret", URL_PASSWORD):
        assert secret not in text


@pytest.mark.parametrize("style", ["emqx", "go-auth"])
def test_probe_ok(tmp_path: Path, platform: FakePlatform, style: str) -> None:
    base = platform.emqx_config() if style == "emqx" else platform.go_auth_config()
    config = secret_config(tmp_path, base)
    result = run_cli("check", "-c", config, "--probe")
    assert result.returncode == 0, result.stdout + result.stderr
    auth = line_starting(result.stdout, "probe auth_url")
    acl = line_starting(result.stdout, "probe acl_url")
    status = "HTTP 200" if style == "emqx" else "HTTP 401"
    assert f"probe auth_url {base['auth_url'].replace('://', '://***@')}: reachable, {status}, answer deny, in " in auth
    assert f"probe acl_url {base['acl_url'].replace('://', '://***@')}: reachable, {status}, answer deny, in " in acl
    assert auth.endswith(" ms") and acl.endswith(" ms")
    assert_no_secrets(result.stdout + result.stderr)
    endpoints = (platform.auth, platform.acl) if style == "emqx" else (platform.go_auth, platform.go_acl)
    assert [e.count for e in endpoints] == [1, 1]  # one request each
    auth_body, acl_body = endpoints[0].requests[0], endpoints[1].requests[0]
    assert auth_body["username"] == "mqtt-front-probe" and auth_body["password"] == ""
    assert acl_body["username"] == "mqtt-front-probe" and acl_body["topic"] == "mqtt-front/probe"
    for headers in endpoints[0].headers + endpoints[1].headers:
        assert headers["X-Platform-Token"] == HEADER_SECRET  # sent, never shown
        assert headers["User-Agent"].startswith("mqtt-front/")


def test_probe_stopped_platform(tmp_path: Path) -> None:
    with FakePlatform().in_thread() as stopped:
        config = secret_config(tmp_path, stopped.emqx_config(timeout=2))
    result = run_cli("check", "-c", config, "--probe")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is valid" in result.stdout  # the configuration itself is fine
    auth = line_starting(result.stdout, "probe auth_url")
    assert auth.startswith(f"probe auth_url http://***@127.0.0.1:{stopped.port}{EMQX_AUTH}: FAILED: unreachable (")
    assert "probe acl_url" in result.stdout
    assert "the platform probe failed (2 of 2 requests)" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secrets(result.stdout + result.stderr)


def test_probe_slow_failing_and_odd_platforms(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform
) -> None:
    config = secret_config(tmp_path, platform.emqx_config(timeout=0.5))
    platform.auth.delay = 2.0
    code, out, err = cli(capsys, "check", "-c", config, "--probe")
    assert code == 2
    assert "FAILED: no answer within 0.5s (timeout)" in line_starting(out, "probe auth_url")
    assert "reachable" in line_starting(out, "probe acl_url")
    platform.auth.reset()
    platform.acl.fail = 503
    code, out, err = cli(capsys, "check", "-c", config, "--probe")
    assert code == 2
    assert "FAILED: HTTP 503 in " in line_starting(out, "probe acl_url")
    platform.acl.reset()
    platform.auth.garbage = b"hello"
    code, out, err = cli(capsys, "check", "-c", config, "--probe")
    assert code == 2
    assert "the body is not JSON" in line_starting(out, "probe auth_url")
    platform.auth.reset()
    platform.auth.override = {"result": "allow", "is_superuser": False}
    code, out, err = cli(capsys, "check", "-c", config, "--probe")
    assert code == 0, out + err
    assert "answer allow" in line_starting(out, "probe auth_url")
    assert "warning: it allows the unknown identity 'mqtt-front-probe' with an empty password" in out
    assert_no_secrets(out + err)


def test_probe_wrong_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, platform: FakePlatform) -> None:
    base = platform.emqx_config()
    base["auth_url"] = platform.base_url + "/api/comms/v3/auth"  # not served: 404
    config = write_config(tmp_path, {"auth": {"http": base}, "acl": {"source": "http"}})
    code, out, _ = cli(capsys, "check", "-c", config, "--probe")
    assert code == 2
    assert "FAILED: HTTP 404 in " in line_starting(out, "probe auth_url")
    assert "reachable" in line_starting(out, "probe acl_url")


def test_probe_https_with_ca_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with FakePlatform(ssl_context=context).in_thread() as tls_platform:
        trusted = write_config(tmp_path, {"auth": {"http": tls_platform.emqx_config(ca_file="ca.pem")},
                                          "acl": {"source": "http"}}, name="trusted.yaml")
        code, out, _ = cli(capsys, "check", "-c", trusted, "--probe")
        assert code == 0, out
        assert line_starting(out, "probe auth_url https://127.0.0.1:").endswith(" ms")
        untrusted = write_config(tmp_path, {"auth": {"http": tls_platform.emqx_config()}, "acl": {"source": "http"}},
                                 name="untrusted.yaml")
        code, out, _ = cli(capsys, "check", "-c", untrusted, "--probe")
        assert code == 2
        assert "CERTIFICATE_VERIFY_FAILED" in line_starting(out, "probe auth_url")


def test_probe_without_auth_http(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = cli(capsys, "check", "-c", write_config(tmp_path, {}), "--probe")
    assert code == 0
    assert "probe: nothing to probe (auth.http is not set)" in out


def test_emqx_paths_are_flowfuse_s() -> None:
    """The example configuration points at the paths the fake (and FlowFuse) serve."""
    data = yaml.safe_load((ROOT / "config" / "flowfuse-platform.yaml").read_text())
    assert data["auth"]["http"]["auth_url"].endswith(EMQX_AUTH)
    assert data["auth"]["http"]["acl_url"].endswith(EMQX_ACL)

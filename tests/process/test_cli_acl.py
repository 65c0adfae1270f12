"""`mqtt-front acl explain`: the CONNECT's verdict, the topic's, the rule that made it, and the exit code (0 allow,
2 deny); the CONNECT verdicts compared with what a real `mqtt-front run` answers."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from acl.identity import FORM_HEADS
from broker.cli import main
from broker.cli_explain_connect import HEAD_FORMS
from broker.mqtt.packets import Will
from tests.support.cli import EXAMPLE as EXAMPLE_CONFIG
from tests.support.cli import run_cli, running
from tests.support.front import PASSWORD, write_users_file
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_bytes import connect
from tests.support.platform import FakePlatform
from tests.support.ports import free_port

EXAMPLE = str(EXAMPLE_CONFIG)


def explain(capsys: pytest.CaptureFixture[str], *args: str, config: str = EXAMPLE) -> tuple[int, str]:
    code = main(["acl", "explain", "-c", config, *args])
    out = capsys.readouterr().out
    return code, out


def test_explain_allow_names_the_rule_subprocess() -> None:
    result = run_cli(
        "acl", "explain", "-c", EXAMPLE, "--user", "project:team1:projectA",
        "--publish", "ff/v1/team1/p/projectA/out/x",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "identity: project user='project:team1:projectA' team='team1'" in lines
    assert "ALLOW publish 'ff/v1/team1/p/projectA/out/x'" in lines
    assert any(
        line.startswith("decided by preset flowfuse[") and "'ff/v1/${team}/p/${project}/out/#'" in line
        for line in lines
    ), result.stdout


def test_explain_cross_team_is_default_deny_subprocess() -> None:
    result = run_cli(
        "acl", "explain", "-c", EXAMPLE, "--user", "project:team2:projectC",
        "--publish", "ff/v1/team1/p/projectA/out/x",
    )
    assert result.returncode == 2
    assert "DENY publish 'ff/v1/team1/p/projectA/out/x'" in result.stdout
    assert "default deny" in result.stdout


@pytest.mark.parametrize(
    ("user", "args", "allowed", "decided"),
    [
        # publishing
        ("project:team1:projectA", ["--publish", "ff/v1/team1/p/projectB/in/x"], True, "/p/+/in/#"),
        ("project:team1:projectA", ["--publish", "ff/v1/team1/p/projectB/out/x"], False, "default deny"),
        ("project:team1:projectA", ["--publish", "ff/v1/team10/p/projectA/out/x"], False, "default deny"),
        ("project:team1:projectA", ["--publish", "ff/v1/team1/c/x", "--retain"], True, "/c/#"),
        ("project:team2:projectC", ["--publish", "ff/v1/team1/c/x"], False, "default deny"),
        ("project:team1:projectA", ["--publish", "ff/v1/team1/p/+/in/x"], False, "invalid topic name"),
        # subscribing with wildcards
        ("project:team1:projectA", ["--subscribe", "ff/v1/team1/p/+/out/#"], True, "/p/+/out/#"),
        ("project:team1:projectA", ["--subscribe", "ff/v1/team1/p/projectA/in/#"], True, "/in/#"),
        ("project:team1:projectA", ["--subscribe", "ff/v1/team1/p/projectB/in/#"], False, "default deny"),
        ("project:team1:projectA", ["--subscribe", "ff/v1/team1/#"], False, "default deny"),
        ("project:team1:projectA", ["--subscribe", "ff/v1/+/p/+/out/#"], False, "default deny"),
        ("project:team1:projectA", ["--subscribe", "#"], False, "default deny"),
        ("project:team1:projectA", ["--subscribe", "$SYS/#"], False, "default deny"),
        ("project:team1:projectA", ["--subscribe", "$share/projectA/ff/v1/team1/p/+/out/#"], True, "/p/+/out/#"),
        ("project:team1:projectA", ["--subscribe", "$share/projectB/ff/v1/team1/p/+/out/#"], False,
         "share group 'projectB' not allowed"),
        ("project:team1:projectA", ["--subscribe", "$share/platform/ff/v1/team2/p/+/out/#"], False,
         "default deny"),
        ("project:team10:p4", ["--subscribe", "ff/v1/team1/p/+/out/#"], False, "default deny"),
        # anonymous (no --user): the example's public/# rule
        ("", ["--subscribe", "public/#"], True, "rules[0]"),
        ("", ["--publish", "public/a/b"], True, "rules[0]"),
        ("", ["--subscribe", "ff/v1/#"], False, "default deny"),
        ("", ["--publish", "ff/v1/team1/c/x"], False, "default deny"),
        ("", ["--subscribe", "#"], False, "default deny"),
    ],
)
def test_explain(
    capsys: pytest.CaptureFixture[str], user: str, args: list[str], allowed: bool, decided: str
) -> None:
    code, out = explain(capsys, "--user", user, *args)
    assert code == (0 if allowed else 2), out
    verdict = out.splitlines()[2]
    assert verdict.startswith("ALLOW " if allowed else "DENY "), out
    decided_line = out.splitlines()[3]
    assert decided_line.startswith("decided by ")
    assert decided in decided_line, out


def test_explain_anonymous_identity_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = explain(capsys, "--subscribe", "public/#")
    assert code == 0
    assert out.splitlines()[0] == "identity: anonymous user=None team=None"
    assert "allow both 'public/#' for anonymous" in out


def test_explain_operator_deny_rule_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    write_users_file(tmp_path / "users.yaml", ["project:team1:p1"])
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "auth": {"users_file": "users.yaml"},
        "acl": {"preset": "flowfuse", "rules": [
            {"who": "project", "effect": "deny", "action": "subscribe", "pattern": "ff/v1/${team}/c/secret/#"},
        ]},
    }))
    code, out = explain(capsys, "--user", "project:team1:p1", "--subscribe", "ff/v1/team1/c/secret/#",
                        config=str(config))
    assert code == 2
    assert "decided by rules[0]: deny subscribe 'ff/v1/${team}/c/secret/#' for project" in out
    # A wider filter is granted by the preset, with the deny rule's topics carved out of its deliveries.
    code, out = explain(capsys, "--user", "project:team1:p1", "--subscribe", "ff/v1/team1/c/#", config=str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[3].startswith("decided by preset flowfuse[")
    assert "carve-out: deliveries on topics matched by rules[0]" in out
    code, out = explain(capsys, "--user", "project:team1:p1", "--subscribe", "ff/v1/team1/c/open/#",
                        config=str(config))
    assert code == 0
    assert "preset flowfuse[" in out
    # Publishing is not covered by the subscribe-only deny rule.
    code, out = explain(capsys, "--user", "project:team1:p1", "--publish", "ff/v1/team1/c/secret/x",
                        config=str(config))
    assert code == 0


def test_explain_bad_config_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "acl": {"rules": [{"who": "project", "effect": "allow", "action": "both", "pattern": "a/#/b"}]},
    }))
    result = run_cli(
        "acl", "explain", "-c", str(config), "--user", "x", "--subscribe", "a/#",
    )
    assert result.returncode == 1
    assert "acl.rules.0" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the CONNECT verdict (issue 15, item 5)

CONNACK_CODES = re.compile(r"^connect: REFUSE \(CONNACK 0x([0-9A-F]{2}) / (?:0x([0-9A-F]{2})|3\.1\.1: closed)")


def connect_codes(out: str) -> tuple[int, int | None]:
    """The (v5, 3.1.1) CONNACK codes explain's ``connect:`` line (the second) predicts; (0, 0) for ALLOW."""
    line = out.splitlines()[1]
    if line.startswith("connect: ALLOW"):
        return 0, 0
    found = CONNACK_CODES.match(line)
    assert found is not None, out
    return int(found.group(1), 16), int(found.group(2), 16) if found.group(2) else None


def real_connack(port: int, username: str | None, client_id: str, will: str | None, v5: bool) -> int:
    """The CONNACK code a running mqtt-front answers this CONNECT with (the password is PASSWORD)."""
    packet = connect(client_id, username, PASSWORD if username is not None else None, v5=v5,
                     will=Will(will, b"gone", 0, False) if will is not None else None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            assert chunk, f"closed without CONNACK (got {data!r})"
            data += chunk
    assert data[0] == 0x20, data
    return data[3]


# (username, client id, will topic): the users are tests.support.front.USERS, all with PASSWORD.
CONNECT_CASES = [
    ("project:team1:p1", "project:team1:p1:n", None),  # accepted: proves the refusals below are the checks
    ("project:team1:p1", "other", None),  # 0x85: not the username's namespace
    ("project:team1:p1", "project:team1:p1:", None),  # 0x85: an empty suffix
    ("project:team1:p1", "project:team1:p2", None),  # 0x85: another identity's id
    ("alice@team1", "alice@team1:phone", None),  # 0x85: Team Broker clients are exact
    ("alice@team1", "alice@team1", None),
    ("project:team1:p1", "project:team1:p1:n", "ff/v1/team1/p/p1/out/status"),  # a will it may publish
    ("project:team1:p1", "project:team1:p1:n", "ff/v1/team2/p/p3/in/x"),  # 0x87: another team's topic
    ("anonymous", "anonymous:x", None),  # 0x86: reserved
    ("project", "project:team1:p1:n", None),  # 0x86: a reserved head
    ("nobody-here", "nobody-here", None),  # 0x86: unknown
    (None, "some-client", None),  # 0x87: anonymous clients are off
]


def test_explain_predicts_the_connack_of_a_real_run(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """For each CONNECT, explain on the configuration `run` serves says the CONNACK `run` answers."""
    write_users_file(tmp_path / "users.yaml")
    port = free_port()
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": "users.yaml", "allow_anonymous": False},
        "acl": {"preset": "flowfuse"},
    }))
    seen: set[int] = set()
    with running(config, tmp_path / "front.log", ports=(port,)):
        for username, client_id, will in CONNECT_CASES:
            args = ["acl", "explain", "-c", str(config), "--client-id", client_id, "--publish", "ff/v1/team1/c/x"]
            if username is not None:
                args += ["--user", username]
            if will is not None:
                args += ["--will", will]
            result = run_cli(*args)
            v5_code, v3_code = connect_codes(result.stdout)
            if v5_code:
                assert result.returncode == 2, result.stdout  # a refused CONNECT denies whatever the topic
            assert real_connack(port, username, client_id, will, v5=True) == v5_code, (username, client_id)
            assert real_connack(port, username, client_id, will, v5=False) == v3_code, (username, client_id)
            seen.add(v5_code)
    assert seen == {0x00, 0x85, 0x86, 0x87}  # every kind of answer was compared with a real one


def test_explain_refused_client_id_decides_the_topic(capsys: pytest.CaptureFixture[str]) -> None:
    """The bug: a client id run refuses with 0x85 was reported ALLOW (exit 0) for the topic."""
    code, out = explain(capsys, "--user", "project:team1:projectA", "--client-id", "other",
                        "--publish", "ff/v1/team1/p/projectA/out/x")
    assert code == 2, out
    lines = out.splitlines()
    assert lines[1] == ("connect: REFUSE (CONNACK 0x85 / 0x02): client id 'other' must be the username or start "
                        "with '<username>:'")
    assert lines[2] == "DENY publish 'ff/v1/team1/p/projectA/out/x'"
    assert lines[3].startswith("decided by the refused CONNECT (CONNACK 0x85 / 0x02); the topic check alone: "
                               "ALLOW publish 'ff/v1/team1/p/projectA/out/x', decided by preset flowfuse[")
    code, out = explain(capsys, "--user", "project:team1:projectA", "--client-id", "project:team1:projectA:n",
                        "--publish", "ff/v1/team1/p/projectA/out/x")
    assert code == 0, out
    assert out.splitlines()[1] == "connect: ALLOW with the right password (auth.users_file; not checked here)"


@pytest.mark.parametrize(
    ("args", "code", "connect_line", "will_line"),
    [
        (["--will", "ff/v1/team1/p/projectA/out/status"], 0, "connect: ALLOW",
         "will: publish 'ff/v1/team1/p/projectA/out/status': allowed, decided by preset flowfuse["),
        (["--will", "ff/v1/team2/p/projectC/in/x"], 2,
         "connect: REFUSE (CONNACK 0x87 / 0x05): will topic 'ff/v1/team2/p/projectC/in/x' not allowed",
         "will: publish 'ff/v1/team2/p/projectC/in/x': refused (CONNACK 0x87 / 0x05), decided by default deny"),
        (["--will", "ff/v1/team1/c/lastwill", "--will-retain"], 0, "connect: ALLOW",
         "will: publish 'ff/v1/team1/c/lastwill' (retained): allowed"),
        (["--will", "ff/v1/team1/+/x"], 2,
         "connect: REFUSE (CONNACK 0x82 / 3.1.1: closed without CONNACK): malformed CONNECT",
         "will: publish 'ff/v1/team1/+/x': not a topic name"),
        ([], 0, "connect: ALLOW", "will: none (--will TOPIC checks one)"),
    ],
)
def test_explain_will(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int, connect_line: str, will_line: str
) -> None:
    got, out = explain(capsys, "--user", "project:team1:projectA", "--publish", "ff/v1/team1/c/x", *args)
    assert got == code, out
    assert out.splitlines()[1].startswith(connect_line), out
    assert any(line.startswith(will_line) for line in out.splitlines()), out


def test_explain_will_retain_needs_will(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["acl", "explain", "-c", EXAMPLE, "--user", "project:team1:projectA", "--publish", "a",
                 "--will-retain"])
    assert code == 1
    assert capsys.readouterr().err == "mqtt-front: --will-retain goes with --will\n"


@pytest.mark.parametrize(
    ("user", "identity", "form"),
    [
        ("anonymous", "identity: reserved user='anonymous' team=None",
         "form: reserved: 'anonymous' stands for clients without a username"),
        ("project", "identity: reserved user='project' team=None",
         "form: reserved: 'project' is the head of FlowFuse's project:<team>:<project>"),
        ("agent", "identity: reserved user='agent' team=None",
         "form: reserved: 'agent' is the head of FlowFuse's agent:<team>@<team>"),
        ("mq", "identity: reserved user='mq' team=None",
         "form: reserved: 'mq' is the head of FlowFuse's mq:hosted:<team>:<instance> and mq:remote:<team>:<device>"),
        ("project:team1", "identity: user user='project:team1' team=None",
         "form: user; no FlowFuse form: it starts with 'project:' but is not project:<team>:<project>"),
        ("agent:team1@team2", "identity: user user='agent:team1@team2' team=None",
         "form: user; no FlowFuse form: it starts with 'agent:' but is not agent:<team>@<team>"),
    ],
)
def test_explain_reserved_and_broken_names(
    capsys: pytest.CaptureFixture[str], user: str, identity: str, form: str
) -> None:
    """Reserved usernames and broken FlowFuse forms are named as such and refused at CONNECT, never plain users."""
    code, out = explain(capsys, "--user", user, "--subscribe", "public/#")  # public/#: allowed to anonymous only
    assert code == 2, out
    lines = out.splitlines()
    assert lines[0] == identity
    assert lines[1].startswith("connect: REFUSE (CONNACK 0x86 / 0x04): "), out
    assert "the broker refuses this username whatever the password" in lines[1]
    assert any(line.startswith(form) for line in lines), out
    assert "a plain user without a team" not in out


def test_explain_flowfuse_forms_are_not_reserved(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The real FlowFuse forms (the team agent, a project) are explained as what they are."""
    write_users_file(tmp_path / "users.yaml", ["agent:team1@team1", "project:team1:p1"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                                      "auth": {"users_file": "users.yaml"}, "acl": {"preset": "flowfuse"}}))
    code, out = explain(capsys, "--user", "agent:team1@team1", "--publish", "ff/v1/team1/c/x", config=str(config))
    lines = out.splitlines()
    assert lines[0] == "identity: teamagent user='agent:team1@team1' team='team1'"
    assert lines[1].startswith("connect: ALLOW"), out
    assert "form: teamagent team='team1'; a Team Broker form" in out
    code, out = explain(capsys, "--user", "agent:team1@team1", "--client-id", "agent:team1@team1:x",
                        "--publish", "ff/v1/team1/c/x", config=str(config))
    assert code == 2 and "connect: REFUSE (CONNACK 0x85 / 0x02)" in out, out


def test_head_forms_cover_every_reserved_head() -> None:
    assert set(HEAD_FORMS) == set(FORM_HEADS)


def test_explain_unknown_user_and_anonymous_off(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_users_file(tmp_path / "users.yaml", ["project:team1:p1"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "auth": {"users_file": "users.yaml", "allow_anonymous": False},
        "acl": {"rules": [{"who": "any", "effect": "allow", "action": "both", "pattern": "open/#"}]},
    }))
    code, out = explain(capsys, "--user", "project:team9:p9", "--publish", "open/x", config=str(config))
    assert code == 2, out
    assert out.splitlines()[1] == ("connect: REFUSE (CONNACK 0x86 / 0x04): unknown user 'project:team9:p9': not in "
                                   "the users file, and no auth.http or auth.jwt could vouch for it")
    assert "the topic check alone: ALLOW publish 'open/x'" in out.splitlines()[3]
    code, out = explain(capsys, "--publish", "open/x", config=str(config))
    assert code == 2, out
    assert out.splitlines()[1] == ("connect: REFUSE (CONNACK 0x87 / 0x05): anonymous clients are refused "
                                   "(auth.allow_anonymous: false)")


def test_explain_will_asks_the_platform(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with FakePlatform().in_thread() as platform:
        platform.add("alice@team1", rules=[("sensors/#", "both")])
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                                          "auth": {"http": platform.emqx_config()}, "acl": {"source": "http"}}))
        base = ["--user", "alice@team1", "--publish", "sensors/a", "--mountpoint", "ff/v1/team1/c/"]
        code, out = explain(capsys, *base, "--will", "sensors/gone", config=str(config))
        assert code == 3, out  # neither the will nor the topic was asked
        assert out.splitlines()[1].startswith("connect: UNDECIDED"), out
        assert platform.acl.count == 0
        code, out = explain(capsys, *base, "--will", "sensors/gone", "--ask-platform", config=str(config))
        assert code == 0, out
        assert "will: publish 'sensors/gone': allowed by the platform; goes upstream as 'ff/v1/team1/c/sensors/gone'" \
            in out
        code, out = explain(capsys, *base, "--will", "other/gone", "--ask-platform", config=str(config))
        assert code == 2, out
        assert out.splitlines()[1] == "connect: REFUSE (CONNACK 0x87 / 0x05): will topic 'other/gone' not allowed"
        assert [r["topic"] for r in platform.acl.requests] == ["sensors/gone", "sensors/a", "other/gone", "sensors/a"]
        assert platform.auth.count == 0  # explain never logs in


def test_explain_unusable_mountpoint_refuses_the_connect(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A local mountpoint the identity has no value for is refused at CONNECT (0x87), as Admission does."""
    write_users_file(tmp_path / "users.yaml", ["plainuser"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "auth": {"users_file": "users.yaml"},
        "acl": {"mountpoints": {"user": "t/${team}/"},
                "rules": [{"who": "any", "effect": "allow", "action": "both", "pattern": "#"}]},
    }))
    code, out = explain(capsys, "--user", "plainuser", "--publish", "a", config=str(config))
    assert code == 2, out
    assert out.splitlines()[1] == ("connect: REFUSE (CONNACK 0x87 / 0x05): acl.mountpoints.user 't/${team}/' needs "
                                   "a value this identity does not have")
    assert "mountpoint: acl.mountpoints.user 't/${team}/' needs a value this identity does not have: its CONNECT " \
        "is refused (CONNACK 0x87 / 0x05)" in out

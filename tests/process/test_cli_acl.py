"""`mqtt-front acl explain`: the decision, the rule that made it, and the exit code (0 allow, 2 deny)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.cli import main
from tests.support.cli import EXAMPLE as EXAMPLE_CONFIG
from tests.support.cli import run_cli

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
    verdict = out.splitlines()[1]
    assert verdict.startswith("ALLOW " if allowed else "DENY "), out
    decided_line = out.splitlines()[2]
    assert decided_line.startswith("decided by ")
    assert decided in decided_line, out


def test_explain_anonymous_identity_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = explain(capsys, "--subscribe", "public/#")
    assert code == 0
    assert out.splitlines()[0] == "identity: anonymous user=None team=None"
    assert "allow both 'public/#' for anonymous" in out


def test_explain_operator_deny_rule_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
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
    assert lines[2].startswith("decided by preset flowfuse[")
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

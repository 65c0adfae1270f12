"""docker/prometheus/alerts.yml: its shape (always), ``promtool check rules`` on it, and ``promtool test rules``
with series that must fire each alert, and series that must not.

promtool comes with Debian's ``prometheus`` package (``make promtool`` installs it, ``make unit`` depends on
it). Without it the promtool tests are skipped with a reason in the summary; the shape test still runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.cli import ROOT
from tests.support.front import FrontFactory
from tests.support.ops import scrape
from tests.support.pki import Pki

ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
REQUIRED = {
    "MqttFrontUpstreamDown",
    "MqttFrontAuthFailuresSpike",
    "MqttFrontCertificateExpiringSoon",
    "MqttFrontDenySpike",
}
DURATION = re.compile(r"^\d+[smhd]$")
METRIC_NAME = re.compile(r"\b(mqtt_front_[a-zA-Z0-9_]+)\b")


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert isinstance(data, dict) and set(data) == {"groups"}
    found = []
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        found.extend(group["rules"])
    return found


def test_alert_rules_have_the_expected_shape() -> None:
    """The YAML schema of a Prometheus rule file, as far as it can be checked without promtool."""
    names = set()
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", rule["alert"])
        assert rule["alert"] not in names, f"{rule['alert']} twice"
        names.add(rule["alert"])
        assert isinstance(rule["expr"], str) and METRIC_NAME.search(rule["expr"])
        assert "for" not in rule or DURATION.match(rule["for"]), rule.get("for")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
        # Works for any scrape job name, per replica.
        assert 'job="' not in rule["expr"] and "by (job, instance" in rule["expr"], rule["alert"]
    assert names >= REQUIRED


async def test_alert_rules_name_exported_metrics(make_front: FrontFactory, pki: Pki) -> None:
    front = await make_front(
        metrics={"bind": "127.0.0.1:0"},
        listeners=[
            {
                "name": "mqtts",
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
            }
        ],
    )
    exported = (await scrape(front)).names
    for rule in rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            assert name in exported, f"{rule['alert']}: {name} is not exported"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, "promtool not installed: `make test` installs it (`make promtool`)"
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules() -> None:
    result = run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# Series: one replica (job/instance) with the trouble, one without. The annotations are not compared (their
# templates are checked by `promtool check rules`): the tested copy of the rules has none.
A = 'job="front", instance="a:9100"'
B = 'job="front", instance="b:9100"'
RULE_TESTS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [
            # Upstream x fails every attempt; upstream y fails some but also connects.
            {"series": f'mqtt_front_upstream_connect_failures_total{{{A}, upstream="x:1883"}}', "values": "0+6x20"},
            {"series": f'mqtt_front_upstream_connect_seconds_count{{{A}, upstream="x:1883"}}', "values": "3x20"},
            {"series": f'mqtt_front_upstream_connect_failures_total{{{A}, upstream="y:1883"}}', "values": "0+6x20"},
            {"series": f'mqtt_front_upstream_connect_seconds_count{{{A}, upstream="y:1883"}}', "values": "0+60x20"},
            # Replica a: 2 refused logins/s out of 3; replica b: 2/s out of 102 (a big fleet, a few bad clients).
            {"series": f'mqtt_front_connect_attempts_total{{{A}, result="bad_credentials"}}', "values": "0+120x20"},
            {"series": f'mqtt_front_connect_attempts_total{{{A}, result="ok"}}', "values": "0+60x20"},
            {"series": f'mqtt_front_connect_attempts_total{{{B}, result="bad_credentials"}}', "values": "0+120x20"},
            {"series": f'mqtt_front_connect_attempts_total{{{B}, result="ok"}}', "values": "0+6000x20"},
            {"series": f'mqtt_front_connect_attempts_total{{{B}, result="auth_unavailable"}}', "values": "0+30x20"},
            # Certificates: 10 days left, 30 days left, expired.
            {"series": f'mqtt_front_certificate_expiry_seconds{{{A}, listener="mqtts"}}', "values": "864000x20"},
            {"series": f'mqtt_front_certificate_expiry_seconds{{{A}, listener="wss"}}', "values": "2592000x20"},
            {"series": f'mqtt_front_certificate_expiry_seconds{{{B}, upstream="x:8883"}}', "values": "-60x20"},
            # The last reload failed on b only.
            {"series": f"mqtt_front_config_reload_success{{{A}}}", "values": "1x20"},
            {"series": f"mqtt_front_config_reload_success{{{B}}}", "values": "1 1 0x18"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "MqttFrontUpstreamDown",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "front", "instance": "a:9100",
                                               "upstream": "x:1883"}}],
            },
            {
                "eval_time": "10m",
                "alertname": "MqttFrontAuthFailuresSpike",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "front", "instance": "a:9100"}}],
            },
            {
                "eval_time": "10m",
                "alertname": "MqttFrontAuthBackendUnavailable",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "front", "instance": "b:9100"}}],
            },
            {
                "eval_time": "15m",
                "alertname": "MqttFrontCertificateExpiringSoon",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "job": "front", "instance": "a:9100", "listener": "mqtts"}},
                    {"exp_labels": {"severity": "warning", "job": "front", "instance": "b:9100", "upstream": "x:8883"}},
                ],
            },
            {
                "eval_time": "15m",
                "alertname": "MqttFrontCertificateExpired",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "job": "front", "instance": "b:9100", "upstream": "x:8883"}}
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "MqttFrontConfigReloadFailed",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "front", "instance": "b:9100"}}],
            },
            # Nothing before the `for:` durations ran out.
            {"eval_time": "1m", "alertname": "MqttFrontUpstreamDown", "exp_alerts": []},
            {"eval_time": "1m", "alertname": "MqttFrontCertificateExpiringSoon", "exp_alerts": []},
        ],
    },
    {
        # A day of history, then team1's denials jump from 1/s to 10/s; team2 is steadily at 10/s (its
        # usual rate: no alert); team3 is new (no history) and at 10/s at once.
        "interval": "1m",
        "input_series": [
            {"series": f'mqtt_front_denials_total{{{A}, team="team1", action="publish"}}',
             "values": "0+60x1500 90600+600x20"},
            {"series": f'mqtt_front_denials_total{{{A}, team="team2", action="publish"}}', "values": "0+600x1520"},
            {"series": f'mqtt_front_denials_total{{{A}, team="team3", action="subscribe"}}',
             "values": "_x1505 0+600x15"},
        ],
        "alert_rule_test": [
            {"eval_time": "1490m", "alertname": "MqttFrontDenySpike", "exp_alerts": []},
            {
                "eval_time": "1518m",
                "alertname": "MqttFrontDenySpike",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "job": "front", "instance": "a:9100", "team": "team1"}},
                    {"exp_labels": {"severity": "warning", "job": "front", "instance": "a:9100", "team": "team3"}},
                ],
            },
        ],
    },
]


def test_promtool_test_rules_fire_and_stay_quiet(tmp_path: Path) -> None:
    stripped = yaml.safe_load(ALERTS.read_text())
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_copy = tmp_path / "alerts.yml"
    rules_copy.write_text(yaml.safe_dump(stripped))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules_copy)], "evaluation_interval": "1m",
                                     "tests": RULE_TESTS}))
    result = run("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the file is exercised by at least one firing case.
    fired = {case["alertname"] for test in RULE_TESTS for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules()}

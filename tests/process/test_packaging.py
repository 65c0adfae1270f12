"""What ships with the code (issue 15, item 8): the systemd unit (read key by key always, and checked by
`systemd-analyze verify` when systemd is installed), LICENSE, CHANGELOG.md, the project URLs and classifiers,
and the README's `--version`, exit codes and signals, each against what the command really does."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import __version__
from broker.cli import build_parser
from broker.config import Config
from tests.support.cli import ROOT, mqtt_front, run_cli
from tests.support.mosquitto import Mosquitto
from tests.support.ports import free_port, wait_port

UNIT = ROOT / "packaging" / "mqtt-front.service"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEFAULT_SHUTDOWN_TIMEOUT = 10.0  # seconds: the drain's default (issue 15); the unit must wait longer

# Every directive the unit may use, by section, spelled as systemd.unit(5), systemd.service(5), systemd.exec(5)
# and systemd.kill(5) spell them: a misspelt key (which systemd only warns about, then ignores) fails here.
KNOWN_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Requires", "Before", "StartLimitIntervalSec",
             "StartLimitBurst"},
    "Service": {
        "Type", "User", "Group", "DynamicUser", "ExecStart", "ExecStartPre", "ExecReload", "KillSignal", "KillMode",
        "TimeoutStopSec", "TimeoutStartSec", "Restart", "RestartSec", "LimitNOFILE", "Environment",
        "AmbientCapabilities", "CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
        "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictAddressFamilies", "RestrictNamespaces",
        "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures", "SystemCallFilter",
        "UMask", "ReadWritePaths", "RuntimeDirectory", "ConfigurationDirectory", "StateDirectory",
    },
    "Install": {"WantedBy"},
}


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment of a unit file, in order (keys may repeat)."""
    entries, section = [], ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"line {number} is neither a section nor key=value: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit() -> dict[str, str]:
    """``Section.Key`` -> value (the last one, as systemd keeps for these single-valued keys)."""
    return {f"{section}.{key}": value for section, key, value in unit_entries(UNIT.read_text())}


def shutdown_defaults(schema: dict[str, Any]) -> list[float]:
    """The defaults of every configuration key named like a shutdown or drain timeout (there may be none yet)."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                if re.search(r"shutdown|drain", name) and isinstance(prop, dict) \
                        and isinstance(prop.get("default"), int | float):
                    found.append(float(prop["default"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


# ---------------------------------------------------------------- the systemd unit


def test_systemd_unit_static_checks() -> None:
    """Always runs (with or without systemd on the machine): the keys, read one by one."""
    entries = unit_entries(UNIT.read_text())
    assert {section for section, _, _ in entries} == {"Unit", "Service", "Install"}
    for section, key, _ in entries:
        assert key in KNOWN_KEYS[section], f"[{section}] {key}: not a systemd directive this unit should use"
    keys = unit()
    # Type=notify only if mqtt-front spoke sd_notify; it does not.
    notify = any("NOTIFY_SOCKET" in path.read_text() for path in (ROOT / "broker").rglob("*.py"))
    assert keys["Service.Type"] in (("simple", "exec", "notify") if notify else ("simple", "exec"))
    # ExecStart is a command line mqtt-front accepts, with the configuration under /etc/mqtt-front.
    binary, *args = keys["Service.ExecStart"].split()
    assert binary.startswith("/") and binary.endswith("/mqtt-front")
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run" and parsed.config.startswith("/etc/mqtt-front/")
    assert keys["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert keys["Service.KillSignal"] == "SIGTERM"
    assert keys["Service.KillMode"] == "mixed"  # the main process stops its workers and managed broker itself
    timeout = float(keys["Service.TimeoutStopSec"])
    assert timeout > max([DEFAULT_SHUTDOWN_TIMEOUT, *shutdown_defaults(Config.model_json_schema())])
    assert keys["Service.Restart"] == "on-failure"
    # Hardening.
    assert keys["Service.NoNewPrivileges"] == "yes"
    assert keys["Service.ProtectSystem"] == "strict"
    assert keys["Service.ProtectHome"] in ("yes", "read-only", "tmpfs")
    assert keys["Service.PrivateTmp"] == "yes"
    assert keys.get("Service.DynamicUser") == "yes" or keys.get("Service.User") not in (None, "", "root")
    assert keys["Service.AmbientCapabilities"].split() == ["CAP_NET_BIND_SERVICE"]
    assert keys["Service.CapabilityBoundingSet"].split() == ["CAP_NET_BIND_SERVICE"]
    assert int(keys["Service.LimitNOFILE"]) >= 65536
    assert keys["Install.WantedBy"] == "multi-user.target"
    assert keys["Unit.Documentation"].startswith(PYPROJECT["urls"]["Homepage"])


def test_systemd_unit_static_checks_catch_mistakes() -> None:
    """The static reading is not a formality: a misspelt key, a missing reload or a short stop timeout fail it."""
    text = UNIT.read_text()
    bad = text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    assert any(key not in KNOWN_KEYS[section] for section, key, _ in unit_entries(bad))
    with pytest.raises(AssertionError):
        unit_entries("ExecStart=/bin/true\n")  # outside any section
    assert shutdown_defaults({"properties": {"drain": {"properties": {"shutdown_timeout": {"default": 25}}}}}) == [25]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own reading of the unit, with ExecStart pointing at the mqtt-front installed here."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed: `make test` installs it"
    command = mqtt_front()
    binary = command[0] if len(command) == 1 else f"{sys.executable} -m broker.cli"
    text = UNIT.read_text().replace("/opt/mqtt-front/bin/mqtt-front", binary)
    assert text != UNIT.read_text()
    path = tmp_path / "mqtt-front.service"
    path.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "mqtt-front" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr
    # And it does complain about a broken unit, so the silence above means something.
    path.write_text(text.replace("TimeoutStopSec=30", "TimeoutStopSec=thirty"))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert "thirty" in result.stdout + result.stderr


# ---------------------------------------------------------------- LICENSE, CHANGELOG.md, pyproject.toml


def test_license_is_the_full_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["license"] == "Apache-2.0"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[:3] == ["Apache License", "Version 2.0, January 2004", "http://www.apache.org/licenses/"]
    for number, title in enumerate(["Definitions.", "Grant of Copyright License.", "Grant of Patent License.",
                                    "Redistribution.", "Submission of Contributions.", "Trademarks.",
                                    "Disclaimer of Warranty.", "Limitation of Liability.",
                                    "Accepting Warranty or Additional Liability."], 1):
        assert f"{number}. {title}" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text.split()) > 1500  # the whole text, not a stub


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text and "https://semver.org/" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert versions and versions[0] == "Unreleased"
    for version in versions:  # every version heading has a link reference at the bottom
        assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.MULTILINE), version
    for released in versions[1:]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", released), released
    kinds = re.findall(r"^### (.+)$", text, re.MULTILINE)
    assert kinds and set(kinds) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert __version__ in text


def test_project_urls_and_classifiers() -> None:
    urls = PYPROJECT["urls"]
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    classifiers = PYPROJECT["classifiers"]
    assert all(re.fullmatch(r"[A-Z][^:]*( :: [^:]+)+", c) for c in classifiers), classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX `license` replaces them (PEP 639)
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["requires-python"])
    assert minimum is not None
    python = re.compile(r"Programming Language :: Python :: (3\.\d+)")
    versions = [found[1] for c in classifiers if (found := python.fullmatch(c))]
    assert versions and all(tuple(map(int, v.split("."))) >= (int(minimum[1]), int(minimum[2])) for v in versions)
    try:
        from trove_classifiers import classifiers as known
    except ImportError:  # not a dependency: the format checks above stand in
        return
    assert [c for c in classifiers if c not in known] == []


# ---------------------------------------------------------------- README: --version, exit codes, signals


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n### {title}\n")
    end = text.find("\n## ", start + 1)
    following = text.find("\n### ", start + 1)
    return text[start:min(i for i in (end, following) if i != -1)]


def test_version_as_the_readme_says() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mqtt-front {__version__}"
    assert "`mqtt-front --version` prints the version" in (ROOT / "README.md").read_text()


def test_readme_exit_codes_are_the_commands_codes() -> None:
    table = readme_section("Exit codes")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == {0, 1, 2, 3, 130}
    assert run_cli("passwd", "--cost", "3", stdin="x\n").returncode == 2  # a usage error
    assert run_cli("check", "-c", str(ROOT / "no-such.yaml")).returncode == 1
    example = str(ROOT / "config" / "example.yaml")
    assert run_cli("acl", "explain", "-c", example, "--subscribe", "public/#").returncode == 0
    assert run_cli("acl", "explain", "-c", example, "--subscribe", "#").returncode == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_readme_signals_stop_cleanly(tmp_path: Path, mosquitto: Mosquitto, signum: signal.Signals) -> None:
    table = readme_section("Signals")
    assert "| SIGHUP | reload" in table and "| SIGTERM, SIGINT | drain, then exit 0" in table
    port = free_port()
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({"listeners": [{"name": "mqtt", "bind": f"127.0.0.1:{port}"}],
                                      "upstream": {"url": mosquitto.url}}))
    with open(tmp_path / "front.log", "wb") as log:
        proc = subprocess.Popen([*mqtt_front(), "run", "-c", str(config)], stdout=log, stderr=log)
        try:
            wait_port(port)
            proc.send_signal(signum)
            assert proc.wait(30) == 0, (tmp_path / "front.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in (tmp_path / "front.log").read_text()

"""docker/: what can be checked without a Docker engine, and the Grafana dashboard against a real scrape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from broker.config import load_config
from tests.support.cli import ROOT
from tests.support.front import FrontFactory
from tests.support.ops import scrape

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "mqtt-front.json"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cc ", "python3-dev", "libc6-dev")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of every bind mount, resolved from docker/."""
    result = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{volume}: mount a file of docker/, not a named volume or absolute path"
        result[target] = (DOCKER / source).resolve()
    return result


def front_config_mount() -> tuple[str, Path]:
    service = compose()["services"]["mqtt-front"]
    command = service["command"]
    container_path = command[command.index("-c") + 1]
    return container_path, mounts(service)[container_path]


def test_compose_parses_and_every_mount_exists_under_docker() -> None:
    services = compose()["services"]
    assert {"mqtt-front", "mosquitto", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.is_relative_to(DOCKER), f"{name}: {source} is not under docker/"
    build = services["mqtt-front"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert "ports" not in services["mosquitto"], "the internal broker must not be published"


def test_published_ports_match_the_mounted_config() -> None:
    _, host_path = front_config_mount()
    config = load_config(host_path)
    ports = {listener.host_port[1] for listener in config.listeners}
    assert config.metrics is not None and config.metrics.host_port is not None
    metrics_port = config.metrics.host_port[1]
    published = set()
    for spec in compose()["services"]["mqtt-front"]["ports"]:
        container_port = int(str(spec).split(":")[-1].split("/")[0])
        published.add(container_port)
        assert container_port in ports | {metrics_port}, f"published port {spec} has no listener"
    assert metrics_port in published and ports <= published
    # Listeners bind every interface inside the container (loopback would be unreachable).
    for listener in config.listeners:
        assert listener.host_port[0] == "0.0.0.0"
    # The upstream is the compose service, and Prometheus scrapes the metrics port.
    assert config.upstream is not None and "mosquitto:" in config.upstream.all_urls[0]
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"mqtt-front:{metrics_port}" in targets


def test_mounted_config_passes_check() -> None:
    container_path, host_path = front_config_mount()
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "check", "-c", str(host_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and "metrics: http://0.0.0.0:9100/metrics" in result.stdout
    # The users file it names (relative to the config) is mounted beside it in the container.
    config = load_config(host_path)
    assert config.auth.users_file is not None
    relative = config.auth.users_file.relative_to(host_path.parent)
    container_users = str(PurePosixPath(container_path).parent / relative)
    service_mounts = mounts(compose()["services"]["mqtt-front"])
    assert service_mounts[container_users] == config.auth.users_file.resolve()


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    service = compose()["services"]["grafana"]
    service_mounts = mounts(service)
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/mqtt-front.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(target.startswith(path + "/") and source == DASHBOARD for target, source in service_mounts.items())
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def final_stage(dockerfile: str) -> str:
    return dockerfile[dockerfile.rindex("\nFROM ") :]


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage build"
    final = final_stage(text)
    assert final.split()[1] == "python:3.11-slim"
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1] not in ("root", "0"), "the final image must run as a non-root user"
    healthcheck = re.search(r"^HEALTHCHECK (?:[^\n]*\\\n)*[^\n]*", final, re.M)
    assert healthcheck and "/healthz" in healthcheck.group(0) and "urllib" in healthcheck.group(0)
    for tool in BUILD_TOOLS:
        assert tool not in final.replace("\\\n", " "), f"{tool!r} in the final stage"
    assert "apt-get install" not in final
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", final, re.M) for p in line.split()}
    assert exposed == {1883, 8883, 8080, 443, 9100}
    _, host_path = front_config_mount()
    config = load_config(host_path)
    assert config.metrics is not None and config.metrics.host_port is not None
    assert f":{config.metrics.host_port[1]}/healthz" in text


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8
    return exprs


METRIC_NAME = re.compile(r"\b((?:mqtt_front|process|python)_[a-zA-Z0-9_]+)\b")


async def test_dashboard_queries_name_exported_metrics(make_front: FrontFactory) -> None:
    front = await make_front(metrics={"bind": "127.0.0.1:0"})
    exported = (await scrape(front)).names
    covered = set()
    for expr in dashboard_exprs():
        names = METRIC_NAME.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
            covered.add(name)
    # The panels the issue asks for.
    for needed in (
        "mqtt_front_connections",
        "mqtt_front_messages_total",
        "mqtt_front_denials_total",
        "mqtt_front_upstream_connect_seconds_bucket",
        "mqtt_front_connect_attempts_total",
    ):
        assert needed in covered

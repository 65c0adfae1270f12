"""docker/: what can be checked without a Docker engine (the Dockerfile, compose and its mounts), the
container health check against a running front broker, and the Grafana dashboard against a real scrape."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from broker.config import load_config
from broker.ops.healthcheck import config_from_cmdline, main_process_config
from broker.server import FrontBroker
from tests.support.cli import ROOT
from tests.support.front import FrontFactory
from tests.support.mosquitto import Mosquitto
from tests.support.ops import scrape
from tests.support.pki import Pki
from tests.support.ports import free_port

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "mqtt-front.json"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cc ", "python3-dev", "libc6-dev")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


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


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file the container sees lives under docker/ (through the mount that holds it)."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted")


def front_config_mount() -> tuple[str, Path]:
    service = compose()["services"]["mqtt-front"]
    command = service["command"]
    container_path = command[command.index("-c") + 1]
    return container_path, host_path(service, container_path)


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


def test_configuration_is_mounted_as_directories() -> None:
    """A single-file bind mount keeps the inode it started with: a file replaced by a rename (the safe way,
    which the reload advice gives) would never be seen. The files that are reloaded live in mounted folders."""
    services = compose()["services"]
    for name in ("mqtt-front", "prometheus"):
        for target, source in mounts(services[name]).items():
            assert source.is_dir(), f"{name}: {target} is a single-file mount of {source}"
    container_path, config_path = front_config_mount()
    config = load_config(config_path)
    assert config.auth.users_file is not None
    # The users file the config names (relative to it) is in the same mounted folder.
    assert config.auth.users_file.resolve().parent == config_path.parent
    assert PurePosixPath(container_path).parent == PurePosixPath("/etc/mqtt-front")
    text = COMPOSE.read_text()
    assert "kill -s HUP mqtt-front" in text and "rename" in text  # how to change a file, in the compose file


def test_published_ports_match_the_mounted_config() -> None:
    _, config_path = front_config_mount()
    config = load_config(config_path)
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
    # The upstream is the compose service, and Prometheus scrapes the metrics port and loads the alert rules.
    assert config.upstream is not None and "mosquitto:" in config.upstream.all_urls[0]
    prometheus_service = compose()["services"]["prometheus"]
    prometheus = yaml.safe_load(host_path(prometheus_service, "/etc/prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"mqtt-front:{metrics_port}" in targets
    assert prometheus["rule_files"] == ["alerts.yml"]
    assert host_path(prometheus_service, "/etc/prometheus/alerts.yml") == DOCKER / "prometheus" / "alerts.yml"


def test_mounted_config_passes_check() -> None:
    _, config_path = front_config_mount()
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "check", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout and "metrics: http://0.0.0.0:9100/metrics" in result.stdout


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    service = compose()["services"]["grafana"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/mqtt-front.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert host_path(service, f"{path}/{DASHBOARD.name}") == DASHBOARD
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------ the Dockerfile


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def stages(text: str) -> list[str]:
    """The build stages, each from its FROM line on."""
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    return [part for part in parts if part.startswith("FROM ")]


def instructions(stage: str) -> str:
    """A stage without comments, continuation lines joined."""
    lines = [line for line in stage.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def test_dockerfile_base_image_is_pinned_by_digest() -> None:
    text = dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base is not None, "the base image is an ARG (a rebuild can move the pin without editing the file)"
    image = base.group(1)
    assert image.startswith("python:3.11-slim-bookworm@sha256:")
    assert DIGEST.search(image), f"{image} is not pinned by a sha256 digest"
    assert all(stage.split()[1] == "${BASE_IMAGE}" for stage in stages(text)), "every stage uses the pinned base"
    assert "imagetools inspect" in text  # how to move the pin is written next to it


def test_dockerfile_final_stage() -> None:
    all_stages = stages(dockerfile())
    assert len(all_stages) >= 2, "multi-stage build"
    build, final = instructions(all_stages[0]), instructions(all_stages[-1])
    # uvloop is built and installed; the embedded demo broker (amqtt, the [embedded] extra) is not.
    assert "'.[uvloop]'" in build and "'mqtt-front[uvloop]'" in final
    for text in (build, final):
        assert "embedded" not in text and "amqtt" not in text
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1] not in ("root", "0"), "the final image must run as a non-root user"
    for tool in BUILD_TOOLS:
        assert tool not in final, f"{tool!r} in the final stage"
    assert "apt-get install" not in final
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", final, re.M) for p in line.split()}
    assert exposed == {1883, 8883, 8080, 443, 9100}
    # The health check reads the configured metrics port: no port, no address in it.
    healthcheck = re.search(r"^HEALTHCHECK .*$", final, re.M)
    assert healthcheck is not None
    assert '"python", "-m", "broker.ops.healthcheck"' in healthcheck.group(0)
    assert not re.search(r":\d+", healthcheck.group(0)) and "9100" not in healthcheck.group(0)
    assert re.search(r"^ENTRYPOINT \[\"mqtt-front\"\]$", final, re.M)
    assert 'CMD ["run", "-c", "/etc/mqtt-front/config.yaml"]' in final


# ------------------------------------------------------------------ the health check


def test_healthcheck_finds_the_config_of_the_main_process(tmp_path: Path) -> None:
    assert config_from_cmdline(["mqtt-front", "run", "-c", "/etc/x.yaml"]) == "/etc/x.yaml"
    assert config_from_cmdline(["/sbin/tini", "--", "mqtt-front", "run", "--config", "/a.yaml"]) == "/a.yaml"
    assert config_from_cmdline(["mqtt-front", "run", "--config=/b.yaml", "--workers", "2"]) == "/b.yaml"
    assert config_from_cmdline(["mqtt-front", "run"]) is None
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/usr/local/bin/python\0/usr/local/bin/mqtt-front\0run\0-c\0/etc/mqtt-front/c.yaml\0")
    assert main_process_config(cmdline) == "/etc/mqtt-front/c.yaml"
    assert main_process_config(tmp_path / "missing") is None


async def healthcheck(*args: str) -> tuple[int, str]:
    """``python -m broker.ops.healthcheck ARGS`` as the image runs it (without blocking the event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.ops.healthcheck", *args, cwd=ROOT, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def health_config(tmp_path: Path, mosquitto: Mosquitto, listener_port: int, metrics: str | None) -> Path:
    path = tmp_path / "front.yaml"
    data: dict[str, Any] = {
        "listeners": [{"name": "mqtt", "type": "tcp", "bind": f"0.0.0.0:{listener_port}"}],
        "upstream": {"url": mosquitto.url},
    }
    if metrics is not None:
        data["metrics"] = {"bind": metrics}
    path.write_text(yaml.safe_dump(data))
    return path


async def test_healthcheck_asks_the_configured_metrics_port(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # A wildcard bind on a port that is not 9100: the check asks loopback on that port.
    metrics_port = free_port()
    path = health_config(tmp_path, mosquitto, free_port(), f"0.0.0.0:{metrics_port}")
    front = FrontBroker(load_config(path), config_path=str(path))
    await front.start()
    try:
        assert await healthcheck(str(path)) == (0, "")
    finally:
        await front.stop()
    code, err = await healthcheck(str(path))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"unhealthy: http://127.0.0.1:{metrics_port}/healthz: ")


async def test_healthcheck_without_metrics_connects_to_the_first_listener(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port = free_port()
    path = health_config(tmp_path, mosquitto, port, None)
    front = FrontBroker(load_config(path), config_path=str(path))
    await front.start()
    try:
        assert await healthcheck(str(path)) == (0, "")
    finally:
        await front.stop()
    code, err = await healthcheck(str(path))
    assert code == 1 and err.startswith(f"unhealthy: listener mqtt on port {port}: "), err


async def test_healthcheck_with_a_broken_config_says_why_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "front.yaml"
    path.write_text("listeners: [{name: mqtt, bind: 1883}]\n")
    code, err = await healthcheck(str(path))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("unhealthy: ")


# ------------------------------------------------------------------ the Grafana dashboard


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())  # valid JSON, or this fails
    assert isinstance(data, dict)
    return data


def dashboard_exprs() -> list[str]:
    exprs = [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8
    return exprs


METRIC_NAME = re.compile(r"\b((?:mqtt_front|process|python)_[a-zA-Z0-9_]+)\b")
SELECTOR = re.compile(r"\b((?:mqtt_front|process|python)_[a-zA-Z0-9_]+)(\{[^}]*\})?")


def test_dashboard_has_job_and_instance_variables_and_uses_them() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert {"datasource", "job", "instance", "topn"} <= set(variables)
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["multi"]
        assert variable["definition"].startswith("label_values(mqtt_front_build_info")
        assert variable["definition"].endswith(f", {name})")
    assert '{job=~"$job"}' in variables["instance"]["definition"], "replicas of the chosen jobs only"
    text = DASHBOARD.read_text()
    assert 'job=\\"mqtt-front\\"' not in text and "job=" not in text.replace('job=~\\"$job\\"', "")
    for expr in dashboard_exprs():
        for name, matchers in SELECTOR.findall(expr):
            assert matchers and 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (name, expr)


def test_dashboard_has_per_replica_and_top_n_team_panels() -> None:
    exprs = dashboard_exprs()
    per_replica = [e for e in exprs if re.search(r"\bby \([^)]*\binstance\b", e)]
    assert len(per_replica) >= 6, "connections, traffic, CPU, memory, version... per replica"
    # A team panel shows the top N teams, never one line per team.
    by_team = [e for e in exprs if re.search(r"\bby \([^)]*\bteam\b", e)]
    assert len(by_team) >= 4
    for expr in by_team:
        assert expr.startswith("topk($topn, "), expr
    # The new families have panels.
    for name in (
        "mqtt_front_handshake_failures_total",
        "mqtt_front_auth_duration_seconds_bucket",
        "mqtt_front_certificate_expiry_seconds",
        "mqtt_front_config_reload_success",
        "mqtt_front_config_last_reload_timestamp_seconds",
    ):
        assert any(name in e for e in exprs), name


def promql(expr: str) -> str:
    """A dashboard query with its Grafana variables filled in, as Prometheus receives it."""
    return expr.replace("$__rate_interval", "1m").replace("$topn", "10").replace("$job", ".*").replace(
        "$instance", ".*"
    )


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not installed: `make test` installs it (`make promtool`)"
    records = [{"record": f"dashboard:query_{i}", "expr": promql(e)} for i, e in enumerate(dashboard_exprs())]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def rich_front(make_front: FrontFactory, pki: Pki) -> FrontBroker:
    """A front broker that exports every family: TLS, ws and PROXY listeners."""
    front: FrontBroker = await make_front(
        metrics={"bind": "127.0.0.1:0"},
        listeners=[
            {"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"},
            {
                "name": "mqtts",
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
            },
            {"name": "ws", "type": "ws", "bind": "127.0.0.1:0"},
            {"name": "lb", "type": "tcp", "bind": "127.0.0.1:0", "proxy_protocol": True},
        ],
    )
    return front


async def test_dashboard_queries_name_exported_metrics(make_front: FrontFactory, pki: Pki) -> None:
    exported = (await scrape(await rich_front(make_front, pki))).names
    covered = set()
    for expr in dashboard_exprs():
        names = METRIC_NAME.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
            covered.add(name)
    for needed in (
        "mqtt_front_connections",
        "mqtt_front_messages_total",
        "mqtt_front_denials_total",
        "mqtt_front_upstream_connect_seconds_bucket",
        "mqtt_front_connect_attempts_total",
    ):
        assert needed in covered

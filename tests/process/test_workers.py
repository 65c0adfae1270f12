"""``mqtt-front run --workers 2``: processes sharing the listeners, metrics served as one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import yaml

from tests.support.cli import running
from tests.support.front import PASSWORD, uid
from tests.support.mosquitto import Mosquitto
from tests.support.ops import Scrape, http_request
from tests.support.ports import free_port
from tests.support.workers import children

pytestmark = pytest.mark.timeout(60)


Workers = tuple[subprocess.Popen[bytes], int, int]  # (the parent process, MQTT port, metrics port)


@pytest.fixture
def workers(tmp_path: Path, mosquitto: Mosquitto, users_file: Path) -> Iterator[Workers]:
    port, metrics_port = free_port(), free_port()
    config = {
        "listeners": [{"name": "mqtt", "type": "tcp", "bind": f"127.0.0.1:{port}"}],
        "upstream": {"url": mosquitto.url},
        "auth": {"users_file": str(users_file)},
        "acl": {"preset": "flowfuse"},
        "metrics": {"bind": f"127.0.0.1:{metrics_port}"},
    }
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump(config))
    with running(path, tmp_path / "front.log", "--workers", "2", ports=(port, metrics_port)) as proc:
        yield proc, port, metrics_port


async def until_two_workers(proc: subprocess.Popen[bytes], metrics_port: int) -> None:
    async with asyncio.timeout(15):
        while True:
            status, _, _ = await http_request(metrics_port, "/readyz")
            if len(children(proc.pid)) == 2 and status == 200:  # every worker bound and ready
                return
            await asyncio.sleep(0.1)


async def test_two_workers_serve_clients_and_one_metrics_endpoint(
    workers: Workers,
) -> None:
    proc, port, metrics_port = workers
    await until_two_workers(proc, metrics_port)
    pids = children(proc.pid)
    assert len(pids) == 2
    fds_before = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in pids}
    kw = {"hostname": "127.0.0.1", "port": port, "password": PASSWORD}
    clients = [
        aiomqtt.Client(username="project:team1:p1", identifier=f"project:team1:p1:w{i}", **kw)  # type: ignore[arg-type]
        for i in range(16)
    ]
    for client in clients:
        await client.__aenter__()
    try:
        # The kernel spreads connections over both workers (SO_REUSEPORT): each holds some of them
        # (16 clients all landing on one worker has probability 2 * 2**-16).
        grown = [len(os.listdir(f"/proc/{pid}/fd")) - fds_before[pid] for pid in pids]
        assert all(n > 0 for n in grown), grown
        status, _, body = await http_request(metrics_port, "/metrics")
        assert status == 200, body
        scrape = Scrape(body.decode())
        assert scrape.get("mqtt_front_connections", listener="mqtt", team="team1") == 16
        assert scrape.get("mqtt_front_build_info", version="0.1.0") == 1  # not summed over workers
        status, _, body = await http_request(metrics_port, "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        await clients[0].publish("ff/v1/team1/p/p1/out/x", b"1", qos=1)
        status, _, body = await http_request(metrics_port, "/metrics")
        assert Scrape(body.decode()).get("mqtt_front_messages_total", team="team1", direction="in") == 1
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)


async def test_a_dead_worker_is_restarted_while_the_other_keeps_serving(workers: Workers) -> None:
    proc, port, metrics_port = workers
    await until_two_workers(proc, metrics_port)
    kw = {"hostname": "127.0.0.1", "port": port, "password": PASSWORD}
    clients = [
        aiomqtt.Client(username="project:team1:p1", identifier=f"project:team1:p1:k{i}", **kw)  # type: ignore[arg-type]
        for i in range(12)
    ]
    for client in clients:
        await client.__aenter__()
    try:
        victim, survivor = children(proc.pid)
        survivor_fds = len(os.listdir(f"/proc/{survivor}/fd"))
        os.kill(victim, signal.SIGKILL)
        # The port never stops accepting: connections keep succeeding while the victim is replaced. (One
        # that was already queued on the victim's listening socket when it died is reset by the kernel.)
        resets = 0
        async with asyncio.timeout(20):
            while True:
                try:
                    async with asyncio.timeout(3), aiomqtt.Client(
                        username="project:team1:p2", identifier=f"project:team1:p2:{uid()}", **kw  # type: ignore[arg-type]
                    ):
                        pass
                except (aiomqtt.MqttError, TimeoutError):
                    resets += 1
                pids = children(proc.pid)
                if len(pids) == 2 and victim not in pids:
                    break
                await asyncio.sleep(0.05)
        assert resets <= 2
        assert proc.poll() is None and survivor in children(proc.pid)
        # The survivor's clients stayed connected (its sockets are all still open).
        assert len(os.listdir(f"/proc/{survivor}/fd")) >= survivor_fds - 2
        await until_two_workers(proc, metrics_port)
        status, _, body = await http_request(metrics_port, "/metrics")
        assert status == 200 and Scrape(body.decode()).get("mqtt_front_worker_restarts_total") == 1
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)


async def test_workers_that_keep_dying_stop_the_process(workers: Workers) -> None:
    proc, _, metrics_port = workers
    await until_two_workers(proc, metrics_port)
    async with asyncio.timeout(40):
        while proc.poll() is None:
            for pid in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.1)
    assert proc.returncode == 1  # more than MAX_RESTARTS deaths within RESTART_WINDOW


def serving(config: Path) -> list[int]:
    """The pids of every process running ``config`` (the parent and its workers, or workers left behind)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(config).encode() in f.read().split(b"\0"):
                    pids.append(int(entry))
    return pids


async def test_workers_stop_when_the_parent_is_killed(workers: Workers, tmp_path: Path) -> None:
    # A worker outliving a SIGKILLed parent would keep its share of the port (SO_REUSEPORT) with nobody to
    # watch or stop it: the kernel sends each a SIGTERM (a drain) when the parent dies.
    proc, port, metrics_port = workers
    await until_two_workers(proc, metrics_port)
    pids = children(proc.pid)
    proc.kill()
    proc.wait()
    async with asyncio.timeout(15):
        while any(pid in serving(tmp_path / "front.yaml") for pid in pids):
            await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize("when", ["during the back-off", "as the new worker starts"])
async def test_a_stop_while_a_worker_is_restarted_leaves_no_worker_behind(
    workers: Workers, tmp_path: Path, when: str
) -> None:
    # A worker restarted (0.1 s after a death) in the moment of a SIGTERM was missed by the stop: the parent
    # waited for it until it was killed itself, and the worker served on, orphaned. And a worker signalled
    # before it had its own handlers ran the parent's (a traceback, exit 1).
    proc, _, metrics_port = workers
    await until_two_workers(proc, metrics_port)
    pids_before = set(children(proc.pid))
    victim = min(pids_before)
    os.kill(victim, signal.SIGKILL)
    if when == "as the new worker starts":
        async with asyncio.timeout(10):
            while not set(children(proc.pid)) - pids_before:
                await asyncio.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0
    async with asyncio.timeout(5):
        while serving(tmp_path / "front.yaml"):
            await asyncio.sleep(0.1)
    log = (tmp_path / "front.log").read_text()
    assert "Traceback" not in log, log[-3000:]

"""The embedded default's rules without a process: which listeners it may serve, which broker it picks,
its password file format, and what it says when neither Mosquitto nor amqtt is installed. The processes
themselves: tests/process/test_managed_embedded.py."""

from __future__ import annotations

import base64
import hashlib
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, parse_config
from broker.upstream.embedded import (
    AMQTT_MISSING,
    AmqttBroker,
    _amqtt_broker_class,
    describe_embedded,
    embedded_broker,
    embedded_problem,
    wants_embedded,
)
from broker.upstream.managed import MOSQUITTO_ENV, Credential, ManagedMosquitto, find_mosquitto, mosquitto_password_line


def config(bind: str, upstream: Any = None) -> Any:
    data: dict[str, Any] = {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}, {"name": "b", "bind": bind}]}
    if upstream is not None:
        data["upstream"] = upstream
    return parse_config(data)


@pytest.mark.parametrize("bind", ["127.0.0.1:1883", "127.0.0.2:1883", "localhost:1883", "[::1]:1883"])
def test_loopback_listeners_may_serve_the_embedded_broker(bind: str) -> None:
    assert embedded_problem(config(bind)) is None


@pytest.mark.parametrize("bind", ["0.0.0.0:1883", "[::]:1883", "10.0.0.5:1883", "mqtt.example.com:1883"])
def test_other_listeners_need_upstream_embedded_true(bind: str) -> None:
    problem = embedded_problem(config(bind))
    assert problem is not None
    assert problem.startswith(f"listeners.1.bind: {bind} is not a loopback address and no upstream is configured")
    assert "embedded broker: demo only" in problem and "upstream: {embedded: true}" in problem
    explicit = config(bind, {"embedded": True})
    assert embedded_problem(explicit) is None and wants_embedded(explicit)
    assert embedded_problem(config(bind, {"url": "mqtt://10.0.0.9:1883"})) is None


def test_embedded_true_takes_no_url_or_credentials() -> None:
    assert wants_embedded(config("127.0.0.1:2", {"embedded": True, "connect_timeout": 2}))
    assert not wants_embedded(config("127.0.0.1:2", {"url": "mqtt://h:1", "embedded": False}))
    extras: list[dict[str, Any]] = [{"url": "mqtt://h:1"}, {"urls": ["mqtt://h:1"]}, {"username": "u"}, {"tls": {}}]
    for extra in extras:
        with pytest.raises(ConfigError, match="embedded: true runs the embedded broker"):
            config("127.0.0.1:2", {"embedded": True, **extra})
    with pytest.raises(ConfigError, match=r"give either url or urls .*\(or embedded: true\)"):
        config("127.0.0.1:2", {"embedded": False})
    up = config("127.0.0.1:2", {"embedded": True}).upstream
    assert up is not None and not up.uses_tls and up.all_urls == []


def test_the_password_line_is_mosquittos_pbkdf2_sha512() -> None:
    credential = Credential.generate()
    assert credential.password not in repr(credential)
    assert Credential.generate() != credential  # per start
    line = mosquitto_password_line(credential)
    username, rest = line.rstrip("\n").split(":", 1)
    assert username == credential.username
    _, kind, iterations, salt, digest = rest.split("$")
    assert (kind, iterations, len(base64.b64decode(salt))) == ("7", "101", 12)
    expected = hashlib.pbkdf2_hmac("sha512", credential.password.encode(), base64.b64decode(salt), 101, 64)
    assert base64.b64decode(digest) == expected
    assert mosquitto_password_line(credential) != line  # a fresh salt each time


def test_the_binary_is_chosen_by_the_environment_then_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MOSQUITTO_ENV, "none")
    assert find_mosquitto() is None
    assert isinstance(embedded_broker(), AmqttBroker)
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv(MOSQUITTO_ENV, str(fake))
    with pytest.raises(ConfigError, match="not an executable file"):
        find_mosquitto()
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert find_mosquitto() == str(fake)
    broker = embedded_broker()
    assert isinstance(broker, ManagedMosquitto) and broker.binary == str(fake) and broker.v5
    monkeypatch.delenv(MOSQUITTO_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_mosquitto() == str(fake)


def test_without_mosquitto_nor_amqtt_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MOSQUITTO_ENV, "none")
    monkeypatch.setitem(sys.modules, "amqtt", None)  # import amqtt now raises ImportError
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)
    with pytest.raises(ConfigError) as err:
        describe_embedded()
    assert str(err.value) == AMQTT_MISSING
    assert "apt-get install mosquitto" in AMQTT_MISSING and "pip install 'mqtt-front[embedded]'" in AMQTT_MISSING
    with pytest.raises(ConfigError) as err:
        _amqtt_broker_class()  # what AmqttBroker.start() imports first
    assert str(err.value) == AMQTT_MISSING


def test_only_our_own_child_counts_as_the_managed_listener() -> None:
    """The credential is sent only to a listener the child process holds (owns_listener)."""
    import os
    import socket
    import subprocess
    import sys

    from broker.upstream.managed import owns_listener

    mine = socket.socket()
    mine.bind(("127.0.0.1", 0))
    mine.listen()
    port = mine.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert owns_listener(os.getpid(), port)
        assert not owns_listener(child.pid, port)  # someone else's listener on that port is not ours
        mine.close()
        assert not owns_listener(os.getpid(), port)
    finally:
        child.kill()
        child.wait()

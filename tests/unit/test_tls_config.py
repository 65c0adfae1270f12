"""Listener TLS without a handshake: the identity taken from a peer certificate, SNI name matching, and the
`tls` configuration rules (handshakes with real clients: tests/e2e/test_listener_tls.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, parse_config
from broker.edge.tls import identity_from_peercert, server_name_allowed

# ------------------------------------------------------------------ client certificates


def test_identity_from_peercert() -> None:
    cn = {"subject": ((("organizationName", "x"),), (("commonName", "project:team1:p1"),))}
    assert identity_from_peercert(cn) == "project:team1:p1"
    san = {"subject": ((("organizationName", "x"),),), "subjectAltName": (("IP Address", "1.2.3.4"),
                                                                           ("email", "alice@team1"))}
    assert identity_from_peercert(san) == "alice@team1"
    two = {"subject": ((("commonName", "a"),), (("commonName", "b"),))}
    assert identity_from_peercert(two) is None
    assert identity_from_peercert(None) is None and identity_from_peercert({}) is None




# ------------------------------------------------------------------ SNI


def test_server_name_allowed() -> None:
    names = ["mqtt.example.com", "*.mqtt.example.org"]
    assert server_name_allowed("MQTT.example.com.", names)
    assert server_name_allowed("eu.mqtt.example.org", names)
    assert not server_name_allowed("a.b.mqtt.example.org", names)
    assert not server_name_allowed("mqtt.example.org", names)
    assert not server_name_allowed("evil.com", names)
    assert not server_name_allowed(None, names)




# ------------------------------------------------------------------ configuration


def _config(**tls: Any) -> dict[str, Any]:
    return {"listeners": [{"name": "mqtts", "bind": "127.0.0.1:8883", "tls": {"cert": "s.pem", "key": "s.key", **tls}}]}


@pytest.mark.parametrize("key", ["require_client_cert", "use_identity_as_username"])
def test_config_client_cert_options_need_client_ca(key: str) -> None:
    with pytest.raises(ConfigError, match=f"listeners.0.tls: {key} needs client_ca"):
        parse_config(_config(**{key: True}))


def test_config_relative_paths(tmp_path: Path) -> None:
    config = parse_config(_config(client_ca="ca/clients.pem"), tmp_path)
    tls = config.listeners[0].tls
    assert tls is not None
    assert (tls.cert, tls.key, tls.client_ca) == (tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca/clients.pem")
    with pytest.raises(ConfigError, match="server_names"):
        parse_config(_config(server_names=[]))

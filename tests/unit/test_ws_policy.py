"""The WebSocket listener's pure parts: its config keys, request screening and subprotocol choice,
X-Forwarded-For behind trusted proxies, binary frame lengths (on the wire: tests/e2e/test_websocket.py)."""

from __future__ import annotations

import ipaddress

import pytest
import websockets
from websockets.datastructures import Headers
from websockets.http11 import Request

from broker.config import ConfigError, parse_config
from broker.edge.ws_frames import binary_frame
from broker.edge.ws_policy import WsPolicy, forwarded_peer, screen_request, select_subprotocol


def test_ws_keys_on_tcp_listener_are_errors() -> None:
    for key, value in [("path", "/mqtt"), ("allowed_origins", ["https://a"]), ("trusted_proxies", ["10.0.0.0/8"]),
                       ("compression", True), ("require_subprotocol", False), ("max_frame_size", 4096)]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key} is only valid on type: ws"):
            parse_config({"listeners": [{"name": "a", "type": "tcp", "bind": "127.0.0.1:1", key: value}]})
    with pytest.raises(ConfigError, match="trusted_proxies"):
        parse_config({"listeners": [{"name": "a", "type": "ws", "bind": "127.0.0.1:1", "trusted_proxies": ["x"]}]})
    with pytest.raises(ConfigError, match=r"listeners\.0\.path"):
        parse_config({"listeners": [{"name": "a", "type": "ws", "bind": "127.0.0.1:1", "path": "mqtt"}]})
    parse_config({"listeners": [{"name": "a", "type": "ws", "bind": "127.0.0.1:1", "path": "/mqtt"}]})


def _request(path: str = "/", **headers: str) -> Request:
    return Request(path, Headers([(k.replace("_", "-"), v) for k, v in headers.items()]))


def test_screen_request_and_subprotocol_selection() -> None:
    policy = WsPolicy(path="/m", allowed_origins=frozenset({"https://a.example"}), allowed_hosts=frozenset({"h"}))
    assert screen_request(_request("/m", Host="h", Origin="https://a.example/"), policy) is None
    assert screen_request(_request("/x", Host="h"), policy) == (404, "no WebSocket endpoint at this path")
    assert screen_request(_request("/m", Host="[::1]:80"), policy) is not None
    assert screen_request(_request("/m", Host="h", Origin="null"), policy) is not None
    assert select_subprotocol(["x", "mqttv3.1", "mqtt"], True) == "mqtt"
    assert select_subprotocol([], False) is None
    with pytest.raises(websockets.exceptions.NegotiationError):
        select_subprotocol(["x"], False)


def test_forwarded_peer() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert forwarded_peer(("10.0.0.5", 4000), ["1.2.3.4"], nets) == ("1.2.3.4", 0)
    assert forwarded_peer(("10.0.0.5", 4000), ["1.2.3.4, 10.9.9.9"], nets) == ("1.2.3.4", 0)
    assert forwarded_peer(("10.0.0.5", 4000), ["5.5.5.5", "1.2.3.4"], nets) == ("1.2.3.4", 0)  # two headers
    assert forwarded_peer(("10.0.0.5", 4000), ["10.1.1.1"], nets) == ("10.1.1.1", 0)  # all trusted: left-most
    assert forwarded_peer(("::ffff:10.0.0.5", 1, 0, 0), ["[2001:db8::1]:80"], nets) == ("2001:db8::1", 0)
    assert forwarded_peer(("192.0.2.1", 4000), ["1.2.3.4"], nets) == ("192.0.2.1", 4000)
    assert forwarded_peer(("10.0.0.5", 4000), ["bogus"], nets) == ("10.0.0.5", 4000)
    assert forwarded_peer(("10.0.0.5", 4000), [], nets) == ("10.0.0.5", 4000)


def test_binary_frame_lengths() -> None:
    for n in (0, 125, 126, 65535, 65536):
        frame = binary_frame(b"a" * n)
        assert frame[0] == 0x82
        assert len(frame) - n == (2 if n < 126 else 4 if n < 65536 else 10)

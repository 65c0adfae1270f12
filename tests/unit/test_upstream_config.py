"""The `upstream` configuration rules: url/urls, schemes, tls, defaults and relative paths (no connection made)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import ConfigError, load_config, parse_config


def _config(upstream: dict[str, Any]) -> None:
    parse_config({"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}], "upstream": upstream})


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ({"urls": ["mqtt://a:1883", "mqtts://b:8883"]}, "upstream: urls mixes mqtt:// and mqtts://"),
        ({"urls": ["mqtts://a:8883", "mqtt://b:1883"], "tls": {}}, "upstream: urls mixes mqtt:// and mqtts://"),
        ({"url": "mqtt://a:1883", "tls": {"ca": "ca.pem"}}, "upstream: tls is set but the upstream URLs are plain"),
        ({"url": "mqtt://a:1883", "urls": ["mqtt://a:1883"]}, "upstream: give either url or urls"),
        ({}, "upstream: give either url or urls"),
        ({"urls": []}, "upstream: urls is empty"),
        ({"urls": ["mqtt://a:1", "mqtt://a:1"]}, "upstream: urls has duplicates"),
        ({"urls": ["mqtt://a:1", "http://b:2"]}, "upstream.urls.1: 'http://b:2': scheme must be mqtt://"),
        ({"url": "mqtts://:8883"}, "upstream.url: 'mqtts://:8883' has no host"),
        ({"url": "mqtt://a:1", "strategy": "random"}, "upstream.strategy: "),
        ({"url": "mqtts://a:1", "tls": {"min_version": "TLSv1.1"}}, "upstream.tls.min_version: "),
        ({"url": "mqtts://a:1", "tls": {"key": "k.pem"}}, "upstream.tls: key is set without cert"),
    ],
    ids=["mixed", "mixed-tls", "tls-on-plain", "url-and-urls", "neither", "empty", "duplicates", "scheme",
         "no-host", "strategy", "min-version", "key-alone"],
)
def test_upstream_config_errors(upstream: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(upstream)
    assert expected in str(info.value), str(info.value)


def test_upstream_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(yaml.safe_dump({
        "listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
        "upstream": {"urls": ["mqtts://a.internal", "mqtts://b.internal:9883"],
                     "tls": {"ca": "pki/ca.pem", "cert": "/abs/front.pem", "key": "pki/front.key"}},
    }))
    up = load_config(path).upstream
    assert up is not None and up.tls is not None
    assert up.endpoints == [("mqtts://a.internal", "a.internal", 8883), ("mqtts://b.internal:9883", "b.internal", 9883)]
    assert (up.strategy, up.uses_tls, up.tls.verify, up.tls.min_version) == ("failover", True, True, "TLSv1.2")
    assert (up.tls.ca, up.tls.cert, up.tls.key) == (tmp_path / "pki/ca.pem", Path("/abs/front.pem"),
                                                    tmp_path / "pki/front.key")
    plain = parse_config({"listeners": [{"name": "m", "bind": "127.0.0.1:0"}], "upstream": {"url": "mqtt://h"}})
    assert plain.upstream is not None and plain.upstream.endpoints == [("mqtt://h", "h", 1883)]

"""``limits.store`` as operators write it (issue 14, item 2): the Redis URL and its checks, the password as
a key, a file or the URL's userinfo (never in an error), the TLS CA file, ttl against heartbeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import ConfigError, StoreConfig, load_config, parse_config

LISTENERS = [{"name": "mqtt", "bind": "127.0.0.1:1883"}]


def store_of(store: Any, base_dir: Path | None = None) -> StoreConfig:
    config = parse_config({"listeners": LISTENERS, "limits": {"store": store}}, base_dir)
    assert config.limits.store is not None
    return config.limits.store


def error_of(store: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"listeners": LISTENERS, "limits": {"store": store}})
    return str(info.value)


def test_the_defaults_and_the_bare_url() -> None:
    assert parse_config({"listeners": LISTENERS}).limits.store is None
    store = store_of("redis://127.0.0.1:6379/0")
    assert (store.url, store.on_error, store.timeout, store.key_prefix) == (
        "redis://127.0.0.1:6379/0",
        "closed",
        0.25,
        "mqtt-front",
    )
    assert (store.heartbeat, store.ttl, store.password) == (2.0, 10.0, None)
    assert store_of({"url": "rediss://redis.internal", "on_error": "open"}).on_error == "open"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://:pw-in-url@redis:6379", "redis://host:port/db (plain) or rediss://host:port/db (TLS)"),
        ("redis://:pw-in-url@redis:99999/0", "out of range"),
        ("redis://:pw-in-url@redis:6379/cache", "the path is the database number (/0)"),
    ],
)
def test_a_bad_url_is_named_without_its_password(url: str, problem: str) -> None:
    error = error_of({"url": url})
    assert "limits.store.url" in error and problem in error
    assert "pw-in-url" not in error and ":***@redis" in error


def test_the_password_is_given_once() -> None:
    assert store_of({"url": "redis://redis:6379/0", "password": "pw"}).password == "pw"
    assert "give it once" in error_of({"url": "redis://:a@redis/0", "password": "b"})
    assert "not both" in error_of({"url": "redis://redis/0", "password": "a", "password_file": "f"})


def test_the_password_file_and_the_ca_file_are_relative_to_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text("from-a-file\nignored\n")
    path = tmp_path / "front.yaml"
    store = {"url": "rediss://redis:6380/1", "password_file": "secrets/redis", "ca_file": "ca.pem"}
    path.write_text(yaml.safe_dump({"listeners": LISTENERS, "limits": {"store": store}}))
    loaded = load_config(path).limits.store
    assert loaded is not None
    assert (loaded.password, loaded.password_file, loaded.ca_file) == (
        "from-a-file",
        tmp_path / "secrets" / "redis",
        tmp_path / "ca.pem",
    )
    (tmp_path / "secrets" / "redis").write_text("")
    with pytest.raises(ConfigError, match=r"limits\.store\.password_file: .* is empty"):
        load_config(path)


def test_ca_file_needs_rediss_and_ttl_outlives_the_heartbeat() -> None:
    assert "use rediss://" in error_of({"url": "redis://redis/0", "ca_file": "ca.pem"})
    assert "ttl must be longer than heartbeat" in error_of({"url": "redis://redis/0", "heartbeat": 5, "ttl": 5})
    assert "greater than 0" in error_of({"url": "redis://redis/0", "timeout": 0})

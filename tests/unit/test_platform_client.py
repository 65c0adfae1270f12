"""broker.auth.platform without sockets or an event loop: headers, URLs for logs, the CA, the latency buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.auth.platform import (
    LATENCY_BUCKETS,
    PlatformClient,
    PlatformStats,
    redact_url,
    resolve_headers,
    ssl_context,
)
from broker.config import ConfigError, HttpAuthConfig


def test_headers_literal_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  token-1  \nnext\n")
    monkeypatch.setenv("FF_KEY", "key-2")
    resolved = resolve_headers({"A": "plain", "B": f"file:{secret}", "C": "env:FF_KEY"})
    assert resolved == {"A": "plain", "B": "token-1", "C": "key-2"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("file:/nonexistent/token", "auth.http.headers.Authorization: cannot read /nonexistent/token"),
        ("env:MQTT_FRONT_TEST_UNSET", "auth.http.headers.Authorization: environment variable MQTT_FRONT_TEST_UNSET"),
        ("", "auth.http.headers.Authorization: the value is empty"),
    ],
)
def test_header_problems_name_the_key(value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQTT_FRONT_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_headers({"Authorization": value})
    assert str(info.value).startswith(message)


def test_header_from_an_empty_file_or_with_a_line_break(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"auth\.http\.headers\.X: the value is empty"):
        resolve_headers({"X": f"file:{empty}"})
    monkeypatch.setenv("FF_BROKEN", "a\nb")
    with pytest.raises(ConfigError, match=r"auth\.http\.headers\.X: the value holds a line break"):
        resolve_headers({"X": "env:FF_BROKEN"})


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection", "Keep-Alive", "TE",
                                  "Upgrade", "Trailer", "Expect"])
def test_headers_the_client_frames_are_refused_in_the_configuration(name: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set by the platform client itself"):
        HttpAuthConfig(auth_url="http://forge/auth", headers={name: "x", "Authorization": "Bearer t"})
    assert HttpAuthConfig(auth_url="http://forge/auth", headers={"Authorization": "Bearer t"}).headers


def test_redact_url() -> None:
    assert redact_url("https://svc:pw@forge:3000/api/comms/v2/auth?token=x#f") == "https://***@forge:3000/api/comms/v2/auth"
    assert redact_url("http://forge:3000/api/comms/v2/acls") == "http://forge:3000/api/comms/v2/acls"


def test_ca_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.http\.ca_file: cannot load"):
        ssl_context(tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"auth\.http\.ca_file"):
        ssl_context(bad)
    assert ssl_context(None).verify_mode.name == "CERT_REQUIRED"


def test_latency_buckets() -> None:
    stats = PlatformStats()
    for seconds in (0.0005, 0.001, 0.003, 20.0):
        stats.observe(seconds)
    assert stats.latency_counts[0] == 2  # at most 0.001 (le is inclusive)
    assert stats.latency_counts[LATENCY_BUCKETS.index(0.005)] == 1
    assert stats.latency_counts[-1] == 1
    assert stats.latency_count == 4 and stats.latency_sum == pytest.approx(20.0045)


def test_cached_before_start_and_unknown_actions() -> None:
    client = PlatformClient(HttpAuthConfig(auth_url="http://forge/a", acl_url="http://forge/b"))
    assert client.cached("u", "c", "publish", "t") is None
    assert client.stats.cache_hits == 0 and client.stats.cache_misses == 0
    with pytest.raises(ValueError, match="action 'read'"):
        client.cached("u", "c", "read", "t")
    client.forget("u")  # nothing to forget: no error

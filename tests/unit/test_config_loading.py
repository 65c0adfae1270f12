"""Loading the configuration as an operator writes it (issue 15, items 2 and 4), without sockets or a loop.

Files that are not UTF-8, duplicate YAML keys, the hint added to a validation error, overlapping binds
between IP literals, ``MQTT_FRONT_...`` environment overrides, ``*_file`` secrets, and the userinfo of an
upstream URL (used as the credentials, never shown).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.auth.users import load_users
from broker.config import Config, ConfigError, load_config, parse_config, redact_url, safe_load
from tests.support.front import GOOD_HASH

LISTENER = {"name": "mqtt", "bind": "127.0.0.1:1883"}


def write(tmp_path: Path, data: Any, name: str = "front.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    return str(info.value)


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MQTT_FRONT_ variable of the environment running the tests leaks into them."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MQTT_FRONT_"):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------- not UTF-8


def test_latin1_comment_in_config_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "front.yaml"
    text = b"listeners: [{name: mqtt, bind: '127.0.0.1:1883'}]\n# caf\xe9\n"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    offset = text.index(b"\xe9")
    assert str(info.value) == f"{path} is not UTF-8 text (a bad byte at offset {offset})"


def test_latin1_users_file_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_bytes(b"users: []\n# M\xfcller\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert str(info.value) == f"auth.users_file: {path} is not UTF-8 text (a bad byte at offset 13)"


# ---------------------------------------------------------------- duplicate keys


def test_duplicate_top_level_key_names_both_lines(tmp_path: Path) -> None:
    text = (
        "listeners:\n  - {name: a, bind: '127.0.0.1:1883'}\nauth: {}\n"
        "listeners:\n  - {name: b, bind: '127.0.0.1:1884'}\n"
    )
    message = error_of(tmp_path, text)
    assert "duplicate key 'listeners' on line 4 (first on line 1)" in message, message
    assert str(tmp_path / "front.yaml") in message


def test_duplicate_nested_key_in_flow_mapping(tmp_path: Path) -> None:
    text = "listeners:\n  - {name: a, bind: '127.0.0.1:1883',\n     name: b}\n"
    message = error_of(tmp_path, text)
    assert "duplicate key 'name' on line 3 (first on line 2)" in message, message


def test_duplicate_keys_that_are_equal_once_parsed(tmp_path: Path) -> None:
    # 1 and 0x1 are the same integer key: the second would overwrite the first just the same.
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 1 on line 2 \(first on line 1\)"):
        safe_load("1: a\n0x1: b\n")


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    # `<<` merges are not duplicates: an explicit key overriding a merged one is what merges are for.
    data = safe_load("base: &b {name: a, bind: x}\nlistener: {<<: *b, name: c}\nnested: {<<: [*b], bind: y}\n")
    assert data["listener"] == {"name": "c", "bind": "x"}
    assert data["nested"] == {"name": "a", "bind": "y"}


def test_duplicate_username_key_in_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(f"users:\n  - username: alice\n    password_hash: '{GOOD_HASH}'\n    username: bob\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert "duplicate key 'username' on line 4 (first on line 2)" in str(info.value)


# ---------------------------------------------------------------- hints


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listeners": [{"name": "mqtt", "bind": 1883}]}, "listeners.0.bind: Input should be a valid string "
                                                          "(host:port, e.g. 0.0.0.0:1883)"),
        ({"listeners": [{"name": "mqtt", "bind": "1883"}]}, "'1883' is not host:port (host:port, e.g. 0.0.0.0:1883)"),
        ({"listeners": [LISTENER], "metrics": {"bind": 9100}}, "metrics.bind: Input should be a valid string "
                                                               "(host:port, e.g. 0.0.0.0:1883)"),
        ({"listeners": [LISTENER], "acls": {}}, "acls: Extra inputs are not permitted (did you mean acl?)"),
        ({"listeners": [{**LISTENER, "type": "wss"}]}, "listeners.0.type: Input should be 'tcp' or 'ws' "
                                                       "(for WebSocket over TLS use type: ws with tls:"),
        ({"listeners": [{**LISTENER, "type": "mqtts"}]}, "(for MQTT over TLS use type: tcp with tls:"),
        ({"listeners": [{**LISTENER, "tsl": {}}]},
         "listeners.0.tsl: Extra inputs are not permitted (did you mean tls?)"),
        ({"listeners": [LISTENER], "upstream": {"url": "mqtt://a:1", "pasword": "x"}},
         "upstream.pasword: Extra inputs are not permitted (did you mean password?)"),
        ({"listeners": [LISTENER], "auth": {"http": {"auth_url": "http://a/", "timout": 1}}},
         "auth.http.timout: Extra inputs are not permitted (did you mean timeout?)"),
        ({"listeners": [LISTENER], "acl": {"rules": [{"who": "any", "effect": "allow", "action": "both",
                                                      "pattern": "#", "retained": True}]}},
         "acl.rules.0.retained: Extra inputs are not permitted (did you mean retain?)"),
        ({"listeners": [LISTENER], "acl": {"preset": "FlowFuse"}}, "(did you mean 'flowfuse'?)"),
        ({"listeners": [LISTENER], "zzz": 1}, "zzz: Extra inputs are not permitted (known keys: listeners, upstream,"),
    ],
    ids=["bind-int", "bind-port-only", "metrics-bind", "acls", "wss", "mqtts", "tsl", "pasword", "timout",
         "retained", "preset-case", "unknown"],
)
def test_validation_errors_get_the_hint_that_fits(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in str(info.value), str(info.value)


# ---------------------------------------------------------------- overlapping binds (IP literals)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listeners": [{"name": "a", "bind": "0.0.0.0:1883"}, {"name": "b", "bind": "127.0.0.1:1883"}]},
         "listeners.1.bind 127.0.0.1:1883 overlaps listeners.0.bind 0.0.0.0:1883 (0.0.0.0 is every IPv4 address)"),
        ({"listeners": [{"name": "a", "bind": "[::1]:1883"}, {"name": "b", "bind": "[::]:1883"}]},
         "listeners.1.bind [::]:1883 overlaps listeners.0.bind [::1]:1883 (:: is every IPv6 address)"),
        ({"listeners": [LISTENER], "metrics": {"bind": "127.0.0.1:1883"}},
         "metrics.bind 127.0.0.1:1883 overlaps listeners.0.bind 127.0.0.1:1883 (the same address)"),
        ({"listeners": [LISTENER], "metrics": {"bind": "0.0.0.0:9100"},
          "admin": {"bind": "127.0.0.1:9100", "token": "x" * 32}},
         "admin.bind 127.0.0.1:9100 overlaps metrics.bind 0.0.0.0:9100"),
        ({"listeners": [{"name": "a", "bind": "localhost:1883"}, {"name": "b", "bind": "LOCALHOST:1883"}]},
         "listeners.1.bind LOCALHOST:1883 overlaps listeners.0.bind localhost:1883 (the same address)"),
    ],
    ids=["wildcard-v4", "wildcard-v6", "metrics-on-listener", "admin-on-metrics", "same-name"],
)
def test_overlapping_binds_are_refused(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in str(info.value), str(info.value)


def test_binds_that_do_not_overlap() -> None:
    parse_config({
        "listeners": [
            {"name": "a", "bind": "0.0.0.0:1883"},
            {"name": "b", "bind": "[::1]:1883"},  # asyncio binds :: and IPv6 addresses IPv6-only
            {"name": "c", "bind": "127.0.0.1:0"},  # port 0: a free port each
            {"name": "d", "bind": "127.0.0.1:0", "type": "ws"},
            {"name": "e", "bind": "127.0.0.2:1884"},
        ],
        "metrics": {"bind": "127.0.0.1:1884"},
    })


# ---------------------------------------------------------------- environment


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"listeners": [LISTENER], "limits": {"max_connections": 5},
                            "upstream": {"url": "mqtt://a:1", "password": "from-file"}})
    monkeypatch.setenv("MQTT_FRONT_LIMITS__MAX_CONNECTIONS", "7")
    monkeypatch.setenv("MQTT_FRONT_UPSTREAM__PASSWORD", "from-env")
    monkeypatch.setenv("MQTT_FRONT_UPSTREAM__USERNAME", "front")
    monkeypatch.setenv("mqtt_front_logging__level", "debug")  # names are case-insensitive
    monkeypatch.setenv("MQTT_FRONT_LISTENERS__0__BIND", "127.0.0.1:2883")  # a list entry by its index
    monkeypatch.setenv("MQTT_FRONT_ACL__CLIENT_ID_SUFFIX", "true")
    monkeypatch.setenv("MQTT_FRONT_TEST_SOMETHING", "ignored")  # no such key: not an override
    config = load_config(path)
    assert config.limits.max_connections == 7
    assert config.upstream is not None and config.upstream.password == "from-env"
    assert config.upstream.username == "front"
    assert config.logging.level == "debug"
    assert config.listeners[0].bind == "127.0.0.1:2883" and config.listeners[0].name == "mqtt"
    assert config.acl.client_id_suffix is True


def test_environment_replaces_the_twin_of_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MQTT_FRONT_UPSTREAM__PASSWORD_FILE replaces the file's password (and the reverse): not "both given"."""
    (tmp_path / "pw").write_text("from-secret-file\n")
    path = write(tmp_path, {"listeners": [LISTENER], "upstream": {"url": "mqtt://a:1", "password": "from-file"},
                            "admin": {"bind": "127.0.0.1:9200", "token_file": "missing.token"}})
    monkeypatch.setenv("MQTT_FRONT_UPSTREAM__PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("MQTT_FRONT_ADMIN__TOKEN", "t" * 32)
    config = load_config(path)
    assert config.upstream is not None and config.upstream.password == "from-secret-file"
    assert config.admin is not None and config.admin.token == "t" * 32 and config.admin.token_file is None


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MQTT_FRONT_LIMITS__MAX_CONNECTIONS", "many",
         "limits.max_connections (from MQTT_FRONT_LIMITS__MAX_CONNECTIONS): Input should be a valid integer"),
        ("MQTT_FRONT_UPSTREAM__PASWORD", "x",
         "upstream.pasword (from MQTT_FRONT_UPSTREAM__PASWORD): Extra inputs are not permitted (did you mean "
         "password?)"),
        ("MQTT_FRONT_LISTENERS__3__BIND", "127.0.0.1:1", "MQTT_FRONT_LISTENERS__3__BIND: listeners has no entry 3"),
    ],
    ids=["bad-value", "typo", "no-such-entry"],
)
def test_environment_errors_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    message = error_of(tmp_path, {"listeners": [LISTENER], "upstream": {"url": "mqtt://a:1"}})
    assert expected in message, message


def test_errors_elsewhere_do_not_name_a_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_FRONT_LIMITS__MAX_CONNECTIONS", "5")
    monkeypatch.setenv("MQTT_FRONT_UPSTREAM__CONNECT_TIMEOUT", "3")
    message = error_of(tmp_path, {"listeners": [LISTENER, LISTENER], "upstream": {"url": "mqtt://a:1"}})
    assert "(top level): listener names must be unique: mqtt" in message, message
    assert "MQTT_FRONT_" not in message
    message = error_of(tmp_path, {"listeners": [LISTENER], "upstream": {}})
    assert "upstream: give either url or urls" in message and "MQTT_FRONT_" not in message, message


# ---------------------------------------------------------------- *_file secrets


def test_upstream_password_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "upstream").write_text("s3cret-from-file\nignored second line\n")
    upstream = {"url": "mqtt://a:1", "username": "front", "password_file": "secrets/upstream"}
    path = write(tmp_path, {"listeners": [LISTENER], "upstream": upstream})
    config = load_config(path)
    assert config.upstream is not None and config.upstream.password == "s3cret-from-file"
    assert config.upstream.password_file == tmp_path / "secrets" / "upstream"
    # A reload reads the configuration again, and so the file: a rotated secret is seen.
    (tmp_path / "secrets" / "upstream").write_text("rotated\n")
    again = load_config(path)
    assert again.upstream is not None and again.upstream.password == "rotated"


def test_reload_reads_the_password_file_again(tmp_path: Path) -> None:
    from broker.reload import prepare
    from broker.server import build_acl

    (tmp_path / "pw").write_text("first\n")
    path = write(tmp_path, {"listeners": [LISTENER], "upstream": {"url": "mqtt://a:1", "password_file": "pw"}})
    running = load_config(path)
    assert prepare(path, running, {}, build_acl).restart_needed == []
    (tmp_path / "pw").write_text("rotated\n")
    # The upstream connections use the new password only after a restart (like a changed upstream URL).
    assert prepare(path, running, {}, build_acl).restart_needed == ["upstream"]


@pytest.mark.parametrize(
    ("upstream", "content", "expected"),
    [
        ({"password_file": "nowhere"}, None, "upstream.password_file: cannot read {dir}/nowhere: No such file"),
        ({"password_file": "pw"}, b"\n", "upstream.password_file: {dir}/pw is empty (the secret is its first line)"),
        ({"password_file": "pw"}, b"caf\xe9\n", "upstream.password_file: {dir}/pw is not UTF-8 text"),
        ({"password_file": "pw", "password": "x"}, b"x\n", "upstream: give either password or password_file"),
    ],
    ids=["missing", "empty", "not-utf8", "both"],
)
def test_upstream_password_file_errors(
    tmp_path: Path, upstream: dict[str, Any], content: bytes | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / "pw").write_bytes(content)
    message = error_of(tmp_path, {"listeners": [LISTENER], "upstream": {"url": "mqtt://a:1", **upstream}})
    assert expected.format(dir=tmp_path) in message, message


# ---------------------------------------------------------------- userinfo in upstream URLs


def test_userinfo_is_used_as_the_upstream_credentials() -> None:
    config = parse_config({"listeners": [LISTENER], "upstream": {"url": "mqtt://front:s3cret@host:1884"}})
    up = config.upstream
    assert up is not None
    assert (up.username, up.password) == ("front", "s3cret")
    # Every URL the rest of the broker sees (labels, targets, check output) has the password starred.
    assert up.all_urls == ["mqtt://front:***@host:1884"]
    assert [url for url, _, _ in up.endpoints] == ["mqtt://front:***@host:1884"]
    assert up.host_port == ("host", 1884)


def test_userinfo_is_percent_decoded_and_the_same_in_every_url() -> None:
    config = parse_config({"listeners": [LISTENER], "upstream": {
        "urls": ["mqtts://fr%40nt:p%3Aw%2Fd@a:8883", "mqtts://fr%40nt:p%3Aw%2Fd@b:8883"]}})
    assert config.upstream is not None
    assert (config.upstream.username, config.upstream.password) == ("fr@nt", "p:w/d")
    assert config.upstream.all_urls == ["mqtts://fr%40nt:***@a:8883", "mqtts://fr%40nt:***@b:8883"]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ({"url": "mqtt://front:s3cret@h:1", "username": "front"},
         "upstream: the URL has user:password@ and username/password are set too: give the credentials once"),
        ({"url": "mqtt://front:s3cret@h:1", "password_file": "pw"}, "give the credentials once"),
        ({"urls": ["mqtt://front:s3cret@a:1", "mqtt://b:1"]},
         "upstream: urls differ in their user:password@: give the credentials once"),
        ({"url": "mqtt://front:s3cret@h:port"}, "upstream.url: 'mqtt://front:***@h:port': Port could not be cast"),
        ({"url": "http://front:s3cret@h:1"}, "upstream.url: 'http://front:***@h:1': scheme must be mqtt://"),
    ],
    ids=["and-username", "and-password-file", "differ", "bad-port", "bad-scheme"],
)
def test_userinfo_errors_never_show_the_password(upstream: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"listeners": [LISTENER], "upstream": upstream})
    assert expected in str(info.value), str(info.value)
    assert "s3cret" not in str(info.value)


def test_platform_url_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"listeners": [LISTENER], "auth": {"http": {"auth_url": "ftp://svc:s3cret@forge/auth"}}})
    assert "'ftp://svc:***@forge/auth' is not an http:// or https:// URL" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://front:s3cret@host:1884", "mqtt://front:***@host:1884"),
        ("mqtt://front@host:1884", "mqtt://front@host:1884"),
        ("mqtt://:s3cret@host", "mqtt://:***@host"),
        ("mqtts://[::1]:8883", "mqtts://[::1]:8883"),
        ("https://svc:pw@forge:3000/api/auth?token=x#frag", "https://svc:***@forge:3000/api/auth"),
        ("mqtt://a:b@c@host:1", "mqtt://a:***@host:1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ---------------------------------------------------------------- schema


def test_json_schema_lists_every_section_and_the_secret_files() -> None:
    schema = json.loads(json.dumps(Config.model_json_schema()))
    assert set(schema["properties"]) >= {"listeners", "upstream", "auth", "acl", "metrics", "admin", "limits"}
    assert schema["additionalProperties"] is False
    upstream = schema["$defs"]["UpstreamConfig"]["properties"]
    assert "password_file" in upstream and "password" in upstream
    assert schema["$defs"]["ListenerConfig"]["properties"]["type"]["enum"] == ["tcp", "ws"]


def test_passwords_with_slash_question_mark_or_hash_are_redacted_whole() -> None:
    from broker.config.base import redact_url

    for url in ("mqtt://front:ab/cd@broker:1883", "mqtt://front:1234/x@broker", "mqtt://f:p#q?r@h:1"):
        shown = redact_url(url)
        assert "***@" in shown
        assert not any(secret in shown for secret in ("ab/cd", "1234/x", "p#q"))

"""The users file: what loading refuses, and how the refusal names the file (no broker started).

`mqtt-front check` on the same files: tests/process/test_cli_users.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.auth.users import load_users
from broker.config import ConfigError, parse_config
from broker.server import FrontBroker
from tests.support.front import GOOD_HASH, write_users_config, write_users_file

BAD_USERS: list[tuple[str, Any, str]] = [
    ("not-a-list", {"users": {"project:team1:p1": GOOD_HASH}}, "users: ["),
    ("no-users-key", {"accounts": []}, "users: ["),
    ("top-level-list", [{"username": "a", "password_hash": GOOD_HASH}], "users: ["),
    ("bad-hash", {"users": [{"username": "a", "password_hash": "plaintext"}]}, "not a bcrypt hash"),
    ("short-hash", {"users": [{"username": "a", "password_hash": GOOD_HASH[:-1]}]}, "not a bcrypt hash"),
    ("reserved", {"users": [{"username": "anonymous", "password_hash": GOOD_HASH}]}, "reserved"),
    ("reserved-prefix", {"users": [{"username": "anonymous:x", "password_hash": GOOD_HASH}]}, "contains ':'"),
    ("duplicate", {"users": [{"username": "a", "password_hash": GOOD_HASH}] * 2}, "twice"),
    ("extra-key", {"users": [{"username": "a", "password_hash": GOOD_HASH, "role": "x"}]}, "exactly the keys"),
    ("empty-name", {"users": [{"username": "", "password_hash": GOOD_HASH}]}, "non-empty string"),
]


@pytest.mark.parametrize(("users_data", "message"), [pytest.param(d, m, id=i) for i, d, m in BAD_USERS])
def test_users_file_errors(tmp_path: Path, users_data: Any, message: str) -> None:
    config = write_users_config(tmp_path, users_data)
    data = yaml.safe_load(config.read_text())
    with pytest.raises(ConfigError) as err:
        FrontBroker(parse_config(data, tmp_path))
    assert "users_file" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("username", ["project", "project:team1", "device", "device:team1", "alice@team1:x", "a:b"])
def test_users_file_refuses_usernames_that_own_other_client_ids(tmp_path: Path, username: str) -> None:
    """`<username>:` prefixes the client ids a user may take: a name that is a prefix of another identity's
    (`project`, `project:team1`) would own that identity's ids, so such names are refused at load."""
    path = write_users_file(tmp_path / "users.yaml", ["project:team1:p1", username])
    with pytest.raises(ConfigError, match=r"users\.1\.username"):
        load_users(path)

"""The in-process front broker of the tests: its users, its port, and the small facts tests share about it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from broker.server import FrontBroker

# Test users: bcrypt cost 4 keeps the suite fast; the format is the same as FlowFuse's.
PASSWORD = "s3cret-pass"
USERS = [
    "project:team1:p1",
    "project:team1:p2",
    "project:team2:p3",
    "project:team10:p4",
    "device:team1:d1",
    "alice@team1",
    "bob@team2",
    "forge_platform",
    "plainuser",
]

FrontFactory = Callable[..., Any]  # the make_front fixture: await make_front(**config_sections) -> FrontBroker

VERSIONS = [pytest.param(False, id="v311"), pytest.param(True, id="v5")]  # parametrize a `v5: bool`


def uid() -> str:
    """A short random name part (client identifiers, topics)."""
    return uuid.uuid4().hex[:10]


def front_port(front: FrontBroker, name: str = "mqtt") -> int:
    return front.bound[name][1]


def connack_code(v5: bool, *, v5_code: int, v3_code: int) -> int:
    return v5_code if v5 else v3_code


def write_users_file(path: Path, usernames: list[str] = USERS, password: str = PASSWORD) -> Path:
    """A users file (bcrypt cost 4) in which every user has ``password``."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(yaml.safe_dump({"users": [{"username": u, "password_hash": hashed} for u in usernames]}))
    return path


GOOD_HASH = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode()  # a valid bcrypt hash (of "x")


def write_config(folder: Path, name: str = "front.yaml", **sections: Any) -> Path:
    """A configuration file ``folder/name``: a tcp listener "mqtt" on 127.0.0.1:0 unless ``listeners`` is given."""
    data: dict[str, Any] = {"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}], **sections}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def write_users_config(folder: Path, users_data: Any) -> Path:
    """``folder/users.yaml`` with ``users_data`` as is, and ``folder/config.yaml`` that loads it."""
    (folder / "users.yaml").write_text(yaml.safe_dump(users_data))
    return write_config(
        folder,
        "config.yaml",
        listeners=[{"name": "mqtt", "type": "tcp", "bind": "127.0.0.1:0"}],
        upstream={"url": "mqtt://127.0.0.1:1"},
        auth={"users_file": "users.yaml"},
    )

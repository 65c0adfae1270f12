"""`mqtt-front passwd` (hashes and generated tokens) and `mqtt-front check` on users files, as subprocesses."""

from __future__ import annotations

import re
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.support.cli import run_cli
from tests.support.front import GOOD_HASH, write_users_config

# -- mqtt-front passwd --------------------------------------------------------------------------------


def test_passwd_hashes_stdin() -> None:
    result = run_cli("passwd", "--cost", "4", stdin="my pass word\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$2b$04$") and len(hashed) == 60
    assert bcrypt.checkpw(b"my pass word", hashed.encode())
    assert not bcrypt.checkpw(b"my pass word\n", hashed.encode())


def test_passwd_default_cost_is_flowfuse_10() -> None:
    result = run_cli("passwd", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("$2b$10$")


def test_passwd_refuses_empty_password() -> None:
    result = run_cli("passwd", "--cost", "4", stdin="\n")
    assert result.returncode == 1
    assert "empty password" in result.stderr
    assert "$2b$" not in result.stdout


@pytest.mark.parametrize(("kind", "prefix"), [("project", "ffbp_"), ("device", "ffbd_"), ("platform", "ffbpl_")])
def test_passwd_generate_token(kind: str, prefix: str) -> None:
    result = run_cli("passwd", "--generate", kind, "--cost", "4")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    token, hashed = fields["token"], fields["password_hash"]
    assert re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_-]{43}", token), token
    assert hashed.startswith("$2b$04$")
    assert bcrypt.checkpw(token.encode(), hashed.encode())


# -- mqtt-front check ---------------------------------------------------------------------------------


def test_check_command_names_users_file(tmp_path: Path) -> None:
    bad = write_users_config(tmp_path, {"users": [{"username": "anonymous", "password_hash": GOOD_HASH}]})
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert "users_file" in result.stderr and "reserved" in result.stderr
    assert "Traceback" not in result.stderr

    missing = tmp_path / "missing.yaml"
    config = tmp_path / "config2.yaml"
    config.write_text(yaml.safe_dump({"listeners": [{"name": "mqtt", "bind": "127.0.0.1:0"}],
                                      "auth": {"users_file": str(missing)}}))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    assert "users_file" in result.stderr and "Traceback" not in result.stderr

    good = write_users_config(tmp_path, {"users": [{"username": "project:team1:p1", "password_hash": GOOD_HASH}]})
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "1 users" in result.stdout

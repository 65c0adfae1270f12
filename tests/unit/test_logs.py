"""Log formatting: quoted text lines, the JSON formatter's fields, the deny limiter's bucket (the events
a running front broker logs: tests/e2e/test_log_events.py)."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from broker.cli import setup_logging
from broker.logs import log_event
from broker.session.audit import DenyLogLimiter


def test_text_lines_quote_what_clients_choose() -> None:
    logger = logging.getLogger("mqtt_front.test_logs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, logging.INFO, "deny", action="publish", topic='a b\nforged=1 "x"', n=3, t=0.5, skip=None)
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert line == 'deny action=publish topic="a b\\nforged=1 \\"x\\"" n=3 t=0.500\n'


def test_json_formatter_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    try:
        logger = logging.getLogger("mqtt_front.test_logs")
        log_event(logger, logging.WARNING, "config_reloaded", path="/etc/x.yaml", msg="not a reserved override")
        logger.info("plain message %d", 7)
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "config_reloaded" and lines[0]["path"] == "/etc/x.yaml"
    assert lines[0]["level"] == "warning" and lines[0]["msg"].startswith("config_reloaded ")
    assert lines[1]["msg"] == "plain message 7" and "event" not in lines[1]


def test_deny_limiter_bucket() -> None:
    limiter = DenyLogLimiter(burst=3, rate=1000.0)
    assert [limiter.allow() for _ in range(3)] == [True] * 3
    limiter = DenyLogLimiter(burst=2, rate=0.001)
    assert [limiter.allow() for _ in range(5)] == [True, True, False, False, False]
    assert limiter.take_suppressed() == 3 and limiter.take_suppressed() == 0
    time.sleep(0)

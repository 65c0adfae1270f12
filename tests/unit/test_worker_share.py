"""``--workers N``: the bound on requests to the platform is the process's, split between its workers."""

from __future__ import annotations

import pytest

from broker.config import parse_config
from broker.reload import worker_share as _worker_share

BASE = {
    "listeners": [{"name": "m", "type": "tcp", "bind": "127.0.0.1:1883"}],
    "upstream": {"url": "mqtt://127.0.0.1:1884"},
}


def _config(max_concurrency: int | None) -> dict[str, object]:
    auth: dict[str, object] = {"allow_anonymous": True}
    if max_concurrency is not None:
        auth["http"] = {"auth_url": "http://127.0.0.1:3000/auth", "max_concurrency": max_concurrency}
    return {**BASE, "auth": auth}


@pytest.mark.parametrize(("total", "workers", "each"), [(64, 2, 32), (65, 2, 33), (1, 4, 1), (10, 3, 4)])
def test_each_worker_gets_its_share_rounded_up(total: int, workers: int, each: int) -> None:
    config = parse_config(_config(total))
    shared = _worker_share(config, workers)
    assert shared.auth.http is not None and shared.auth.http.max_concurrency == each
    assert config.auth.http is not None and config.auth.http.max_concurrency == total  # the original is untouched
    assert shared.auth.http.auth_url == config.auth.http.auth_url


def test_without_a_platform_the_config_is_unchanged() -> None:
    config = parse_config(_config(None))
    assert _worker_share(config, 2) is config

"""The architecture checks of `make lint` (tools/check_architecture.py, import-linter's contracts) catch breakage.

Each case writes a small fake project that keeps every rule, checks that it passes, breaks one rule and
expects the check to fail naming the problem. No sockets, no event loop: only subprocesses on temporary trees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from textwrap import dedent

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "tools" / "check_architecture.py"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"  # the venv's, next to the python running pytest

# A tree that keeps every rule: one module per layer, imports only downwards, a 500-line module (the limit),
# log lines that look nothing like events, and log_event for the one event.
CLEAN_TREE = {
    "broker/__init__.py": '"""Fake mqtt-front."""\n\n__version__ = "0"\n',
    "broker/cli.py": "from broker import __version__\nfrom broker.server import serve\n",
    "broker/server.py": dedent(
        """\
        import logging

        from broker import relay
        from broker.config import Config
        from broker.edge import listeners
        from broker.logs import log_event
        from broker.ops import metrics

        log = logging.getLogger(__name__)


        def serve() -> None:
            log.info("listening on %s port %d", "::", 1883)
            log.warning("protocol error from %s: %s", "peer", "bad")
            log_event(log, logging.INFO, "ready", port=1883)
        """
    ),
    "broker/ops/__init__.py": "",
    "broker/ops/metrics.py": "import time\n",
    "broker/edge/__init__.py": "",
    "broker/edge/listeners.py": "import asyncio\n\nfrom broker import relay\nfrom broker.upstream import connector\n",
    "broker/relay.py": "import asyncio\n\nfrom broker.session import Session\n",
    "broker/upstream/__init__.py": "",
    "broker/upstream/connector.py": "import ssl\n\nfrom broker.mqtt import packets\n",
    "broker/auth/__init__.py": "",
    "broker/auth/users.py": "import acl\nfrom broker.logs import log_event\n",
    "broker/session/__init__.py": "from broker.session.core import Session\n",
    "broker/session/core.py": dedent(
        """\
        from typing import TYPE_CHECKING

        import acl
        from broker import logs
        from broker.config import Config
        from broker.mqtt import packets

        if TYPE_CHECKING:
            from broker.mqtt.topics import Topic
        """
    ),
    "broker/logs.py": "import logging\n\nfrom broker.mqtt import packets\n",
    "broker/config.py": "from broker.mqtt.topics import validate\n",
    "broker/mqtt/__init__.py": "",
    "broker/mqtt/packets.py": "import struct\n\nfrom . import topics\n",
    "broker/mqtt/topics.py": "x = 0\n" * 500,
    "acl/__init__.py": "from acl.engine import Engine\n",
    "acl/engine.py": "import re\n\nfrom .topics import match\n",
    "acl/topics.py": "import fnmatch\n",
}


def write_tree(root: Path) -> None:
    for rel, text in CLEAN_TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def append(root: Path, rel: str, text: str) -> int:
    """Append text to a file (created if missing); return the line number of its first line."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text() if path.exists() else ""
    path.write_text(before + text)
    return len(before.splitlines()) + 1


def run_checker(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECKER), str(root)], capture_output=True, text=True, timeout=60, check=False
    )


def test_real_tree_keeps_the_architecture() -> None:
    result = run_checker(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_clean_fake_tree_passes(tmp_path: Path) -> None:
    write_tree(tmp_path)
    result = run_checker(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "architecture check: ok"


def _cycle(root: Path) -> str:
    stats = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .core import Session\n"
    append(root, "broker/session/stats.py", stats)
    append(root, "broker/session/core.py", "from broker.session import stats\n")  # a submodule: counts as stats
    return "import cycle: broker.session.core -> broker.session.stats -> broker.session.core"


def _upward(root: Path) -> str:
    text = "\n\ndef f() -> None:\n    from broker.ops.metrics import REGISTRY, count\n"  # one problem, not two
    line = append(root, "broker/session/core.py", text)
    return (
        f"broker/session/core.py:{line + 3}: broker.session.core imports broker.ops.metrics:"
        " layer broker.ops is above broker.session"
    )


def _upward_relative_from_init(root: Path) -> str:
    line = append(root, "broker/mqtt/__init__.py", "from .. import logs\n")
    return f"broker/mqtt/__init__.py:{line}: broker.mqtt imports broker.logs: layer broker.logs is above broker.mqtt"


def _sibling(root: Path) -> str:
    line = append(root, "broker/auth/users.py", "from broker.upstream.connector import connect\n")
    return (
        f"broker/auth/users.py:{line}: broker.auth.users imports broker.upstream.connector:"
        " broker.auth and broker.upstream are independent"
    )


def _acl_imports_broker(root: Path) -> str:
    line = append(root, "acl/engine.py", "from broker.mqtt.topics import validate\n")
    return f"acl/engine.py:{line}: acl.engine imports broker.mqtt.topics: acl is its own pure package"


def _asyncio_in_session(root: Path) -> str:
    line = append(root, "broker/session/core.py", "import asyncio\n")
    return f"broker/session/core.py:{line}: broker.session.core imports asyncio:"


def _http_in_mqtt(root: Path) -> str:
    line = append(root, "broker/mqtt/packets.py", "if True:\n    import http.client\n")
    return f"broker/mqtt/packets.py:{line + 1}: broker.mqtt.packets imports http.client:"


def _long_module(root: Path) -> str:
    append(root, "broker/mqtt/big.py", "x = 0\n" * 501)
    return "broker/mqtt/big.py: 501 lines, over the 500-line limit"


def _event_percent(root: Path) -> str:
    line = append(root, "broker/server.py", 'log.info("tls_refused listener=%s reason=%s", "l", "r")\n')
    return f"broker/server.py:{line}: hand-formatted event log line 'tls_refused listener=%s reason=%s'"


def _event_fstring(root: Path) -> str:
    line = append(root, "broker/server.py", 'log.warning(f"websocket_refused peer={1} status=403")\n')
    return f"broker/server.py:{line}: hand-formatted event log line 'websocket_refused peer='"


def _event_log_level(root: Path) -> str:
    line = append(root, "broker/edge/listeners.py", 'logger.log(20, "connect client_id=%s", "c")\n')
    return f"broker/edge/listeners.py:{line}: hand-formatted event log line 'connect client_id=%s'"


def _module_in_no_layer(root: Path) -> str:
    append(root, "broker/misc.py", "")
    return "broker/misc.py: broker.misc is in no layer"


@pytest.mark.parametrize(
    "breakage",
    [
        _cycle,
        _upward,
        _upward_relative_from_init,
        _sibling,
        _acl_imports_broker,
        _asyncio_in_session,
        _http_in_mqtt,
        _long_module,
        _event_percent,
        _event_fstring,
        _event_log_level,
        _module_in_no_layer,
    ],
)
def test_checker_names_the_broken_rule(tmp_path: Path, breakage: Callable[[Path], str]) -> None:
    write_tree(tmp_path)
    expected = breakage(tmp_path)
    result = run_checker(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = result.stdout.splitlines()
    assert len(problems) == 1 and problems[0].startswith(expected), result.stdout


def run_lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # cwd and PYTHONPATH make grimp find the fake tree's packages, not the installed (editable) project.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lint_imports_tree(root: Path) -> None:
    """The fake tree, checked against the contracts of the real pyproject.toml."""
    write_tree(root)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")


def test_import_linter_keeps_the_clean_fake_tree(tmp_path: Path) -> None:
    lint_imports_tree(tmp_path)
    result = run_lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        (
            "broker/session/core.py",
            "\n\ndef f() -> None:\n    from broker.ops.metrics import REGISTRY\n",
            "broker.session is not allowed to import broker.ops",
        ),
        (
            "broker/mqtt/packets.py",
            "\nif TYPE_CHECKING:\n    from broker.session import Session\n",
            "broker.mqtt is not allowed to import broker.session",
        ),
        (
            "broker/auth/users.py",
            "from broker.upstream.connector import connect\n",
            "broker.auth is not allowed to import broker.upstream",
        ),
        ("acl/engine.py", "import broker.mqtt\n", "acl is not allowed to import broker"),
        ("broker/session/core.py", "import asyncio\n", "broker.session is not allowed to import asyncio"),
    ],
)
def test_import_linter_fails_on_breakage(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    lint_imports_tree(tmp_path)
    append(tmp_path, rel, text)
    result = run_lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout

"""The ``mqtt-front`` command: run, check, passwd, acl explain.

The parser, ``run`` and ``passwd`` live here; ``check`` (and ``--probe``) in :mod:`broker.cli_check`, ``acl explain``
in :mod:`broker.cli_explain`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Sequence

from broker import __version__
from broker.config import Config, ConfigError, load_config
from broker.logs import JsonFormatter, log_event

log = logging.getLogger("mqtt_front")


_JsonFormatter = JsonFormatter  # JSON lines with the event fields (broker.logs.log_event)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def _serve(config: Config, reuse_port: bool = False, ops_socket: str | None = None) -> None:
    from broker.server import FrontBroker

    front = FrontBroker(config, reuse_port=reuse_port, ops_socket=ops_socket)
    await front.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, front.reload)  # reload TLS certificates; connections stay
    log_event(log, logging.INFO, "ready", version=__version__, pid=os.getpid())
    await stop.wait()
    log.info("stopping")
    await front.stop()


def _raise_fd_limit() -> None:
    # Every client costs two sockets (client + upstream): use all the descriptors we may.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run_loop(config: Config, reuse_port: bool, ops_socket: str | None = None) -> int:
    """One event loop (uvloop when installed) serving until SIGINT/SIGTERM."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    log.info("event loop: %s", "uvloop" if loop_factory is not None else "asyncio")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(config, reuse_port, ops_socket))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from broker.ops.workers import resolve_workers, run_workers

    config = _load(args.config)
    setup_logging(config.logging.level, config.logging.format)
    try:
        workers = resolve_workers(args.workers)
    except ValueError as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return 1
    if workers > 1 and config.upstream is None:
        print("mqtt-front: --workers > 1 needs an upstream (the embedded broker lives in one process)", file=sys.stderr)
        return 1
    _raise_fd_limit()
    if workers == 1:
        return _run_loop(config, reuse_port=False)
    if config.metrics is None or config.metrics.host_port is None:
        return run_workers(workers, lambda index: _run_loop(config, reuse_port=True))
    # Metrics from all workers served as one: each worker answers on a unix socket, this
    # process serves metrics.bind from all of them.
    from broker.ops.workers import serve_worker_metrics

    with tempfile.TemporaryDirectory(prefix="mqtt-front-") as run_dir:
        sockets = [os.path.join(run_dir, f"worker-{i}.sock") for i in range(workers)]
        try:
            stop_metrics = serve_worker_metrics(config.metrics.host_port, sockets)
        except OSError as exc:
            print(f"mqtt-front: cannot listen on metrics.bind: {exc.strerror or exc}", file=sys.stderr)
            return 1
        try:
            return run_workers(workers, lambda index: _run_loop(config, reuse_port=True, ops_socket=sockets[index]))
        finally:
            stop_metrics()


def cmd_check(args: argparse.Namespace) -> int:
    from broker.cli_check import check

    return check(_load(args.config), args.config, probe=args.probe)


def cmd_passwd(args: argparse.Namespace) -> int:
    from broker.auth.users import generate_token, hash_password

    if args.generate:
        password = generate_token(args.generate)
        print(f"token: {password}")
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mqtt-front: empty password", file=sys.stderr)
        return 1
    hashed = hash_password(password, args.cost)
    print(f"password_hash: {hashed}" if args.generate else hashed)
    return 0


def cmd_acl_explain(args: argparse.Namespace) -> int:
    from broker.cli_explain import explain

    return explain(_load(args.config), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqtt-front", description="MQTT front broker with team-scoped ACLs")
    parser.add_argument("--version", action="version", version=f"mqtt-front {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the front broker")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument(
        "--workers",
        default="1",
        help="worker processes sharing the listeners (SO_REUSEPORT); 'auto' = one per CPU (default 1)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a configuration and print what would listen where")
    check.add_argument("-c", "--config", required=True)
    check.add_argument(
        "--probe",
        action="store_true",
        help="also send one request to auth.http's auth_url and acl_url (a harmless unknown identity); exit 2 if "
        "the platform cannot be used",
    )
    check.set_defaults(func=cmd_check)

    passwd = sub.add_parser("passwd", help="hash a password read from stdin (for auth.users_file)")
    passwd.add_argument("--generate", choices=["project", "device", "platform"], help="generate a FlowFuse-style token")
    passwd.add_argument("--cost", type=int, default=10, help="bcrypt cost (FlowFuse uses 10)")
    passwd.set_defaults(func=cmd_passwd)

    acl = sub.add_parser("acl", help="access-control tools")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True)
    explain = acl_sub.add_parser(
        "explain",
        help="show whether a user may publish/subscribe/receive, which rule (or the platform) decides, and the "
        "upstream topic under a mountpoint (exit 0 allow, 2 deny, 3 the platform decides but was not asked)",
    )
    explain.add_argument("-c", "--config", required=True)
    explain.add_argument("--user", default="", help="MQTT username (empty = anonymous)")
    explain.add_argument("--client-id", default=None, help="the client id (default: the username)")
    group = explain.add_mutually_exclusive_group(required=True)
    group.add_argument("--publish", metavar="TOPIC")
    group.add_argument("--subscribe", metavar="FILTER")
    group.add_argument("--receive", metavar="TOPIC", help="a delivery of a message published on TOPIC")
    explain.add_argument("--retain", action="store_true", help="with --publish: a retained message")
    explain.add_argument(
        "--ask-platform",
        action="store_true",
        help="with acl.source: http, send the check to auth.http.acl_url and print the answer",
    )
    explain.add_argument(
        "--mountpoint",
        metavar="M",
        help="the session's mountpoint (e.g. ff/v1/<team>/c/), as the platform's login answer would set it",
    )
    explain.set_defaults(func=cmd_acl_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        code: int = args.func(args)
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())

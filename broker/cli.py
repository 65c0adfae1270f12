"""The ``mqtt-front`` command: run, check, schema, passwd, acl explain, ctl, reload.

The parser, ``run`` and ``passwd`` live here; ``check`` (and ``--probe``) in :mod:`broker.cli_check`, ``acl explain``
in :mod:`broker.cli_explain`, ``ctl`` and ``reload`` (the admin API, or a pid file) in :mod:`broker.cli_ctl`,
``users`` (the users file edited in place) in :mod:`broker.cli_users`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import logging
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Sequence

from broker import __version__
from broker.cli_users import add_users_parser, bcrypt_cost
from broker.config import Config, ConfigError, load_config, parse_hostport
from broker.logs import JsonFormatter, log_event
from broker.reload import worker_share
from broker.shared_counts import WorkerCounts

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


async def _serve(
    config: Config,
    reuse_port: bool = False,
    ops_socket: str | None = None,
    config_path: str | None = None,
    admin_socket: str | None = None,
    pid_file: str | None = None,
    workers: int = 1,
    counts: WorkerCounts | None = None,
) -> None:
    from broker.server import FrontBroker

    front = FrontBroker(
        config,
        reuse_port=reuse_port,
        ops_socket=ops_socket,
        config_path=config_path,
        admin_socket=admin_socket,
        workers=workers,
        counts=counts,
    )
    # A SIGINT/SIGTERM while starting stops us right after the start (it used to kill the process
    # between opening the listeners and installing the handlers).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await front.start()
    # Everything loaded so far (modules, config, compiled rules) lives as long as the process: move it out
    # of the collector's sight, so that a full collection walks only what sessions allocate (it walked
    # every import before: 20-30 ms pauses of the loop under load).
    gc.collect()
    gc.freeze()
    reloads: set[asyncio.Task[dict[str, object]]] = set()

    def reload() -> None:  # the whole configuration; connections stay and get the new rights
        task = loop.create_task(front.control.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if pid_file is not None:  # written once SIGHUP reloads: a reload through the pid file cannot kill us
        from broker.ops.pidfile import write_pid_file

        try:
            write_pid_file(pid_file)
        except OSError as exc:
            await front.stop()
            raise ConfigError(f"cannot write --pid-file {pid_file}: {exc.strerror or exc}") from None
    ready, why = await front.readiness.check()  # the upstream probed once: a dead one is said at once
    if ready:
        log_event(log, logging.INFO, "ready", version=__version__, pid=os.getpid())
    else:
        log_event(log, logging.WARNING, "not_ready", version=__version__, pid=os.getpid(), reason=why)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one during the drain ends it at once
        loop.add_signal_handler(sig, front.hurry_drain)
    await front.drain()  # within limits.shutdown_timeout (README "Stopping: the drain")


def _raise_fd_limit() -> None:
    # Every client costs two sockets (client + upstream): use all the descriptors we may.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run_loop(
    config: Config,
    reuse_port: bool,
    ops_socket: str | None = None,
    config_path: str | None = None,
    admin_socket: str | None = None,
    pid_file: str | None = None,
    workers: int = 1,
    counts: WorkerCounts | None = None,
) -> int:
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
            runner.run(_serve(config, reuse_port, ops_socket, config_path, admin_socket, pid_file, workers, counts))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from broker.ops.workers import resolve_workers

    config = _load(args.config)
    setup_logging(config.logging.level, config.logging.format)
    try:
        workers = resolve_workers(args.workers)
    except ValueError as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return 1
    if workers > 1 and (config.upstream is None or config.upstream.embedded):
        print("mqtt-front: --workers > 1 needs an upstream (the embedded broker lives in one process)", file=sys.stderr)
        return 1
    if config.admin is not None:
        from broker.ops.admin_access import admin_token

        try:
            admin_token(config.admin)  # an unreadable or empty admin.token_file stops us before anything starts
        except ConfigError as exc:
            print(f"mqtt-front: {exc}", file=sys.stderr)
            return 1
    pid_file = args.pid_file
    if pid_file is not None and not _pid_file_writable(pid_file):
        print(f"mqtt-front: --pid-file {pid_file}: its directory does not exist or is not writable", file=sys.stderr)
        return 1
    _raise_fd_limit()
    try:
        if workers == 1:
            return _run_loop(config, reuse_port=False, config_path=args.config, pid_file=pid_file)
        return _run_workers(worker_share(config, workers), workers, args.config, pid_file)
    finally:
        if pid_file is not None:
            from broker.ops.pidfile import remove_pid_file

            remove_pid_file(pid_file)


def _pid_file_writable(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def _run_workers(config: Config, workers: int, config_path: str, pid_file: str | None) -> int:
    from broker.ops.workers import run_workers
    from broker.shared_counts import SharedCounts

    # The caps' counts all workers share (README "Deploying"); made before the fork, attached in each worker.
    shared = SharedCounts(workers)

    def freed(index: int) -> None:  # a dead worker's connections and queued checks no longer count
        held = shared.free_worker(index)
        if held:
            log.info("worker %d held %d counted connections and checks: released", index, held)

    def started() -> None:  # every worker forked and SIGHUP forwarded to them: the moment for the pid file
        if pid_file is not None:
            from broker.ops.pidfile import write_pid_file

            try:
                write_pid_file(pid_file)
            except OSError as exc:
                log.error("cannot write --pid-file %s: %s", pid_file, exc.strerror or exc)

    metrics = config.metrics.host_port if config.metrics is not None else None
    admin = config.admin
    if metrics is None and admin is None:
        return run_workers(
            workers,
            lambda index: _run_loop(
                config, reuse_port=True, config_path=config_path, workers=workers, counts=shared.attach(index)
            ),
            started,
            shutdown_timeout=config.limits.shutdown_timeout,
            on_death=freed,
        )
    # Metrics and the admin API of all workers served as one: each worker answers on unix sockets,
    # this process serves metrics.bind and admin.bind from all of them.
    from broker.ops.admin_access import admin_token
    from broker.ops.workers import serve_worker_admin, serve_worker_metrics

    with contextlib.ExitStack() as stack:
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mqtt-front-"))
        ops_sockets: list[str | None] = [None] * workers
        admin_sockets: list[str | None] = [None] * workers
        key = "metrics.bind"
        try:
            if metrics is not None:
                sockets = [os.path.join(run_dir, f"worker-{i}.sock") for i in range(workers)]
                stack.callback(serve_worker_metrics(metrics, sockets))
                ops_sockets = list(sockets)
            if admin is not None:
                key = "admin.bind"
                sockets = [os.path.join(run_dir, f"worker-{i}-admin.sock") for i in range(workers)]
                timeout = config.limits.shutdown_timeout
                stack.callback(serve_worker_admin(parse_hostport(admin.bind), sockets, admin_token(admin), timeout))
                admin_sockets = list(sockets)
        except OSError as exc:
            from broker.edge.listeners import bind_reason

            print(f"mqtt-front: cannot listen on {key}: {bind_reason(exc)}", file=sys.stderr)
            return 1
        return run_workers(
            workers,
            lambda index: _run_loop(
                config,
                True,
                ops_sockets[index],
                config_path,
                admin_socket=admin_sockets[index],
                workers=workers,
                counts=shared.attach(index),
            ),
            started,
            shutdown_timeout=config.limits.shutdown_timeout,
            on_death=freed,
        )


def cmd_check(args: argparse.Namespace) -> int:
    from broker.cli_check import check

    return check(_load(args.config), args.config, probe=args.probe)


def cmd_schema(args: argparse.Namespace) -> int:
    """The configuration's JSON Schema, for editors (yaml-language-server's ``# yaml-language-server: $schema=``)."""
    import json

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}
    print(json.dumps(schema, indent=2))
    return 0


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


def cmd_ctl(args: argparse.Namespace) -> int:
    from broker.cli_ctl import ctl

    return ctl(args)


def cmd_reload(args: argparse.Namespace) -> int:
    from broker.cli_ctl import reload

    return reload(args)


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
    run.add_argument(
        "--pid-file", metavar="PATH", help="write the pid here once serving (removed at exit), for mqtt-front reload"
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

    schema = sub.add_parser("schema", help="print the configuration's JSON Schema (for editors and CI checks)")
    schema.set_defaults(func=cmd_schema)

    passwd = sub.add_parser("passwd", help="hash a password read from stdin (for auth.users_file)")
    passwd.add_argument("--generate", choices=["project", "device", "platform"], help="generate a FlowFuse-style token")
    passwd.add_argument("--cost", type=bcrypt_cost, default=10, help="bcrypt cost 4..31 (FlowFuse uses 10)")
    passwd.set_defaults(func=cmd_passwd)
    add_users_parser(sub)

    acl = sub.add_parser("acl", help="access-control tools")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True)
    explain = acl_sub.add_parser(
        "explain",
        help="show whether run would accept the CONNECT (login, client id, will) and let it publish/subscribe/"
        "receive, which rule (or the platform) decides, and the upstream topic under a mountpoint (exit 0 allow, "
        "2 deny or CONNECT refused, 3 the platform decides but was not asked)",
    )
    explain.add_argument("-c", "--config", required=True)
    explain.add_argument("--user", default="", help="MQTT username (empty = anonymous)")
    explain.add_argument("--client-id", default=None, help="the client id (default: the username)")
    group = explain.add_mutually_exclusive_group(required=True)
    group.add_argument("--publish", metavar="TOPIC")
    group.add_argument("--subscribe", metavar="FILTER")
    group.add_argument("--receive", metavar="TOPIC", help="a delivery of a message published on TOPIC")
    explain.add_argument("--retain", action="store_true", help="with --publish: a retained message")
    explain.add_argument("--will", metavar="TOPIC", help="the CONNECT carries a will on TOPIC: is it allowed?")
    explain.add_argument("--will-retain", action="store_true", help="with --will: a retained will")
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
    _add_ctl_parsers(sub)
    return parser


def _add_ctl_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``ctl`` (the admin API, like ``emqx ctl``) and ``reload``."""
    ctl = sub.add_parser(
        "ctl",
        help="ask a running mqtt-front through its admin API (exit 0 done, 1 error, 2 not found)",
        description="The URL and token come from the configuration's admin section unless given.",
    )
    where = ctl.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="YAML configuration file with an admin section")
    where.add_argument("--url", help="the admin API's base URL, e.g. http://127.0.0.1:9200")
    token = ctl.add_mutually_exclusive_group()
    token.add_argument("--token", help="the bearer token (visible to other users in ps: prefer --token-file)")
    token.add_argument("--token-file", metavar="FILE", help="a file whose first line is the bearer token")
    ctl_sub = ctl.add_subparsers(dest="ctl_command", required=True)
    clients = ctl_sub.add_parser("clients", help="list the connected clients")
    clients.add_argument("--team")
    clients.add_argument("--username")
    clients.add_argument("--listener")
    clients.add_argument("--json", action="store_true", help="JSON instead of a table")
    client = ctl_sub.add_parser("client", help="one client: identity, peer, protocol, subscriptions")
    client.add_argument("client_id", metavar="ID")
    client.add_argument("--json", action="store_true")
    kick = ctl_sub.add_parser("kick", help="disconnect a client (DISCONNECT 0x98 administrative action)")
    kick.add_argument("client_id", metavar="ID")
    revoke = ctl_sub.add_parser("revoke", help="disconnect every session of a username or a team, drop its cache")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--username")
    target.add_argument("--team")
    topics = ctl_sub.add_parser("topics", help="a team's topic inventory")
    topics.add_argument("team", metavar="TEAM")
    topics.add_argument("--json", action="store_true")
    reload_ = ctl_sub.add_parser("reload", help="reload the configuration (POST /api/v1/reload)")
    reload_.add_argument("--json", action="store_true")
    ctl_sub.add_parser(
        "drain", help="stop as on SIGTERM: no new connections, the sessions finish, then exit (POST /api/v1/drain)"
    )
    ctl.set_defaults(func=cmd_ctl)

    reload = sub.add_parser(
        "reload",
        help="reload a running mqtt-front: through the admin API when the config has one, else SIGHUP to the pid "
        "in --pid-file (exit 0 done, 1 error)",
    )
    reload.add_argument("-c", "--config", help="the YAML configuration file it runs")
    reload.add_argument("--pid-file", metavar="PATH", help="the file run --pid-file PATH writes")
    reload.set_defaults(func=cmd_reload)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        code: int = args.func(args)
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())

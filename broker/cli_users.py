"""``mqtt-front users add|set|remove|list -f FILE [USER]``: a users file edited in place, like ``mosquitto_passwd``.

The password comes from the first line of stdin (``--stdin``, or whenever stdin is not a terminal), from a
prompt asked twice (getpass: not echoed), or is a generated FlowFuse-style token (``--generate project``)
printed once on stdout as ``token: ...``; only its bcrypt hash is stored. The file is rewritten atomically in
the shape the broker loads (:func:`broker.auth.users.write_users`), so a running broker reloading at that
moment sees the old users or the new ones; it picks the change up on ``mqtt-front reload`` or SIGHUP.
Hashes are never printed. Usernames the broker would refuse (``anonymous``, the FlowFuse form heads, unknown
``:`` forms) are refused here too.

Exit codes: 0 done, 1 an error (the file, the user, the password), 2 a usage error (argparse).
It owns the ``users`` subcommand and the ``--cost`` check ``passwd`` shares; it must not touch a running broker.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from acl.identity import IdentityKind, parse_identity
from broker.auth.users import (
    DEFAULT_COST,
    MAX_COST,
    MIN_COST,
    TOKEN_PREFIXES,
    generate_token,
    hash_password,
    load_users,
    username_problem,
    write_users,
)
from broker.config import ConfigError

EXIT_OK, EXIT_ERROR = 0, 1

NEW_FILE_HEADER = "# mqtt-front users file (auth.users_file); edit it with `mqtt-front users add|set|remove`.\n"
RELOAD_HINT = (
    "a running mqtt-front picks this up on reload: `mqtt-front reload -c <config>` (or `--pid-file PATH`), "
    "or `kill -HUP <pid>`"
)
# Which identity each generated token kind belongs to in FlowFuse (ffbp_ projects, ffbd_ devices, ffbpl_ the platform).
_TOKEN_KINDS = {"project": IdentityKind.PROJECT, "device": IdentityKind.DEVICE, "platform": IdentityKind.PLATFORM}


class UsersError(Exception):
    """A refusal with a one-line message (exit 1)."""


def bcrypt_cost(text: str) -> int:
    """``--cost``: a bcrypt cost the library accepts, or argparse's one-line usage error (exit 2)."""
    try:
        cost = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {MIN_COST} to {MAX_COST}, not {text!r}"
        ) from None
    if not MIN_COST <= cost <= MAX_COST:
        raise argparse.ArgumentTypeError(f"must be from {MIN_COST} to {MAX_COST} (bcrypt's range), not {cost}")
    return cost


def add_users_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``users`` subcommand and its four actions."""
    users = sub.add_parser(
        "users",
        help="add, change, remove or list the users of a users file, like mosquitto_passwd (exit 0 done, 1 error)",
        description="Edits auth.users_file in place (atomically); a running mqtt-front re-reads it on "
        "`mqtt-front reload` or SIGHUP. Hashes are never printed.",
    )
    actions = users.add_subparsers(dest="users_command", required=True)
    helps = {
        "add": "add a user (refused if it exists); creates the file (mode 0600) when it does not exist",
        "set": "change a user's password (refused if it does not exist, unless --create)",
        "remove": "remove a user (refused if it does not exist)",
        "list": "print the usernames, one per line",
    }
    for name, text in helps.items():
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("-f", "--file", required=True, metavar="USERS_FILE", help="the auth.users_file")
        if name != "list":
            action.add_argument("username", metavar="USER")
        if name in ("add", "set"):
            source = action.add_mutually_exclusive_group()
            source.add_argument(
                "--stdin",
                action="store_true",
                help="read the password from the first line of stdin (the default when stdin is not a terminal; "
                "else a prompt asks twice)",
            )
            source.add_argument(
                "--generate",
                choices=sorted(TOKEN_PREFIXES),
                help="generate a FlowFuse-style token (ffbp_, ffbd_, ffbpl_) as the password and print it once",
            )
            action.add_argument(
                "--cost", type=bcrypt_cost, default=DEFAULT_COST, help=f"bcrypt cost {MIN_COST}..{MAX_COST} (FlowFuse "
                f"uses {DEFAULT_COST})"
            )
        if name == "set":
            action.add_argument("--create", action="store_true", help="add the user when it does not exist")
        if name == "list":
            action.add_argument("-l", "--long", action="store_true", help="also the identity kind and team of each "
                                "username's form")
    users.set_defaults(func=cmd_users)


def cmd_users(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsersError, ConfigError) as exc:
        print(f"mqtt-front: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    command: str = args.users_command
    exists = path.exists()
    if command == "add" and not exists:
        users: dict[str, str] = {}
        header = NEW_FILE_HEADER
    else:
        if not exists:
            raise UsersError(f"{path}: no such users file" + (" ('users add' creates one)" if command != "add" else ""))
        users = {name: hashed.decode("ascii") for name, hashed in load_users(path).items()}
        header = _leading_comments(path)
    if command == "list":
        for name in users:
            print(_describe(name) if args.long else name)
        return EXIT_OK
    username: str = args.username
    _check_username(username)
    known = username in users
    if command == "add" and known:
        raise UsersError(f"{path}: user {username!r} already exists (`users set` changes its password)")
    if command in ("set", "remove") and not known and not (command == "set" and args.create):
        hint = " (`users set --create` adds it)" if command == "set" else ""
        raise UsersError(f"{path}: no user {username!r}{hint}")
    if command == "remove":
        del users[username]
        write_users(path, users, header)
        print(f"removed {username!r} from {path} ({_count(users)})")
    else:
        password = _password(args, username)
        users[username] = hash_password(password, args.cost)
        write_users(path, users, header)
        verb = "changed the password of {!r} in" if known else "added {!r} to"
        created = "" if exists else f", created with mode {os.stat(path).st_mode & 0o777:04o}"
        print(f"{verb.format(username)} {path} ({_count(users)}{created})")
    print(RELOAD_HINT)
    return EXIT_OK


def _check_username(username: str) -> None:
    if not username:
        raise UsersError("the username is empty")
    problem = username_problem(username)
    if problem is not None:
        raise UsersError(f"username {problem}: the broker would refuse it")


def _password(args: argparse.Namespace, username: str) -> str:
    if args.generate:
        kind = _TOKEN_KINDS[args.generate]
        actual = parse_identity(username).kind
        if actual is not kind:
            print(f"mqtt-front: note: FlowFuse gives {args.generate} tokens ({TOKEN_PREFIXES[args.generate]}...) to "
                  f"{kind.value} identities; {username!r} is a {actual.value}", file=sys.stderr)
        token = generate_token(args.generate)
        print(f"token: {token}")  # the only time it is shown: the file keeps its hash
        return token
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if password and getpass.getpass("password (again): ") != password:
            raise UsersError("the passwords do not match; nothing changed")
    if not password:
        raise UsersError("empty password; nothing changed")
    return password


def _leading_comments(path: Path) -> str:
    """The comment lines the file starts with, kept across rewrites (the rest is regenerated)."""
    kept = []
    with open(path, encoding="utf-8") as text:  # load_users read it already: it is UTF-8
        for line in text:
            if line.strip() and not line.lstrip().startswith("#"):
                break
            kept.append(line if line.endswith("\n") else line + "\n")
    return "".join(kept)


def _describe(username: str) -> str:
    identity = parse_identity(username)
    return f"{username}\t{identity.kind.value}\tteam={identity.team or '-'}"


def _count(users: dict[str, str]) -> str:
    return f"{len(users)} user{'' if len(users) == 1 else 's'}"

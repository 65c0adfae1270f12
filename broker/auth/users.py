"""Password authentication against a YAML users file of bcrypt hashes.

bcrypt is deliberately slow, so it runs in a thread pool (it releases the GIL) and
results are cached briefly, keyed by a SHA-256 of the credentials, never the password.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from acl.identity import FORM_HEADS, is_recognised
from broker.auth.fair_queue import FairQueue
from broker.config import ConfigError, safe_load
from broker.shared_counts import AUTH_PENDING, Counts, LocalCounts

log = logging.getLogger("mqtt_front.auth")

# Usernames that would own other identities' client ids under the prefix rule: anonymous clients' ids
# live under "anonymous:" upstream, and every structured form's ids start with its head ("project:",
# "device:", "mq:", "frontend:", "fe-team:", "expert-client:", "expert-agent:", "agent:").
RESERVED_USERNAMES: tuple[str, ...] = ("anonymous", *sorted(FORM_HEADS))

_FORMS_HELP = (
    "project:<team>:<project>, device:<team>:<device>, mq:hosted:<team>:<instance>, mq:remote:<team>:<device>,"
    " frontend:<team>:<device>, fe-team:<user>:<team>:<session>, expert-client:<user>:<session>,"
    " expert-agent:<name>:<version> or agent:<team>@<team>"
)


def username_problem(username: str) -> str | None:
    """Why a username cannot be allowed, or None.

    Client ids are bound to usernames (``acl.client_ids``): under the prefix rule a username ``u`` owns
    the id ``u`` and every ``u:<suffix>``; under the exact rule only ``u``. Two identities can then
    claim the same id only if one's username lies in the other's namespace (``v == u + ":" + s``),
    so no username that can authenticate may start with ``<another such username>:``. That holds if:

    - a ``:`` appears only in a recognised form (``acl.identity``). Such a name always lies in the
      namespace of the text before its first ``:`` (``a:b`` in ``a``'s), which would be an ordinary,
      allowed username; so unknown ``:`` forms are refused, whatever backend vouches for them.
    - every ``:``-prefix of a recognised form is refused: the heads (``project``, ``device``, ``mq``,
      ``frontend``, ``fe-team``, ``expert-client``, ``expert-agent``, ``agent``) are reserved names;
      longer prefixes (``project:<team>``, ``mq:hosted``, ``fe-team:<user>:<team>``, ...) contain
      ``:`` and match no form, so the first point refuses them.
    - no recognised username lies in another's namespace: each ``:`` form has a fixed head and a fixed
      number of non-empty parts without ``:``, so ``u:<suffix>`` never matches ``u``'s form or one
      with another head; ``<name>@<team>`` has no ``:`` at all (``a:b@t`` is no Team Broker client,
      or ``project:t1:p1`` could take over a client ``project:t1:p1:n@t2`` of team t2), and
      ``agent:<team>@<team>`` has exactly one.
    - ``anonymous`` is reserved, and nothing starting with ``anonymous:`` (the upstream namespace of
      anonymous clients' ids) can authenticate, by the first point.

    So every recognised form is safe under prefix as far as isolation goes. ``<name>@<team>`` (and
    ``agent:<team>@<team>``) still get exact by default: that is FlowFuse's rule, and it keeps one
    Team Broker credential to one session (the platform limits clients per team by credentials), unless
    ``acl.client_id_suffix`` opts in to prefix. A name that passes here is safe under either rule.
    """
    if username in RESERVED_USERNAMES:
        return f"{username!r} is reserved"
    if ":" in username and not is_recognised(username):
        return f"{username!r} contains ':' but is none of {_FORMS_HELP}"
    return None


# Token prefixes FlowFuse uses for generated credentials.
TOKEN_PREFIXES = {"project": "ffbp_", "device": "ffbd_", "platform": "ffbpl_"}



@functools.cache
def _dummy_hash() -> bytes:
    """Compared against when the user is unknown, so that timing does not reveal which names exist.

    Made once, when the first Authenticator is built (not at import: every ``mqtt-front`` command imports
    this module, and a cost-10 hash takes tens of milliseconds)."""
    return bcrypt.hashpw(b"not-a-real-password", bcrypt.gensalt(rounds=10))


# bcrypt only reads 72 bytes; FlowFuse (bcryptjs) truncates the same way, so longer
# passwords (Team Broker allows 128 characters) keep working.
BCRYPT_MAX = 72
# The bcrypt costs (log2 rounds) the library accepts; FlowFuse uses 10.
MIN_COST, MAX_COST, DEFAULT_COST = 4, 31, 10


def hash_password(password: str, rounds: int = DEFAULT_COST) -> str:
    """A bcrypt hash of ``password``; ValueError when ``rounds`` is outside MIN_COST..MAX_COST."""
    if not MIN_COST <= rounds <= MAX_COST:
        raise ValueError(f"bcrypt cost must be from {MIN_COST} to {MAX_COST}, not {rounds}")
    raw = password.encode("utf-8")[:BCRYPT_MAX]
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode("ascii")


def generate_token(kind: str) -> str:
    """A FlowFuse-style token: prefix + base64url of 32 random bytes."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return TOKEN_PREFIXES[kind] + raw


def load_users(path: Path) -> dict[str, bytes]:
    """``users: [{username, password_hash}]`` -> {username: hash}.

    Every username must pass :func:`username_problem`: a plain name, or one of the recognised forms
    (the structured ones may be given local passwords too, e.g. ``mq:hosted:<team>:<instance>``); a
    reserved name or an unknown ``:`` form makes the whole file invalid, naming the entry."""
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"auth.users_file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"auth.users_file: {path} is not UTF-8 text (a bad byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"auth.users_file: {path} is not valid YAML: {exc}") from None
    entries = data.get("users") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"auth.users_file: {path} must hold 'users: [{{username, password_hash}}]'")
    users: dict[str, bytes] = {}
    for i, entry in enumerate(entries):
        where = f"auth.users_file: {path}: users.{i}"
        if not isinstance(entry, dict) or set(entry) != {"username", "password_hash"}:
            raise ConfigError(f"{where}: needs exactly the keys username and password_hash")
        name, hashed = entry["username"], entry["password_hash"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.username: must be a non-empty string")
        problem = username_problem(name)
        if problem is not None:
            raise ConfigError(f"{where}.username: {problem}")
        if not isinstance(hashed, str) or not hashed.startswith(("$2b$", "$2a$", "$2y$")) or len(hashed) != 60:
            raise ConfigError(f"{where}.password_hash: not a bcrypt hash (make one with 'mqtt-front passwd')")
        if name in users:
            raise ConfigError(f"{where}.username: {name!r} appears twice")
        users[name] = hashed.encode("ascii")
    return users


def write_users(path: Path, users: Mapping[str, str], header: str = "") -> None:
    """Replace the users file with ``users`` ({username: bcrypt hash}) in the shape :func:`load_users` reads.

    Atomic, so that a reload (SIGHUP) at any moment reads the old file or the new one, never half of
    one: a temporary file in the same directory (a rename cannot cross file systems), written, checked
    with :func:`load_users`, fsynced, then ``os.replace``d over the file and the directory fsynced. The
    new file keeps the old one's mode and, where we may, its owner (a root editing the broker's file
    must not leave it unreadable to the broker); a new file gets 0600. A symlink stays a symlink: its
    target is replaced. ``header`` (comment lines) goes first. ConfigError (naming the path) on failure.
    """
    target = Path(os.path.realpath(path))
    body = yaml.safe_dump(
        {"users": [{"username": name, "password_hash": hashed} for name, hashed in users.items()]},
        sort_keys=False,
        allow_unicode=True,
    )
    try:
        old = os.stat(target)
        mode, owner = stat.S_IMODE(old.st_mode), (old.st_uid, old.st_gid)
    except FileNotFoundError:
        mode, owner = 0o600, None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(header + body)
            out.flush()
            os.fchmod(out.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(out.fileno(), *owner)
            os.fsync(out.fileno())
        load_users(Path(tmp))  # never replace a good file with one the broker would refuse
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not every file system lets us)
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@dataclass(slots=True)
class Verdict:
    ok: bool
    bad_credentials: bool  # False: refused for lack of credentials (not authorized)
    busy: bool = False  # not checked: too many password checks already queued


class Authenticator:
    def __init__(
        self,
        users: dict[str, bytes],
        allow_anonymous: bool,
        cache_ttl: float = 60.0,
        workers: int | None = None,
        max_pending: int = 1024,
        counts: Counts | None = None,
    ) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.cache_ttl = cache_ttl
        # bcrypt checks queued or running. A flood of connects (each costing ~75 ms of CPU at
        # cost 10) must not queue without bound: beyond this the answer is "server busy" at once.
        self.max_pending = max_pending
        # Checks queued or running: this process's, or (--workers N) all workers' through shared counts.
        self.counts: Counts = counts if counts is not None else LocalCounts()
        self._cache: dict[bytes, tuple[float, bool]] = {}
        # Checks in progress by key: [the hash checked against, the task, how many CONNECTs wait for it].
        self._running: dict[bytes, list[Any]] = {}
        self._pending_by_source: dict[str, int] = {}  # pending checks by source address (at most an eighth each)
        self._salt = secrets.token_bytes(16)  # cache keys are useless outside this process
        threads = workers or os.cpu_count() or 2
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bcrypt")
        self._queue = FairQueue(self._executor, threads)  # round robin per source address and username
        self._dummy = _dummy_hash()

    @property
    def pending(self) -> int:
        """Password checks queued or running (of all workers when the counts are shared)."""
        return self.counts.total(AUTH_PENDING)

    def replace_users(self, users: dict[str, bytes]) -> None:
        """New users file contents (SIGHUP); cached verdicts may be stale, so they go."""
        self.users = users
        self._cache = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def check(self, username: str | None, password: bytes | None, source: str = "") -> Verdict:
        """The verdict on these credentials; ``source`` (the client's address) picks its place in the
        round robin of password checks (broker.auth.fair_queue)."""
        if username is None:
            if password is None and self.allow_anonymous:
                return Verdict(True, False)
            return Verdict(False, password is not None)
        if password is None:
            return Verdict(False, False)
        key = hmac.digest(self._salt, username.encode("utf-8") + b"\x00" + password, hashlib.sha256)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return Verdict(cached[1], not cached[1])
        hashed = self.users.get(username)
        # The same credentials checked concurrently (a fleet reconnecting after an outage) cost one bcrypt.
        running = self._running.get(key)
        if running is None or running[0] is not hashed:
            # One address may hold at most an eighth of the queue: a flood from it cannot make every
            # other address's logins "server busy".
            from_source = self._pending_by_source.get(source, 0)
            if from_source >= max(8, self.max_pending // 8) or not self.counts.take(AUTH_PENDING, self.max_pending):
                return Verdict(False, False, busy=True)
            # Counted now, not when the task starts: checks arriving in this loop turn count it.
            self._pending_by_source[source] = from_source + 1
            task = asyncio.ensure_future(self._bcrypt(source, username, password, hashed))
            running = self._running[key] = [hashed, task, 0]
            task.add_done_callback(partial(self._ran, key, source))
        else:
            task = running[1]
        running[2] += 1
        try:
            ok = await asyncio.shield(task)  # a waiter that goes away leaves the check to the others...
        except asyncio.CancelledError:
            running[2] -= 1
            if not running[2]:
                task.cancel()  # ...and when the last one went away, a check still queued is not run
            raise
        # A reload during the check (the user removed, the password changed): the answer is for a file
        # that is gone, so it refuses and is not remembered.
        ok = ok and hashed is not None and self.users.get(username) is hashed
        if self.cache_ttl > 0 and self.users.get(username) is hashed:
            if len(self._cache) > 100_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + self.cache_ttl, ok)
        return Verdict(ok, not ok)

    async def _bcrypt(self, source: str, username: str, password: bytes, hashed: bytes | None) -> bool:
        return await self._queue.run(source, username, _checkpw, password, hashed or self._dummy)

    def _ran(self, key: bytes, source: str, task: asyncio.Task[bool]) -> None:
        self.counts.release(AUTH_PENDING)  # here, not in _bcrypt: a task cancelled before it started still counted
        left = self._pending_by_source.pop(source) - 1
        if left:
            self._pending_by_source[source] = left
        running = self._running.get(key)
        if running is not None and running[1] is task:
            del self._running[key]


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], hashed)
    except ValueError:
        return False

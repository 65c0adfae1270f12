"""ACL rules carried by a token (a JWT's ``acl`` claim, EMQX's format) and the policy that applies them first.

A token may carry its own rules. They are checked before the client's other rules (the fallback
policy: the ACL engine, or the platform), first match wins, and only when no claim rule matches does
the fallback decide. Pure: no I/O, nothing of ``broker``; the claim is already-decoded JSON.

Formats (EMQX 5):

- list form, ``[{"permission": "allow"|"deny", "action": "publish"|"subscribe"|"all", "topic": "..."}]``
  with optional ``retain`` (publish side: true = only retained publishes, false = only non-retained)
  and ``qos`` (only the full ``[0, 1, 2]``: the checks never see a QoS, so a narrower list is refused
  rather than guessed). Unmatched operations go to the fallback, as in EMQX.
- object form, ``{"pub": [...], "sub": [...], "all": [...]}``: allow lists only, and, as in EMQX, a
  whitelist: what no entry allows is denied without asking the fallback (:attr:`ClaimAcl.exclusive`).

Anything else (unknown keys, EMQX's ``eq`` topic prefix, the 5.9 client conditions such as
``clientid_re``, an invalid topic) raises ``ValueError``: a token whose rules cannot be applied exactly
is refused, never half-applied.

Matching reuses the engine's compiled trie (:mod:`acl.index`) and so its semantics: a publish or a
delivery matches a rule whose filter matches the literal topic (deliveries use the subscribe rules); a
SUBSCRIBE filter matches an allow rule whose filter covers every topic of it, and a deny rule that covers
every topic of it; MQTT's ``$`` rule holds. A deny claim narrower than the filter (or only overlapping it)
does not decide the filter, it carves its topics out: every delivery is checked claims first, so such a
deny claim is never bypassed with a wider filter (docs/acl.md, "Deny rules that carve out").

Placeholders ``${username}`` (the token's identity) and ``${clientid}`` may appear anywhere in a claim
topic and are bound once per connection. A value that is empty or contains ``/``, ``+``, ``#`` or U+0000
would change the filter's shape: an allow rule with such a value never matches, and a deny rule is
widened to ``#`` from the level holding the placeholder, so it still denies everything it could mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from acl.cache import DEFAULT_SIZE, BoundedCache
from acl.index import NO_RULE, IndexedRule, TopicIndex
from acl.placeholders import PLACEHOLDER_RE, valid_value
from acl.rules import Action, Effect, Level, LevelKind
from acl.topics import filter_levels, filter_problem, is_shared, parse_shared, topic_levels

CLAIM_PLACEHOLDERS: frozenset[str] = frozenset({"username", "clientid"})
MAX_TOPIC = 65535  # an MQTT string: no claim topic can be longer and still be a topic

_ACTIONS: dict[str, tuple[bool, bool]] = {"publish": (True, False), "subscribe": (False, True), "all": (True, True)}
_OLD_KEYS: dict[str, tuple[bool, bool]] = {"pub": (True, False), "sub": (False, True), "all": (True, True)}
_RULE_KEYS = frozenset({"permission", "action", "topic", "qos", "retain"})


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """One rule of a token's ACL claim; ``topic_filter`` may hold ``${username}`` / ``${clientid}``.

    ``retain`` qualifies the publish side only: None = any publish, True = only retained, False = only
    non-retained. ``effect``, ``action`` and ``pattern`` present it as the engine's rules are presented
    (deny log lines, ``acl explain``).
    """

    allow: bool
    publish: bool
    subscribe: bool
    topic_filter: str
    retain: bool | None = None

    def __post_init__(self) -> None:
        if not (self.publish or self.subscribe):
            raise ValueError("a claim rule must apply to publish, subscribe or both")
        problem = template_problem(self.topic_filter)
        if problem is not None:
            raise ValueError(problem)

    @property
    def effect(self) -> Effect:
        return Effect.ALLOW if self.allow else Effect.DENY

    @property
    def action(self) -> Action:
        if self.publish and self.subscribe:
            return Action.BOTH
        return Action.PUBLISH if self.publish else Action.SUBSCRIBE

    @property
    def pattern(self) -> str:
        return self.topic_filter


def template_problem(topic: object) -> str | None:
    """Why ``topic`` cannot be a claim rule's filter (placeholders allowed), or None."""
    if not isinstance(topic, str) or not topic:
        return "a claim topic must be a non-empty string"
    if len(topic) > MAX_TOPIC:
        return "a claim topic is longer than any MQTT topic"
    for name in PLACEHOLDER_RE.findall(topic):
        if name not in CLAIM_PLACEHOLDERS:
            return f"unknown placeholder ${{{name}}} in claim topic {topic!r} (known: ${{clientid}}, ${{username}})"
    # A stand-in value has the shape every usable value has (no separator, no wildcard).
    shaped = PLACEHOLDER_RE.sub("x", topic)
    if "${" in shaped:
        return f"unterminated placeholder in claim topic {topic!r}"
    if is_shared(shaped):
        return f"a claim topic cannot be a shared subscription: {topic!r}"
    problem = filter_problem(shaped)
    return None if problem is None else f"{problem}: {topic!r}"


@dataclass(frozen=True, slots=True)
class ClaimAcl:
    """A parsed claim: its rules in order, and whether unmatched operations are denied (object form)."""

    rules: tuple[ClaimRule, ...]
    exclusive: bool = False


def _qos_problem(qos: object) -> str | None:
    levels = [qos] if isinstance(qos, int) and not isinstance(qos, bool) else qos
    if not isinstance(levels, list) or any(isinstance(q, bool) or q not in (0, 1, 2) for q in levels):
        return "qos must be a list of 0, 1 and 2"
    if set(levels) != {0, 1, 2}:
        return "qos restrictions are not supported (the checks do not see the QoS): omit qos"
    return None


def _parse_rule(i: int, item: object) -> ClaimRule:
    if not isinstance(item, dict):
        raise ValueError(f"acl[{i}]: a rule must be an object")
    unknown = sorted(str(k) for k in item if k not in _RULE_KEYS)
    if unknown:
        raise ValueError(f"acl[{i}]: unsupported key(s) {', '.join(unknown)}")
    permission = item.get("permission")
    if permission not in ("allow", "deny"):
        raise ValueError(f"acl[{i}]: permission must be allow or deny, got {permission!r}")
    action = item.get("action")
    if not isinstance(action, str) or action not in _ACTIONS:
        raise ValueError(f"acl[{i}]: action must be publish, subscribe or all, got {action!r}")
    topic = item.get("topic")
    if isinstance(topic, str) and topic.startswith("eq "):
        raise ValueError(f"acl[{i}]: the 'eq' topic prefix is not supported")
    if "qos" in item and (problem := _qos_problem(item["qos"])) is not None:
        raise ValueError(f"acl[{i}]: {problem}")
    retain = item.get("retain")
    if retain is not None and not isinstance(retain, bool):
        raise ValueError(f"acl[{i}]: retain must be true or false")
    publish, subscribe = _ACTIONS[action]
    problem = template_problem(topic)
    if problem is not None or not isinstance(topic, str):
        raise ValueError(f"acl[{i}]: {problem}")
    # retain has no meaning for subscriptions (EMQX documents it as publish-only).
    return ClaimRule(permission == "allow", publish, subscribe, topic, retain if publish else None)


def _parse_old(claim: dict[object, object]) -> ClaimAcl:
    unknown = sorted(str(k) for k in claim if k not in _OLD_KEYS)
    if unknown:
        raise ValueError(f"acl: unsupported key(s) {', '.join(unknown)} (expected pub, sub, all)")
    rules: list[ClaimRule] = []
    for key, (publish, subscribe) in _OLD_KEYS.items():
        topics = claim.get(key, [])
        if not isinstance(topics, list):
            raise ValueError(f"acl.{key}: must be a list of topics")
        for j, topic in enumerate(topics):
            problem = template_problem(topic)
            if problem is not None or not isinstance(topic, str):
                raise ValueError(f"acl.{key}[{j}]: {problem}")
            rules.append(ClaimRule(True, publish, subscribe, topic))
    return ClaimAcl(tuple(rules), exclusive=True)


def parse_acl_claim(claim: object) -> ClaimAcl:
    """Parse a decoded ACL claim (list or object form); ``ValueError`` names the first problem."""
    if isinstance(claim, list):
        return ClaimAcl(tuple(_parse_rule(i, item) for i, item in enumerate(claim)))
    if isinstance(claim, dict):
        return _parse_old(claim)
    raise ValueError("acl: must be a list of rules or an object of pub/sub/all lists")


# -- the policy -----------------------------------------------------------------------------------


class FallbackPolicy(Protocol):
    """What decides when no claim rule matches (the session's ``AccessPolicy`` shape)."""

    def check_publish(self, topic: str, retain: bool = False) -> bool | None: ...
    def check_receive(self, topic: str) -> bool | None: ...
    def check_subscribe(self, topic_filter: str) -> bool | None: ...


class Explanation(Protocol):
    """A decision and the rule that made it (``acl.engine.Decision`` and :class:`ClaimDecision` are ones)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def rule(self) -> object | None: ...
    @property
    def source(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """As ``acl.engine.Decision``: ``carve_outs`` are the deny claims a granting claim's deliveries skip."""

    allowed: bool
    rule: ClaimRule | None
    source: str
    carve_outs: tuple[ClaimDecision, ...] = ()


_DENY, _ALLOW, _NO_MATCH, _INVALID = 0, 1, 2, 3  # claim outcomes; _INVALID denies too
_KIND = 1  # claim rules apply to this one client: every rule has the one kind bit
_NO_VALUES: Mapping[str, str] = {}


def _levels(topic_filter: str) -> tuple[Level, ...]:
    """Trie levels of a bound claim filter: `+` and `#` are wildcards, every other level is literal text."""
    out: list[Level] = []
    for part in topic_filter.split("/"):
        if part == "+":
            out.append(Level(LevelKind.PLUS))
        elif part == "#":
            out.append(Level(LevelKind.HASH))
        else:
            out.append(Level(LevelKind.LITERAL, part))
    return tuple(out)


def bind_topic(template: str, values: Mapping[str, str], allow: bool) -> str | None:
    """The claim filter for one client, None when the rule cannot apply (see the module docstring)."""
    if "${" not in template:
        return template
    if all(valid_value(values.get(name)) for name in PLACEHOLDER_RE.findall(template)):
        return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
    if allow:
        return None
    parts = template.split("/")
    first = next(i for i, part in enumerate(parts) if PLACEHOLDER_RE.search(part))
    if first == 0:
        # `#` does not reach `$` topics: a value starting with `$` keeps its first level literal.
        level0 = PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), ""), parts[0]).split("/")[0]
        if level0.startswith("$") and valid_value(level0):
            return level0 + "/#"
    return "/".join([*parts[:first], "#"])


class ClaimPolicy:
    """Claim rules first (first match wins), then ``fallback``; the session's access policy for one client.

    ``username`` is the identity the token names and ``client_id`` the session's client id; both are
    bound into the rules here, once. With ``exclusive`` (the object form) nothing reaches the fallback.

    Shared subscriptions ``$share/<group>/<filter>``: deny claims apply to ``<filter>`` (one covering it
    refuses it, narrower ones carve out its deliveries), but claims never grant one: the fallback decides,
    group policy included (a token must not let its holder join another client's share group and take its
    messages). A filter the fallback grants keeps the claims' carve-outs too (deliveries ask the claims
    first); ``explain_subscribe`` then shows the fallback's explanation only.
    """

    __slots__ = (
        "_pub",
        "_pub_cache",
        "_recv_cache",
        "_retained_cache",
        "_rules",
        "_sub",
        "_sub_cache",
        "exclusive",
        "fallback",
    )

    def __init__(
        self,
        rules: Sequence[ClaimRule],
        fallback: FallbackPolicy,
        username: str | None = None,
        client_id: str | None = None,
        exclusive: bool = False,
        cache_size: int = DEFAULT_SIZE,
    ) -> None:
        self.fallback = fallback
        self.exclusive = exclusive
        self._rules = tuple(rules)
        values = {name: v for name, v in (("username", username), ("clientid", client_id)) if v is not None}
        pub: list[IndexedRule] = []
        sub: list[IndexedRule] = []
        for i, rule in enumerate(self._rules):
            bound = bind_topic(rule.topic_filter, values, rule.allow)
            if bound is None:
                continue
            levels = _levels(bound)
            if rule.publish:
                pub.append(IndexedRule(i, levels, _KIND, rule.allow, rule.retain))
            if rule.subscribe:
                sub.append(IndexedRule(i, levels, _KIND, rule.allow, None))
        n = len(self._rules)
        self._pub = TopicIndex(pub, n)
        self._sub = TopicIndex(sub, n)
        self._pub_cache: BoundedCache[str, int] = BoundedCache(cache_size)
        self._retained_cache: BoundedCache[str, int] = BoundedCache(cache_size)
        self._recv_cache: BoundedCache[str, int] = BoundedCache(cache_size)
        self._sub_cache: BoundedCache[str, int] = BoundedCache(cache_size)

    # -- claim lookups: (outcome, rule index) ---------------------------------------------------------

    def _outcome(self, rule_id: int) -> tuple[int, int]:
        if rule_id == NO_RULE:
            return (_DENY if self.exclusive else _NO_MATCH), NO_RULE
        return (_ALLOW if self._rules[rule_id].allow else _DENY), rule_id

    def _publish(self, topic: str, retain: bool) -> tuple[int, int]:
        levels = topic_levels(topic)
        if levels is None:
            return _INVALID, NO_RULE
        return self._outcome(self._pub.match(levels, _NO_VALUES, _KIND, retain))

    def _receive(self, topic: str) -> tuple[int, int]:
        levels = topic_levels(topic)
        if levels is None:
            return _INVALID, NO_RULE
        return self._outcome(self._sub.match(levels, _NO_VALUES, _KIND, None))

    def _subscribe(self, topic_filter: str) -> tuple[int, int]:
        shared = is_shared(topic_filter)
        if shared:
            parsed = parse_shared(topic_filter)
            if parsed is None:
                return _INVALID, NO_RULE
            topic_filter = parsed.topic_filter
        flevels = filter_levels(topic_filter)
        if flevels is None:
            return _INVALID, NO_RULE
        # As the engine: only a deny claim covering the whole filter refuses it; narrower ones are
        # applied per delivery (check_receive asks the claims first, whoever granted the filter).
        allow_id = NO_RULE if shared else self._sub.first_covering_allow(flevels, _NO_VALUES, _KIND)
        deny_id = self._sub.first_covering_deny(flevels, _NO_VALUES, _KIND, allow_id)
        if deny_id < allow_id:
            return _DENY, deny_id
        if allow_id != NO_RULE:
            return _ALLOW, allow_id
        return self._outcome(NO_RULE)

    # -- hot paths ------------------------------------------------------------------------------------

    def check_publish(self, topic: str, retain: bool = False) -> bool | None:
        cache = self._retained_cache if retain else self._pub_cache
        outcome = cache.get(topic)
        if outcome is None:
            outcome = cache.remember(topic, self._publish(topic, retain)[0])
        if outcome == _NO_MATCH:
            return self.fallback.check_publish(topic, retain)
        return outcome == _ALLOW

    def check_receive(self, topic: str) -> bool | None:
        outcome = self._recv_cache.get(topic)
        if outcome is None:
            outcome = self._recv_cache.remember(topic, self._receive(topic)[0])
        if outcome == _NO_MATCH:
            return self.fallback.check_receive(topic)
        return outcome == _ALLOW

    def check_subscribe(self, topic_filter: str) -> bool | None:
        outcome = self._sub_cache.get(topic_filter)
        if outcome is None:
            outcome = self._sub_cache.remember(topic_filter, self._subscribe(topic_filter)[0])
        if outcome == _NO_MATCH:
            return self.fallback.check_subscribe(topic_filter)
        return outcome == _ALLOW

    @property
    def fast_paths_expired(self) -> Callable[[], bool] | None:
        """The fallback's (the platform's): its allows expire, the claims' never do (see broker.auth.platform_acl)."""
        expired: Callable[[], bool] | None = getattr(self.fallback, "fast_paths_expired", None)
        return expired

    def decide_soon(self, action: str, topic: str, retain: bool, done: Callable[[bool | None], None]) -> None:
        """Asked only after a check answered None: no claim matched and the fallback must ask (the platform).
        ``done`` gets its answer (inside this call or later), a deny when it has no way to ask."""
        decide_soon = getattr(self.fallback, "decide_soon", None)
        if decide_soon is None:
            done(False)
            return
        decide_soon(action, topic, retain, done)  # None passes through: unanswered (a will then gets 0x88)

    # -- explanations (uncached) ----------------------------------------------------------------------

    def _explain(self, outcome: int, rule_id: int, invalid: str) -> ClaimDecision:
        if rule_id != NO_RULE:
            return ClaimDecision(outcome == _ALLOW, self._rules[rule_id], f"jwt acl claim[{rule_id}]")
        if outcome == _INVALID:
            return ClaimDecision(False, None, invalid)
        return ClaimDecision(False, None, "jwt acl claim: no pub/sub/all entry allows it")

    def explain_publish(self, topic: str, retain: bool = False) -> Explanation:
        outcome, rule_id = self._publish(topic, retain)
        if outcome != _NO_MATCH:
            return self._explain(outcome, rule_id, "invalid topic name")
        explain = getattr(self.fallback, "explain_publish", None)
        if explain is not None:
            result: Explanation = explain(topic, retain)
            return result
        return ClaimDecision(self.fallback.check_publish(topic, retain) is True, None, "no jwt acl claim matched")

    def explain_receive(self, topic: str) -> Explanation:
        outcome, rule_id = self._receive(topic)
        if outcome != _NO_MATCH:
            return self._explain(outcome, rule_id, "invalid topic name")
        explain = getattr(self.fallback, "explain_receive", None)
        if explain is not None:
            result: Explanation = explain(topic)
            return result
        return ClaimDecision(self.fallback.check_receive(topic) is True, None, "no jwt acl claim matched")

    def explain_subscribe(self, topic_filter: str) -> Explanation:
        outcome, rule_id = self._subscribe(topic_filter)
        if outcome == _ALLOW:
            # Claims never grant a shared filter, so this one is plain and valid.
            flevels = filter_levels(topic_filter)
            assert flevels is not None
            carved = self._sub.intersecting_denies(flevels, _NO_VALUES, _KIND, rule_id)
            carve_outs = tuple(self._explain(_DENY, i, "") for i in carved)
            return ClaimDecision(True, self._rules[rule_id], f"jwt acl claim[{rule_id}]", carve_outs)
        if outcome != _NO_MATCH:
            return self._explain(outcome, rule_id, "invalid topic filter")
        explain = getattr(self.fallback, "explain_subscribe", None)
        if explain is not None:
            result: Explanation = explain(topic_filter)
            return result
        return ClaimDecision(self.fallback.check_subscribe(topic_filter) is True, None, "no jwt acl claim matched")

"""The ACL engine: ordered rules (operator rules, then a preset), first match wins, default deny."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from acl.cache import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from acl.cache import BoundedCache
from acl.identity import Identity, IdentityKind
from acl.index import NO_RULE, IndexedRule, TopicIndex
from acl.placeholders import placeholder_values
from acl.presets import PRESET_SHARE_GROUPS, PRESETS
from acl.rules import WHO_ANY, Rule
from acl.share import SharePolicy
from acl.topics import filter_levels, is_shared, parse_shared, topic_levels

_KIND_BITS: dict[IdentityKind, int] = {kind: 1 << i for i, kind in enumerate(IdentityKind)}
_ALL_KINDS = sum(_KIND_BITS.values())


def _kind_mask(who: str) -> int:
    return _ALL_KINDS if who == WHO_ANY else _KIND_BITS[IdentityKind(who)]


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer and the rule that gave it.

    ``carve_outs`` (granted subscriptions only): the deny rules, before the granting rule, that share
    topics with the filter without covering it; deliveries on their topics are dropped (check_receive).
    """

    allowed: bool
    rule: Rule | None
    source: str
    carve_outs: tuple[Decision, ...] = ()


class AclEngine:
    def __init__(self, rules: Sequence[Rule], preset: str = "none", share_groups: Sequence[str] | None = None) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown ACL preset {preset!r} (expected one of: {', '.join(sorted(PRESETS))})")
        own = list(rules)
        base = PRESETS[preset]
        self.preset = preset
        self.rules: tuple[Rule, ...] = (*own, *base)
        self.sources: tuple[str, ...] = (
            *(f"rules[{i}]" for i in range(len(own))),
            *(f"preset {preset}[{i}]" for i in range(len(base))),
        )
        self.share_policy = SharePolicy(share_groups if share_groups is not None else PRESET_SHARE_GROUPS[preset])
        indexed = [IndexedRule(i, r.levels, _kind_mask(r.who), r.allows, r.retain) for i, r in enumerate(self.rules)]
        n = len(self.rules)
        self.publish_index = TopicIndex((ir for ir, r in zip(indexed, self.rules, strict=True) if r.publishes), n)
        # Retain only qualifies publishes, so subscribe-side entries drop it.
        self.subscribe_index = TopicIndex(
            (
                IndexedRule(ir.id, ir.levels, ir.kinds, ir.allow, None)
                for ir, r in zip(indexed, self.rules, strict=True)
                if r.subscribes
            ),
            n,
        )

    def for_client(self, identity: Identity, client_id: str, cache_size: int = DEFAULT_CACHE_SIZE) -> ClientAcl:
        """The per-connection view; `cache_size=0` disables the decision caches."""
        return ClientAcl(self, identity, client_id, cache_size)


class ClientAcl:
    __slots__ = (
        "_engine",
        "_groups",
        "_kind_bit",
        "_pub_cache",
        "_pub_index",
        "_pub_retained_cache",
        "_recv_cache",
        "_sub_cache",
        "_sub_index",
        "_values",
        "client_id",
        "identity",
    )

    def __init__(self, engine: AclEngine, identity: Identity, client_id: str, cache_size: int) -> None:
        self._engine = engine
        self.identity = identity
        self.client_id = client_id
        self._values = placeholder_values(identity, client_id)
        self._kind_bit = _KIND_BITS[identity.kind]
        self._groups = engine.share_policy.bind(self._values)
        self._pub_index = engine.publish_index
        self._sub_index = engine.subscribe_index
        self._pub_cache: BoundedCache[str, bool] = BoundedCache(cache_size)
        self._pub_retained_cache: BoundedCache[str, bool] = BoundedCache(cache_size)
        self._recv_cache: BoundedCache[str, bool] = BoundedCache(cache_size)
        self._sub_cache: BoundedCache[str, bool] = BoundedCache(cache_size)

    # -- rule lookups ------------------------------------------------------------------------------

    def _publish_id(self, levels: list[str], retain: bool) -> int:
        return self._pub_index.match(levels, self._values, self._kind_bit, retain)

    def _receive_id(self, levels: list[str]) -> int:
        return self._sub_index.match(levels, self._values, self._kind_bit, None)

    def _is_allow(self, rule_id: int) -> bool:
        return rule_id != NO_RULE and self._engine.rules[rule_id].allows

    def _decision(self, rule_id: int) -> Decision:
        if rule_id == NO_RULE:
            return Decision(False, None, "default deny")
        rule = self._engine.rules[rule_id]
        return Decision(rule.allows, rule, self._engine.sources[rule_id])

    # -- hot paths ---------------------------------------------------------------------------------

    def check_publish(self, topic: str, retain: bool = False) -> bool:
        cache = self._pub_retained_cache if retain else self._pub_cache
        hit = cache.get(topic)
        if hit is not None:
            return hit
        levels = topic_levels(topic)
        allowed = levels is not None and self._is_allow(self._publish_id(levels, retain))
        return cache.remember(topic, allowed)

    def check_receive(self, topic: str) -> bool:
        """May this client be sent a message published on this concrete topic."""
        hit = self._recv_cache.get(topic)
        if hit is not None:
            return hit
        levels = topic_levels(topic)
        allowed = levels is not None and self._is_allow(self._receive_id(levels))
        return self._recv_cache.remember(topic, allowed)

    def check_subscribe(self, topic_filter: str) -> bool:
        hit = self._sub_cache.get(topic_filter)
        if hit is not None:
            return hit
        return self._sub_cache.remember(topic_filter, self._subscribe(topic_filter, explain=False).allowed)

    # -- explanations (uncached) -------------------------------------------------------------------

    def explain_publish(self, topic: str, retain: bool = False) -> Decision:
        levels = topic_levels(topic)
        if levels is None:
            return Decision(False, None, "invalid topic name")
        return self._decision(self._publish_id(levels, retain))

    def explain_receive(self, topic: str) -> Decision:
        levels = topic_levels(topic)
        if levels is None:
            return Decision(False, None, "invalid topic name")
        return self._decision(self._receive_id(levels))

    def explain_subscribe(self, topic_filter: str) -> Decision:
        return self._subscribe(topic_filter, explain=True)

    # -- subscribe decision ------------------------------------------------------------------------

    def _subscribe(self, topic_filter: str, explain: bool) -> Decision:
        if is_shared(topic_filter):
            shared = parse_shared(topic_filter)
            if shared is None:
                return Decision(False, None, "malformed shared subscription")
            if self._groups is not None and shared.group not in self._groups:
                return Decision(False, None, f"share group {shared.group!r} not allowed")
            topic_filter = shared.topic_filter
        flevels = filter_levels(topic_filter)
        if flevels is None:
            return Decision(False, None, "invalid topic filter")
        # First match over the filter as a whole: granted by the first allow rule covering every topic of
        # it, unless a deny rule before that one covers it all. Partial allows before it can only grant;
        # partial denies before it carve their topics out, and check_receive drops those deliveries.
        idx, values, kind = self._sub_index, self._values, self._kind_bit
        allow_id = idx.first_covering_allow(flevels, values, kind)
        if allow_id == NO_RULE and not explain:
            return Decision(False, None, "no rule allows every topic of the filter")
        deny_id = idx.first_covering_deny(flevels, values, kind, allow_id)
        if deny_id < allow_id:
            return self._decision(deny_id)
        if allow_id == NO_RULE:
            return Decision(False, None, "default deny (no rule allows every topic of the filter)")
        granted = self._decision(allow_id)
        if not explain:
            return granted
        carve_outs = tuple(self._decision(i) for i in idx.intersecting_denies(flevels, values, kind, allow_id))
        return Decision(True, granted.rule, granted.source, carve_outs)

"""Compiled topic trie over rule patterns.

One trie per direction (publish or subscribe) holds every rule of that direction; each path is a
pattern's levels and each terminal node lists the ids (global first-match order) of the rules ending
there. A lookup walks only branches that can match, so its cost depends on the pattern shapes along
the path, not on how many rules or teams exist. Every node records the lowest rule id in its subtree,
which prunes branches that cannot beat the best match found so far.

Placeholder levels stay symbolic in the trie and are compared with the client's bound values at
lookup time, so one trie serves every client.

MQTT `$` rule: at the first level, `+`, `#` and placeholders never match a level starting with `$`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from acl.rules import Level, LevelKind

NO_RULE = sys.maxsize


@dataclass(frozen=True, slots=True)
class IndexedRule:
    id: int
    levels: tuple[Level, ...]
    kinds: int  # bit mask of the identity kinds the rule applies to
    allow: bool
    retain: bool | None


class _Node:
    __slots__ = (
        "deny_kinds",
        "hash",
        "ids",
        "lit",
        "min_deny_sub",
        "min_sub",
        "placeholders",
        "plus",
        "prefixes",
        "wild",
    )

    def __init__(self) -> None:
        # Child containers stay None until used: large literal rule sets create many nodes.
        self.lit: dict[str, _Node] | None = None
        self.plus: _Node | None = None
        self.hash: _Node | None = None
        self.prefixes: dict[str, _Node] | None = None
        self.placeholders: dict[str, _Node] | None = None
        self.ids: list[int] | None = None  # ascending rule ids of patterns ending here
        self.min_sub = NO_RULE
        self.min_deny_sub = NO_RULE
        # Kinds that some deny rule below applies to: the deny search skips subtrees of other kinds' denies.
        self.deny_kinds = 0
        self.wild = False  # has a `+`, prefix or placeholder child: lets literal-only nodes skip three checks


# `list.append` of the walk stack.
_Push = Callable[[tuple[_Node, int]], None]


def _child(node: _Node, level: Level) -> _Node:
    kind = level.kind
    if kind is not LevelKind.LITERAL and kind is not LevelKind.HASH:
        node.wild = True
    if kind is LevelKind.PLUS:
        if node.plus is None:
            node.plus = _Node()
        return node.plus
    if kind is LevelKind.HASH:
        if node.hash is None:
            node.hash = _Node()
        return node.hash
    if kind is LevelKind.LITERAL:
        if node.lit is None:
            node.lit = {}
        table = node.lit
    elif kind is LevelKind.PREFIX:
        if node.prefixes is None:
            node.prefixes = {}
        table = node.prefixes
    else:
        if node.placeholders is None:
            node.placeholders = {}
        table = node.placeholders
    child = table.get(level.text)
    if child is None:
        child = table[level.text] = _Node()
    return child


class TopicIndex:
    def __init__(self, rules: Iterable[IndexedRule], rule_count: int) -> None:
        self._root = _Node()
        # Per-id metadata, indexed by global rule id (ids of the other direction stay unused).
        self._kinds = [0] * rule_count
        self._allow = [False] * rule_count
        self._retain: list[bool | None] = [None] * rule_count
        for rule in sorted(rules, key=lambda r: r.id):
            self._insert(rule)

    def _insert(self, rule: IndexedRule) -> None:
        self._kinds[rule.id] = rule.kinds
        self._allow[rule.id] = rule.allow
        self._retain[rule.id] = rule.retain
        path = [self._root]
        for level in rule.levels:
            path.append(_child(path[-1], level))
        end = path[-1]
        if end.ids is None:
            end.ids = []
        end.ids.append(rule.id)  # inserted in id order, so the list stays ascending
        for node in path:
            node.min_sub = min(node.min_sub, rule.id)
            if not rule.allow:
                node.min_deny_sub = min(node.min_deny_sub, rule.id)
                node.deny_kinds |= rule.kinds

    # -- terminal selection ------------------------------------------------------------------------

    def _first(self, node: _Node, best: int, kind_bit: int, retained: bool | None) -> int:
        ids = node.ids
        if ids is None:
            return best
        kinds, rets = self._kinds, self._retain
        for i in ids:
            if i >= best:
                break
            if kinds[i] & kind_bit:
                r = rets[i]
                if retained is None or r is None or r is retained:
                    return i
        return best

    def _first_effect(self, node: _Node, best: int, kind_bit: int, allow: bool) -> int:
        ids = node.ids
        if ids is None:
            return best
        kinds, allows = self._kinds, self._allow
        for i in ids:
            if i >= best:
                break
            if kinds[i] & kind_bit and allows[i] is allow:
                return i
        return best

    # -- concrete topics ---------------------------------------------------------------------------

    def match(self, levels: Sequence[str], values: Mapping[str, str], kind_bit: int, retained: bool | None) -> int:
        """Lowest id of a rule matching the topic (NO_RULE if none). `retained` None ignores retain."""
        # Hot path: the child pushes are inlined rather than shared with the filter walks.
        best = NO_RULE
        n = len(levels)
        dollar = levels[0][:1] == "$"
        first = self._first
        stack = [(self._root, 0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, k = pop()
            if node.min_sub >= best:
                continue
            h = node.hash
            if h is not None and (k or not dollar):
                best = first(h, best, kind_bit, retained)
            if k == n:
                if node.ids is not None:
                    best = first(node, best, kind_bit, retained)
                continue
            level = levels[k]
            lit = node.lit
            if lit is not None:
                c = lit.get(level)
                if c is not None:
                    push((c, k + 1))
            if node.wild:
                first_dollar = dollar and k == 0
                if node.plus is not None and not first_dollar:
                    push((node.plus, k + 1))
                if node.prefixes is not None:
                    for p, c in node.prefixes.items():
                        if len(level) > len(p) and level.startswith(p):
                            push((c, k + 1))
                if node.placeholders is not None and not first_dollar:
                    for name, c in node.placeholders.items():
                        if values.get(name) == level:
                            push((c, k + 1))
        return best

    @staticmethod
    def _push_level_children(
        node: _Node,
        level: str,
        k: int,
        first_dollar: bool,
        values: Mapping[str, str],
        push: _Push,
    ) -> None:
        """Push the children whose level set contains the concrete level."""
        if node.lit is not None:
            c = node.lit.get(level)
            if c is not None:
                push((c, k + 1))
        if node.plus is not None and not first_dollar:
            push((node.plus, k + 1))
        if node.prefixes is not None:
            for p, c in node.prefixes.items():
                if len(level) > len(p) and level.startswith(p):
                    push((c, k + 1))
        if node.placeholders is not None and not first_dollar:
            for name, c in node.placeholders.items():
                if values.get(name) == level:
                    push((c, k + 1))

    # -- topic filters -----------------------------------------------------------------------------

    def first_covering_allow(self, flevels: Sequence[str], values: Mapping[str, str], kind_bit: int) -> int:
        """Lowest id of an allow rule whose pattern matches every topic the filter matches."""
        return self._first_covering(flevels, values, kind_bit, True, NO_RULE)

    def first_covering_deny(self, flevels: Sequence[str], values: Mapping[str, str], kind_bit: int, bound: int) -> int:
        """Lowest id below `bound` of a deny rule whose pattern matches every topic of the filter, else `bound`."""
        return self._first_covering(flevels, values, kind_bit, False, bound)

    def _first_covering(
        self, flevels: Sequence[str], values: Mapping[str, str], kind_bit: int, allow: bool, bound: int
    ) -> int:
        best = bound
        n = len(flevels)
        dollar = _literal_dollar(flevels[0])
        stack = [(self._root, 0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, k = pop()
            if node.min_sub >= best:
                continue
            if not allow and (node.min_deny_sub >= best or not node.deny_kinds & kind_bit):
                continue
            first_dollar = dollar and k == 0
            h = node.hash
            if h is not None and not first_dollar:
                best = self._first_effect(h, best, kind_bit, allow)
            if k == n:
                best = self._first_effect(node, best, kind_bit, allow)
                continue
            f = flevels[k]
            if f == "#":
                # Only a pattern `#` covers a filter `#` (handled above), except at the root where `+/#`
                # also matches every topic of one or more levels.
                if k == 0 and node.plus is not None and node.plus.hash is not None:
                    best = self._first_effect(node.plus.hash, best, kind_bit, allow)
                continue
            if f == "+":
                # Only `+` covers `+`: a literal, prefix or placeholder is a strict subset of it.
                if node.plus is not None:
                    push((node.plus, k + 1))
                continue
            self._push_level_children(node, f, k, first_dollar, values, push)
        return best

    def intersecting_denies(
        self, flevels: Sequence[str], values: Mapping[str, str], kind_bit: int, bound: int
    ) -> list[int]:
        """Ids below `bound` (ascending) of the deny rules sharing at least one topic with the filter."""
        found: set[int] = set()
        n = len(flevels)
        dollar = _literal_dollar(flevels[0])
        stack = [(self._root, 0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, k = pop()
            if node.min_deny_sub >= bound or not node.deny_kinds & kind_bit:
                continue
            if k < n and flevels[k] == "#":
                self._denies_in_subtree(node, k, values, kind_bit, bound, found)
                continue
            first_dollar = dollar and k == 0
            h = node.hash
            if h is not None and not first_dollar:
                self._collect_denies(h, kind_bit, bound, found)
            if k == n:
                self._collect_denies(node, kind_bit, bound, found)
                continue
            f = flevels[k]
            if f == "+":
                self._push_all_children(node, k, values, push)
            else:
                self._push_level_children(node, f, k, first_dollar, values, push)
        return sorted(found)

    def _collect_denies(self, node: _Node, kind_bit: int, bound: int, found: set[int]) -> None:
        ids = node.ids
        if ids is None:
            return
        kinds, allows = self._kinds, self._allow
        for i in ids:
            if i >= bound:
                break
            if kinds[i] & kind_bit and not allows[i]:
                found.add(i)

    def _denies_in_subtree(
        self, start: _Node, k0: int, values: Mapping[str, str], kind_bit: int, bound: int, found: set[int]
    ) -> None:
        """The filter's remaining levels are `#`: every satisfiable pattern below intersects it."""
        stack = [(start, k0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, k = pop()
            if node.min_deny_sub >= bound or not node.deny_kinds & kind_bit:
                continue
            self._collect_denies(node, kind_bit, bound, found)
            if node.hash is not None:
                self._collect_denies(node.hash, kind_bit, bound, found)
            self._push_all_children(node, k, values, push)

    @staticmethod
    def _push_all_children(node: _Node, k: int, values: Mapping[str, str], push: _Push) -> None:
        """Push every child (not `#`) whose level set shares a level with `+` at depth k."""
        first = k == 0  # a filter wildcard at the first level excludes `$` levels
        if node.lit is not None:
            for lv, c in node.lit.items():
                if not (first and lv[:1] == "$"):
                    push((c, k + 1))
        if node.plus is not None:
            push((node.plus, k + 1))
        if node.prefixes is not None:
            for p, c in node.prefixes.items():
                if not (first and p[:1] == "$"):
                    push((c, k + 1))
        if node.placeholders is not None:
            for name, c in node.placeholders.items():
                v = values.get(name)
                if v is not None and not (first and v[:1] == "$"):
                    push((c, k + 1))


def _literal_dollar(level: str) -> bool:
    return level not in ("+", "#") and level[:1] == "$"

"""Which `$share` group names a client may use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from acl.placeholders import PLACEHOLDER_NAMES, PLACEHOLDER_RE


def _validate_template(template: str) -> str | None:
    """Return the placeholder name of a `${name}` template, None for a literal; raise if malformed."""
    if not isinstance(template, str) or not template:
        raise ValueError("share group must be a non-empty string")
    if any(c in template for c in ("/", "+", "#", "\x00")):
        raise ValueError(f"share group {template!r} must not contain '/', '+', '#' or U+0000")
    if "${" not in template:
        return None
    m = PLACEHOLDER_RE.fullmatch(template)
    if m is None:
        raise ValueError(f"a placeholder must be the whole share group as '${{name}}', got {template!r}")
    if m.group(1) not in PLACEHOLDER_NAMES:
        raise ValueError(f"unknown placeholder ${{{m.group(1)}}} in share group {template!r}")
    return m.group(1)


class SharePolicy:
    """Allowed group names as literals or `${name}` templates; None means any group name is allowed."""

    def __init__(self, templates: Sequence[str] | None) -> None:
        self.templates: tuple[str, ...] | None = None if templates is None else tuple(templates)
        self._parsed: tuple[tuple[str, str | None], ...] | None = (
            None if templates is None else tuple((t, _validate_template(t)) for t in templates)
        )

    def bind(self, values: Mapping[str, str]) -> frozenset[str] | None:
        """The concrete group names for one client (templates with an unusable value drop out)."""
        if self._parsed is None:
            return None
        groups: set[str] = set()
        for literal, name in self._parsed:
            if name is None:
                groups.add(literal)
            elif name in values:
                groups.add(values[name])
        return frozenset(groups)

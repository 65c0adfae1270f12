"""The one bounded cache of allowed (or decided) topics, shared by the ACL engine and the session.

Both keep a per-client map from a topic (``str`` for the engine's decisions, the raw ``bytes``
for the session's allowed-topic fast paths) to a verdict. The bound is deliberately crude:
when full (``size`` entries, or ``BYTES_MAX`` bytes of keys), the cache is emptied (a hot working
set refills at once), and long keys are never cached (1024 topics of 64 KB would hold 64 MB per
cache and client). A connection holds a handful of these: its memory stays bounded whatever
topics it uses. Lookups are plain ``dict`` operations, so the hot paths stay C-speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from itertools import islice
from typing import Generic, TypeVar

DEFAULT_SIZE = 1024
KEY_MAX = 256  # longer keys are not cached
BYTES_MAX = 64 * 1024  # key bytes held at most (1024 topics of 64 bytes; typical FlowFuse topics are 30-60)

K = TypeVar("K", bound=Sized)
V = TypeVar("V")


class BoundedCache(dict[K, V], Generic[K, V]):
    """A dict with a size bound; ``size=0`` disables caching."""

    __slots__ = ("held", "size")

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        super().__init__()
        self.size = max(0, size)
        self.held = 0  # bytes of the keys remembered since the last clear (a re-remembered key counts again)

    def remember(self, key: K, value: V) -> V:
        """Store ``value`` for ``key`` (unless caching is off or the key is too long); returns ``value``."""
        n = len(key)
        if self.size and n <= KEY_MAX:
            if len(self) >= self.size or self.held + n > BYTES_MAX:
                self.clear()
            self[key] = value
            self.held += n
        return value

    def clear(self) -> None:
        super().clear()
        self.held = 0


def oldest(keys: Iterable[K], count: int) -> list[K]:
    """The first ``count`` keys of an insertion-ordered dict, to evict in one go.

    Deleting a full dict's first key at every insert (``del d[next(iter(d))]``) makes each following
    ``next(iter(d))`` walk past every slot deleted before it, until CPython next resizes the dict: 70 µs per
    insert in a 100,000-entry table over 300,000 inserts, 0.44 µs when a sixteenth goes at once."""
    return list(islice(keys, count))


"""Keys and paths as text: a JAX key's segment, quoting, and splitting a printed path.

A path is the leaf's keys joined with `.`: `GetAttrKey` gives the attribute
name, `DictKey` the key as text, `SequenceKey` / `FlattenedIndexKey` the
decimal index. A key that is empty or holds a `.`, whitespace, a quote, a
backslash, a `/` (which separates segments in dict keys that are paths) or a
glob metacharacter, or that starts with `re:`, renders quoted (`params."conv.1".kernel`)
so that `glob("^" + path + "$")` selects exactly that leaf.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.tree_util as jtu

__all__ = ["key_text", "quote", "runs", "split_path"]

_SPECIAL = frozenset("*?[]{}./\"'\\^$")


@functools.lru_cache(maxsize=65536)
def quote(text: str) -> str:
    """The printed form of one segment: itself, or quoted when it could be misread."""
    # A leading "re:" would make the pasted path a regex.
    if text and not text.startswith("re:") and not any(c in _SPECIAL or c.isspace() for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def key_text(key: Any) -> str:
    """The raw segment text of one JAX key, what patterns see."""
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.DictKey):
        return str(key.key)
    if isinstance(key, jtu.SequenceKey):
        return str(key.idx)
    if isinstance(key, jtu.FlattenedIndexKey):
        return str(key.key)
    # A custom key class from `register_pytree_with_keys`.
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def split_path(path: str) -> tuple[str, ...]:
    """The raw segments of a printed path: split on dots outside quotes, quotes removed.

    The inverse of joining `quote(segment)` with dots: `split_path('a."b.c".d')`
    is `('a', 'b.c', 'd')`.
    """
    if path == "":
        return ()
    out: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for c in path:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "." and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(c)
    out.append("".join(current))
    return tuple(out)


def runs(paths: list[tuple[str, ...]], k: int, *, ending: bool = False) -> list[str]:
    """The printed runs of `k` consecutive segments of the paths (each only the run that
    ends the path, with `ending`): what a pattern of `k` segments is compared with for
    close matches, since it may match anywhere along a path."""
    return sorted(
        {
            ".".join(map(quote, segments[i : i + k]))
            for segments in paths
            for i in ([len(segments) - k] if ending else range(len(segments) - k + 1))
            if i >= 0
        }
    )

"""Leaf paths: JAX key paths rendered as dotted strings, and the flattened view.

A path is the leaf's keys joined with `.`: `GetAttrKey` gives the attribute
name, `DictKey` the key as text, `SequenceKey` / `FlattenedIndexKey` the
decimal index. A key that is empty or holds a `.`, whitespace, a quote, a
backslash or a glob metacharacter renders quoted (`params."conv.1".kernel`)
so that `glob("^" + path + "$")` selects exactly that leaf.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax.tree_util as jtu

__all__ = ["TreeView", "paths", "render_key"]

_SPECIAL = frozenset("*?[]{}.\"'\\^$")


@functools.lru_cache(maxsize=65536)
def _quote(text: str) -> str:
    if text and not any(c in _SPECIAL or c.isspace() for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_key(key: Any) -> tuple[str, str]:
    """`(segment, rendered)`: the raw segment text patterns see, and its printed form."""
    if isinstance(key, jtu.GetAttrKey):
        text = key.name
    elif isinstance(key, jtu.DictKey):
        text = str(key.key)
    elif isinstance(key, jtu.SequenceKey):
        text = str(key.idx)
    elif isinstance(key, jtu.FlattenedIndexKey):
        text = str(key.key)
    else:  # a custom key class from `register_pytree_with_keys`
        text = str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
    return text, _quote(text)


def _flatten_with_path(tree: Any) -> tuple[list[tuple[Any, Any]], Any]:
    try:
        return jtu.tree_flatten_with_path(tree)
    except (TypeError, ValueError) as exc:
        hint = ""
        if "'<' not supported" in str(exc) or "sort" in str(exc):
            hint = (
                "\nA dict in the tree mixes key types (e.g. int and str keys), which JAX cannot "
                "sort. Use one key type per dict, e.g. str(key) for every key."
            )
        raise TypeError(f"treeglob could not flatten the tree: {exc}{hint}") from exc


@dataclass(frozen=True, eq=False)
class TreeView:
    """A tree flattened once: leaves, key paths, segments and rendered paths.

    Everything a selector reads is computed here, once per call, from static
    metadata only (no array value is touched).
    """

    tree: Any
    treedef: Any
    leaves: list[Any]
    key_paths: list[tuple[Any, ...]]
    segments: list[tuple[str, ...]]
    paths: list[str]

    @classmethod
    def of(cls, tree: Any) -> TreeView:
        flat, treedef = _flatten_with_path(tree)
        key_paths = [kp for kp, _ in flat]
        leaves = [leaf for _, leaf in flat]
        segments, rendered = [], []
        for kp in key_paths:
            pairs = [render_key(k) for k in kp]
            segments.append(tuple(p[0] for p in pairs))
            rendered.append(".".join(p[1] for p in pairs))
        return cls(tree, treedef, leaves, key_paths, segments, rendered)

    @functools.cached_property
    def shapes(self) -> list[tuple[int, ...] | None]:
        """Static shape of each array-like leaf (has `shape` and `dtype`), else None."""
        return [
            tuple(leaf.shape) if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else None
            for leaf in self.leaves
        ]

    @functools.cached_property
    def dtypes(self) -> list[Any]:
        return [
            leaf.dtype if s is not None else None for leaf, s in zip(self.leaves, self.shapes, strict=True)
        ]

    @functools.cached_property
    def ndims(self) -> list[int | None]:
        return [None if s is None else len(s) for s in self.shapes]

    @functools.cached_property
    def sizes(self) -> list[int | None]:
        return [None if s is None else math.prod(s) for s in self.shapes]

    def __len__(self) -> int:
        return len(self.leaves)

    def unflatten(self, values: list[Any]) -> Any:
        return jtu.tree_unflatten(self.treedef, values)


def paths(tree: Any) -> list[str]:
    """The dotted path of every leaf of `tree`, in `jax.tree_util` leaf order.

    `None` is an empty subtree, as in JAX. A leaf at the root has the path
    `""`. Integer and digit-string keys render as plain decimals, so a range
    such as `{0..11}` works on lists and on int- or str-keyed dicts alike.
    Keys that could be misread (empty, with a dot, whitespace, a quote, a
    backslash or a glob metacharacter) are quoted with backslash escapes.

    Equinox specifics: static fields are not leaves; non-array fields
    (activations, Python scalars) are. `eqx.nn.Shared` keeps a tied weight
    once, under `shared.pytree.N...`; `eqx.nn.State` leaves have index-only
    paths (`0`, `1.0`, ...).

    Args:
        tree: any PyTree.

    Returns:
        A list of `str`, one per leaf.

    Examples:
        >>> import treeglob
        >>> treeglob.paths({"params": {"conv.1": {"kernel": 1}, "head": [2, 3]}, "x": None})
        ['params."conv.1".kernel', 'params.head.0', 'params.head.1']
        >>> treeglob.paths(5)
        ['']
    """
    return TreeView.of(tree).paths

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
import numpy as np

__all__ = ["TreeView", "paths", "render_key", "shape_of", "split_path"]


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


def _flatten(flatten: Any, tree: Any) -> Any:
    try:
        return flatten(tree)
    except (TypeError, ValueError) as exc:
        hint = ""
        if "'<' not supported" in str(exc) or "sort" in str(exc):
            hint = (
                "\nA dict in the tree mixes key types (e.g. int and str keys), which JAX cannot "
                "sort. Use one key type per dict, e.g. str(key) for every key."
            )
        raise TypeError(f"treeglob could not flatten the tree: {exc}{hint}") from exc


def split_path(path: str) -> tuple[str, ...]:
    """The rendered segments of a rendered path: split on dots outside quotes."""
    if path == "":
        return ()
    out, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(path):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = quoted
        elif c == '"':
            quoted = not quoted
        elif c == "." and not quoted:
            out.append(path[start:i])
            start = i + 1
    out.append(path[start:])
    return tuple(out)


@dataclass(frozen=True, eq=False)
class TreeView:
    """A tree flattened once: one *row* per leaf, with everything selectors read.

    Rows are the leaves, except under subtrees declared stacked (see
    `_stacked.py`), where each leaf becomes one row per layer slice.
    `origin[row]` is the index of the leaf a row comes from (None when rows
    are the leaves themselves). Paths are rendered only when something asks
    for them: globs, `inside` and `owned_by` walk the compressed structure
    (`_structure.py`) instead. Only static metadata is read, never values.
    """

    tree: Any
    treedef: Any
    leaves: list[Any]  # per row: the leaf, or a ShapeDtypeStruct of one slice
    row_keys: tuple[list[tuple[str, ...]], list[tuple[str, ...]]] | None = None  # given for stacked views
    origin: np.ndarray | None = None
    slices: tuple[tuple[int, tuple[int, ...]], ...] | None = None  # per leaf: (first row, stack shape)
    stacked_paths: list[str] | None = None  # per leaf: its path before the layer index was inserted
    tree_leaves: list[Any] | None = None  # the leaves themselves (rows may be layer slices of them)

    @classmethod
    def of(cls, tree: Any, stacked: Any = None) -> TreeView:
        leaves, treedef = _flatten(jtu.tree_flatten, tree)
        view = cls(tree, treedef, leaves, tree_leaves=leaves)
        if stacked is not None:
            from ._stacked import expand

            view = expand(view, stacked)
        return view

    @functools.cached_property
    def key_paths(self) -> list[tuple[Any, ...]]:
        """Per leaf (not per row): its JAX key path."""
        return [key_path for key_path, _ in _flatten(jtu.tree_flatten_with_path, self.tree)[0]]

    @functools.cached_property
    def _keys(self) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
        if self.row_keys is not None:
            return self.row_keys
        segments, rendered = [], []
        for key_path in self.key_paths:
            pairs = [render_key(k) for k in key_path]
            segments.append(tuple(p[0] for p in pairs))
            rendered.append(tuple(p[1] for p in pairs))
        return segments, rendered

    @property
    def segments(self) -> list[tuple[str, ...]]:
        """Per row: the raw key texts, what patterns see."""
        return self._keys[0]

    @property
    def rendered(self) -> list[tuple[str, ...]]:
        """Per row: the segments, quoted where needed."""
        return self._keys[1]

    @functools.cached_property
    def paths(self) -> list[str]:
        """Per row: the rendered segments joined with "."."""
        return [".".join(r) for r in self.rendered]

    @functools.cached_property
    def leaf_types(self) -> set[type]:
        """The distinct types of the leaves (not rows)."""
        return set(map(type, self.tree_leaves))

    @functools.cached_property
    def structure(self) -> Any:
        """The compressed structure of the tree (per leaf, not per row), or None."""
        from ._structure import structure_of

        return structure_of(self.treedef, lambda: self.key_paths)

    @functools.cached_property
    def shapes(self) -> list[tuple[int, ...] | None]:
        """Static shape of each array-like row (has `shape` and `dtype`), else None."""
        return [shape_of(leaf) for leaf in self.leaves]

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

    @property
    def num_leaves(self) -> int:
        return self.treedef.num_leaves

    def rows_of(self, per_leaf: np.ndarray) -> np.ndarray:
        """Spread one value per leaf to one value per row."""
        return per_leaf if self.origin is None else per_leaf[self.origin]

    @property
    def leaf_paths(self) -> list[str]:
        """One path per leaf (a stacked leaf's path has no layer index)."""
        return self.paths if self.stacked_paths is None else self.stacked_paths

    def leaf_rows(self) -> list[tuple[int, tuple[int, ...]]]:
        """Per leaf: its first row and its stack shape (`()` when not stacked)."""
        return [(i, ()) for i in range(len(self))] if self.slices is None else list(self.slices)

    def close_subtrees(self, path: str) -> str:
        """` Close matches: a, b.` from the paths of the inner nodes, or ``."""
        from ._errors import suggest

        close = suggest(path, sorted({".".join(r[:n]) for r in self.rendered for n in range(1, len(r))}))
        return f" Close matches: {', '.join(close)}." if close else ""

    def per_leaf(self, values: list[Any], merge: Any) -> list[Any]:
        """One value per leaf from one value per row: `merge(first_row, row_values,
        stack_shape)` turns the rows of a stacked leaf into one value."""
        if self.slices is None:
            return values
        return [
            values[start] if not stack else merge(start, values[start : start + math.prod(stack)], stack)
            for start, stack in self.slices
        ]

    def unflatten(self, per_leaf: list[Any]) -> Any:
        return jtu.tree_unflatten(self.treedef, per_leaf)


def shape_of(leaf: Any) -> tuple[int, ...] | None:
    """The static shape of an array-like leaf (with `shape` and `dtype`), else None."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else None


def paths(tree: Any, *, stacked: Any = None) -> list[str]:
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
        stacked: `{path: axes}` for subtrees whose leaves carry leading
            stacked layer axes; each such leaf then shows one path per layer
            (`blocks.0.attn.weight`, `blocks.1.attn.weight`, ...).

    Returns:
        A list of `str`, one per leaf (per layer slice under `stacked`).

    Examples:
        >>> import treeglob
        >>> treeglob.paths({"params": {"conv.1": {"kernel": 1}, "head": [2, 3]}, "x": None})
        ['params."conv.1".kernel', 'params.head.0', 'params.head.1']
        >>> treeglob.paths(5)
        ['']
    """
    return TreeView.of(tree, stacked).paths

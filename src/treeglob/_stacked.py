"""Stacked layers: subtrees whose leaves hold a whole stack of layers.

A model built with `eqx.filter_vmap` (and run with `lax.scan`) keeps all its
blocks in one module whose array leaves carry leading layer axes:
`blocks.attn.weight` has shape `(L, d, d)`. Declaring `stacked={"blocks": 1}`
makes treeglob see that leaf as `L` rows `blocks.0.attn.weight`, ...,
`blocks.{L-1}.attn.weight` of shape `(d, d)`: exactly the paths and shapes of
the same model built with a list of blocks. Patterns, `ndim` and `shape`
therefore work unchanged on both, and index patterns can address layers
inside a stacked leaf. The rows of one leaf are merged back into one value
per leaf when the result is built (see `_rules.py`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ._paths import TreeView, shape_of, split_path
from ._report import same_label

__all__ = ["expand"]


def _check_declaration(stacked: Any) -> list[tuple[str, tuple[str, ...], int]]:
    if not isinstance(stacked, Mapping):
        raise TypeError(
            f"stacked must be a dict {{path: number of leading axes}}, e.g. {{'blocks': 1}}, got "
            f"{type(stacked).__name__}: {stacked!r}."
        )
    out = []
    for path, axes in stacked.items():
        if not isinstance(path, str):
            raise TypeError(
                f"stacked: the key {path!r} must be the path of a subtree as a string, e.g. 'blocks'."
            )
        if not (isinstance(axes, int) and not isinstance(axes, bool) and axes >= 1):
            raise TypeError(
                f"stacked[{path!r}] is {axes!r}; it must be the number of leading stacked axes, an int >= 1."
            )
        out.append((path, split_path(path), axes))
    for (a, sa, _), (b, sb, _) in itertools.permutations(out, 2):
        if sb[: len(sa)] == sa:
            raise ValueError(
                f"stacked declares both {a!r} and {b!r}, which lies inside it. Declare the outer "
                "subtree with the total number of leading axes instead."
            )
    return out


def expand(view: TreeView, stacked: Any) -> TreeView:
    """The view with one row per layer slice of each leaf under a stacked subtree."""
    declared = _check_declaration(stacked)
    stack_of: list[tuple[int, tuple[int, ...]]] = [(0, ())] * len(view)  # per leaf: (prefix length, stack)
    for path, prefix, axes in declared:
        members = [i for i, r in enumerate(view.rendered) if r[: len(prefix)] == prefix]
        if not members:
            raise ValueError(
                f"stacked names the subtree {path!r}, which is not in the tree.{view.close_subtrees(path)} "
                "Give the path of "
                "the stacked node as treeglob.paths() prints it, e.g. {'blocks': 1}."
            )
        arrays = [i for i in members if view.shapes[i] is not None]
        if not arrays:
            raise ValueError(
                f"stacked subtree {path!r} holds no array leaf to take the number of layers from."
            )
        for i in arrays:
            if len(view.shapes[i]) < axes:
                raise ValueError(
                    f"stacked={{{path!r}: {axes}}}: {view.paths[i]} has shape {view.shapes[i]}, fewer than "
                    f"{axes} axes, so it cannot hold a stack of layers. Check the number of stacked axes."
                )
        first = arrays[0]
        stack = view.shapes[first][:axes]
        for i in arrays:
            if view.shapes[i][:axes] != stack:
                raise ValueError(
                    f"stacked={{{path!r}: {axes}}} needs every array under {path!r} to have the same "
                    f"leading {'axis' if axes == 1 else f'{axes} axes'} (the layers): {view.paths[first]} has "
                    f"shape {view.shapes[first]} but "
                    f"{view.paths[i]} has shape {view.shapes[i]}. Check the number of stacked axes, or "
                    "declare a smaller subtree."
                )
        for i in members:
            stack_of[i] = (len(prefix), stack)

    leaves, segments, rendered, origin, slices = [], [], [], [], []
    for i, (n, stack) in enumerate(stack_of):
        slices.append((len(leaves), stack))
        if not stack:
            leaves.append(view.leaves[i])
            segments.append(view.segments[i])
            rendered.append(view.rendered[i])
            origin.append(i)
            continue
        leaf, shape = view.leaves[i], shape_of(view.leaves[i])
        # A slice is described by its shape and dtype; non-array leaves
        # (shared by every layer) appear unchanged in each row.
        row_leaf = leaf if shape is None else jax.ShapeDtypeStruct(shape[len(stack) :], leaf.dtype)
        segs, rend = view.segments[i], view.rendered[i]
        for index in np.ndindex(*stack):
            digits = tuple(str(k) for k in index)
            leaves.append(row_leaf)
            segments.append(segs[:n] + digits + segs[n:])
            rendered.append(rend[:n] + digits + rend[n:])
            origin.append(i)
    return TreeView(
        view.tree,
        view.treedef,
        leaves,
        row_keys=(segments, rendered),
        origin=np.asarray(origin),
        slices=tuple(slices),
        stacked_paths=view.paths,
        tree_leaves=view.leaves,
    )


def describe_layers(stack: tuple[int, ...], rows: np.ndarray) -> str:
    """`0, 1, 5` or `(0, 1), (2, 0)`: the layer indices of the selected rows."""
    indices = list(itertools.compress(np.ndindex(*stack), rows))
    text = [str(i[0]) if len(i) == 1 else str(i) for i in indices[:12]]
    more = f", ... ({len(indices)} of {math.prod(stack)})" if len(indices) > 12 else ""
    return ", ".join(text) + more


def _layers_of(view: TreeView, start: int) -> str:
    return f"the stacked leaf {view.leaf_paths[int(view.origin[start])]}"


def _all_equal(values: list[Any]) -> bool:
    return all(same_label(v, values[0]) for v in values[1:])


def merge_mask(view: TreeView):
    """A Python-bool mask holds one value per leaf: refuse to split a stacked leaf."""

    def merge(start: int, values: list[bool], stack: tuple[int, ...]) -> bool:
        if _all_equal(values):
            return values[0]
        raise ValueError(
            f"mask() cannot split {_layers_of(view, start)}: the selector picks layers "
            f"{describe_layers(stack, np.asarray(values))} of it, and a Python-bool mask holds one value "
            "per leaf. For per-layer values use treeglob.labels(..., stacked=...) with numeric labels "
            "(they become per-layer arrays), or treeglob.freeze(..., stacked=...) to freeze single layers."
        )

    return merge


def merge_labels(view: TreeView):
    """Equal labels merge to one; differing numeric labels become a per-slice array.

    The array has shape `stack + (1,) * (per-layer ndim)`, so it broadcasts
    against the leaf: multiplying the leaf's update by it scales each layer.
    """

    def merge(start: int, values: list[Any], stack: tuple[int, ...]) -> Any:
        if _all_equal(values):
            return values[0]
        row_shape = view.shapes[start]
        numeric = all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values)
        if row_shape is None or not numeric:
            shown = ", ".join(repr(v) for v in dict.fromkeys(values))
            raise ValueError(
                f"The rules give different labels ({shown}) to the layers of "
                f"{_layers_of(view, start)}. A label tree holds one label per leaf; only "
                "numeric labels on array leaves can differ per layer (they become per-layer arrays). "
                "Give all layers of a stacked leaf the same label, or use numbers (e.g. 0.0 / 1.0 "
                "factors, see treeglob.freeze)."
            )
        return np.asarray(values).reshape(stack + (1,) * len(row_shape))

    return merge

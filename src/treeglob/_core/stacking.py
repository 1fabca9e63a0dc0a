"""Stacked layers as a rewrite of the structure.

A model built with `eqx.filter_vmap` (and run with `lax.scan`) keeps all its
blocks in one module whose array leaves carry leading layer axes:
`blocks.attn.weight` has shape `(L, d, d)`. Declaring `stacked={"blocks": 1}`
replaces the node `blocks` of the structure by a node with `L` children
`0`, ..., `L-1` that all share the block's structure, exactly as in the same
model built with a list of blocks. Globs, `inside`, `owned_by` and every
recipe then walk the unstacked model's paths through the one memoised walk,
and `ndim` / `shape` see the per-layer shapes. Each stacked leaf becomes one
*row* per layer; rows are merged back into one value per leaf at the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import suggest
from .keys import quote, split_path
from .structure import Node, find, inner_paths

__all__ = ["Layers", "Stack", "close_subtrees", "row_origin", "stack_structure"]


class Layers:
    """The node type of the layer index a stacked declaration inserts (not a user type)."""


@dataclass(frozen=True)
class Stack:
    """One stacked subtree: its leaves `[first_leaf, first_leaf + num_leaves)`, the stack
    shape (the leading layer axes), and its first row."""

    path: str
    first_leaf: int
    num_leaves: int
    shape: tuple[int, ...]
    first_row: int = 0


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


def close_subtrees(root: Node, path: str) -> str:
    """` Close matches: a, b.` among the paths of the inner nodes, or ``."""
    close = suggest(path, sorted(".".join(map(quote, p)) for p in inner_paths(root)))
    return f" Close matches: {', '.join(close)}." if close else ""


def _layers(node: Node, stack: tuple[int, ...]) -> Node:
    """`node` repeated along `stack`, indexed by the layer number (one segment per axis)."""
    for size in reversed(stack):
        node = Node(Layers, size * node.n, tuple((str(i), node) for i in range(size)))
    return node


def _replace(ancestors: list[tuple[Node, int]], new: Node, grown: int) -> Node:
    """Path copying: rebuild the ancestors of a replaced node, `grown` rows larger."""
    for parent, k in reversed(ancestors):
        children = list(parent.children)
        children[k] = (children[k][0], new)
        new = Node(parent.kind, parent.n + grown, tuple(children))
    return new


def stack_structure(
    root: Node,
    stacked: Any,
    shapes: list[tuple[int, ...] | None],
    leaf_path: Callable[[int], str],
) -> tuple[Node, tuple[Stack, ...]]:
    """The structure with each declared subtree replaced by its layers, and the stacks.

    `shapes` are the leaves' shapes (None for non-arrays), `leaf_path(i)` the
    printed path of leaf `i`, for messages. `root` must be unstacked (rows are leaves).
    """
    found = []
    for path, segments, axes in _check_declaration(stacked):
        hit = find(root, segments)
        if hit is None:
            raise ValueError(
                f"stacked names the subtree {path!r}, which is not in the tree.{close_subtrees(root, path)} "
                "Give the path of the stacked node as treeglob.paths() prints it, e.g. {'blocks': 1}."
            )
        _, node, first = hit
        members = range(first, first + node.n)
        arrays = [i for i in members if shapes[i] is not None]
        if not arrays:
            raise ValueError(
                f"stacked subtree {path!r} holds no array leaf to take the number of layers from."
            )
        first_array, stack = arrays[0], None
        for i in arrays:
            shape = shapes[i]
            assert shape is not None
            if len(shape) < axes:
                raise ValueError(
                    f"stacked={{{path!r}: {axes}}}: {leaf_path(i)} has shape {shape}, fewer than "
                    f"{axes} axes, so it cannot hold a stack of layers. Check the number of stacked axes."
                )
            if stack is None:
                stack = shape[:axes]
            elif shape[:axes] != stack:
                raise ValueError(
                    f"stacked={{{path!r}: {axes}}} needs every array under {path!r} to have the same "
                    f"leading {'axis' if axes == 1 else f'{axes} axes'} (the layers): {leaf_path(first_array)} "
                    f"has shape {shapes[first_array]} but {leaf_path(i)} has shape {shape}. Check the number "
                    "of stacked axes, or declare a smaller subtree."
                )
        assert stack is not None
        found.append(Stack(path, first, node.n, stack))
    stacks, extra = [], 0
    for s in sorted(found, key=lambda s: s.first_leaf):
        ancestors, node, _ = find(root, split_path(s.path)) or ([], root, 0)
        layered = _layers(node, s.shape)
        root = layered if not ancestors else _replace(ancestors, layered, layered.n - node.n)
        stacks.append(Stack(s.path, s.first_leaf, s.num_leaves, s.shape, s.first_leaf + extra))
        extra += layered.n - node.n
    return root, tuple(stacks)


def describe_layers(stack: tuple[int, ...], selected: list[bool]) -> str:
    """`0, 1, 5` or `(0, 1), (2, 0)`: the indices of the selected layers of a stack of
    shape `stack` (`selected` in `np.ndindex` order), the first 12 and then a count."""
    indices = list(itertools.compress(np.ndindex(*stack), selected))
    text = [str(i[0]) if len(i) == 1 else str(i) for i in indices[:12]]
    more = f", ... ({len(indices)} of {math.prod(stack)})" if len(indices) > 12 else ""
    return ", ".join(text) + more


def row_origin(num_leaves: int, stacks: tuple[Stack, ...]) -> np.ndarray:
    """Per row: the index of the leaf it comes from (layer-major inside a stack)."""
    parts, leaf = [], 0
    for s in stacks:
        parts.append(np.arange(leaf, s.first_leaf))
        layers = int(np.prod(s.shape))
        parts.append(np.tile(np.arange(s.first_leaf, s.first_leaf + s.num_leaves), layers))
        leaf = s.first_leaf + s.num_leaves
    parts.append(np.arange(leaf, num_leaves))
    return np.concatenate(parts).astype(np.intp)

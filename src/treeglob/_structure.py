"""The tree's structure, compressed to one node per distinct subtree shape, and walks over it.

Equal treedefs have equal keys and equal node types, so whatever depends
only on keys and node types (path globs, `inside`, `owned_by`) is computed
once per distinct subtree and reused: the 1000 identical blocks of a
Transformer cost one evaluation, not 1000, which keeps selection close to
the cost of flattening the tree. Built from the treedef alone; the keys of
a node's children come from flattening a one-level copy of it. Every walk
is iterative, so a tree as deep as JAX can flatten is walked too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax.tree_util as jtu

from ._keys import key_text

__all__ = ["LEAF", "Node", "find", "inner_paths", "row_segments", "structure_of", "walk"]


class Node:
    """One distinct subtree: its node type, its row count, its children that hold rows.

    Rows are the leaves, except where stacked layers are declared (a
    stacked subtree holds one row per leaf and layer, see `_stacking.py`).
    """

    __slots__ = ("children", "kind", "n")

    def __init__(self, kind: type | None, n: int, children: tuple[tuple[str, Node], ...]):
        self.kind = kind
        self.n = n
        self.children = children  # (raw segment text, child); children without leaves are left out

    def is_a(self, classes: tuple[type, ...]) -> bool:
        """Whether this node is an instance of one of `classes` (a leaf never is)."""
        return self.kind is not None and issubclass(self.kind, classes)


LEAF = Node(None, 1, ())
_ONE_LEAF = jtu.tree_structure(0)


def _get(memo: dict[Any, Any], key: Any) -> Any:
    # A treedef whose node metadata holds an array (a `pytree_node=False` field
    # with a NumPy value) cannot be hashed or compared: it is simply not shared.
    try:
        return memo.get(key)
    except Exception:
        return None


def _put(memo: dict[Any, Any], key: Any, value: Any) -> None:
    try:
        memo[key] = value
    except Exception:
        pass


def _is_leaf(td: Any) -> bool:
    return td.num_nodes == 1 and td.num_leaves == 1


def _child_keys(td: Any, children: list[Any], offset: int, depth: int, key_paths: Callable[[], list]) -> list:
    """The segment of each child, from a one-level copy of the node rebuilt with placeholder
    leaves; a custom node that refuses placeholders gives them through the leaves' key paths."""
    try:
        one_level = jtu.PyTreeDef.from_node_data_and_children(
            jtu.default_registry, td.node_data(), [_ONE_LEAF] * len(children)
        )
        flat = jtu.tree_flatten_with_path(one_level.unflatten(range(len(children))))[0]
        if len(flat) == len(children):
            return [key_text(path[0]) for path, _ in flat]
    except Exception:
        pass
    keys, start = [], offset
    for child in children:
        keys.append(key_text(key_paths()[start][depth]) if child.num_leaves else None)
        start += child.num_leaves
    return keys


def build(treedef: Any, key_paths: Callable[[], list]) -> Node:
    """The compressed structure of a treedef (iteratively, depth-first)."""
    if _is_leaf(treedef):
        return LEAF
    memo: dict[Any, Node] = {}

    def frame(td: Any, offset: int, depth: int, key: str | None) -> list[Any]:
        children = td.children()
        keys = _child_keys(td, children, offset, depth, key_paths)
        # td, depth, children, their keys, next child, the kept (key, node) pairs, its leaf offset, own key
        return [td, depth, children, keys, 0, [], offset, key]

    stack = [frame(treedef, 0, 0, None)]
    while True:
        top = stack[-1]
        td, depth, children, keys, i, kept, offset, _ = top
        descend = None
        while i < len(children):
            child, key = children[i], keys[i]
            i += 1
            if child.num_leaves:
                if _is_leaf(child):
                    kept.append((key, LEAF))
                else:
                    got = _get(memo, child)
                    if got is None:
                        descend = frame(child, offset, depth + 1, key)
                        offset += child.num_leaves
                        break
                    kept.append((key, got))
            offset += child.num_leaves
        top[4], top[6] = i, offset
        if descend is not None:
            stack.append(descend)
            continue
        node = Node(td.node_data()[0], td.num_leaves, tuple(kept))
        _put(memo, td, node)
        stack.pop()
        if not stack:
            return node
        stack[-1][5].append((top[7], node))


_CACHE: dict[Any, Node] = {}  # treedef -> structure, most recently used last
_CACHE_LOCK = threading.Lock()


def structure_of(treedef: Any, key_paths: Callable[[], list]) -> Node:
    """`build`, remembered for the last few treedefs: a training loop asks about the
    same tree again and again (every optax init and update)."""
    with _CACHE_LOCK:
        cached = _get(_CACHE, treedef)
    if cached is None:
        cached = build(treedef, key_paths)
        with _CACHE_LOCK:
            _put(_CACHE, treedef, cached)
            while len(_CACHE) > 8:
                del _CACHE[next(iter(_CACHE))]
    return cached


def walk(
    root: Node,
    state: Any,
    step: Callable[[Any, str, Node], Any],
    leaf_value: Callable[[Any], bool],
    whole: Callable[[Any], bool | None],
) -> list[bool]:
    """One bool per row, walking `state` down the structure.

    `step(state, segment, child)` gives a child's state, `leaf_value(state)`
    the value of a leaf reached in `state`, and `whole(state)` a value shared
    by every row below (or None to keep walking). Each (node, state) pair is
    visited once; identical subtrees reached in the same state reuse the result.
    """
    memo: dict[tuple[int, Any], list[bool]] = {}

    def known(node: Node, state: Any) -> list[bool] | None:
        got = memo.get((id(node), state))
        if got is None:
            shared = whole(state)
            if shared is not None:
                got = memo[(id(node), state)] = [shared] * node.n
            elif node is LEAF:
                got = [leaf_value(state)]
        return got

    first = known(root, state)
    if first is not None:
        return first
    stack: list[list[Any]] = [[root, state, 0, []]]  # node, state, next child, rows so far
    while True:
        top = stack[-1]
        node, state, i, out = top
        children = node.children
        descend = None
        while i < len(children):
            segment, child = children[i]
            i += 1
            child_state = step(state, segment, child)
            got = known(child, child_state)
            if got is None:
                descend = [child, child_state, 0, []]
                break
            out += got
        if descend is not None:
            top[2] = i
            stack.append(descend)
            continue
        memo[(id(node), state)] = out
        stack.pop()
        if not stack:
            return out
        stack[-1][3] += out


def row_segments(root: Node) -> list[tuple[str, ...]]:
    """The raw segments of every row, in row order."""
    out: list[tuple[str, ...]] = []
    stack: list[tuple[Node, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, prefix = stack.pop()
        if node is LEAF:
            out.append(prefix)
        else:
            stack.extend((child, prefix + (segment,)) for segment, child in reversed(node.children))
    return out


def inner_paths(root: Node) -> list[tuple[str, ...]]:
    """The raw segments of every inner node below the root (for close-match suggestions)."""
    out: list[tuple[str, ...]] = []
    stack: list[tuple[Node, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, prefix = stack.pop()
        if prefix and node is not LEAF:
            out.append(prefix)
        stack.extend((child, prefix + (segment,)) for segment, child in node.children)
    return out


def find(root: Node, segments: Sequence[str]) -> tuple[list[tuple[Node, int]], Node, int] | None:
    """The node at `segments` and its first row, with the ancestors passed on the way
    (each with the index of the child taken), or None when there is no such node."""
    node, row, ancestors = root, 0, []
    for segment in segments:
        for k, (name, child) in enumerate(node.children):
            if name == segment:
                ancestors.append((node, k))
                node = child
                break
            row += child.n
        else:
            return None
    return ancestors, node, row

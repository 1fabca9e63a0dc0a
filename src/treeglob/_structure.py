"""The tree's structure, compressed to one node per distinct subtree shape.

Equal treedefs have equal keys and equal node types, so whatever depends
only on keys and node types (path globs, `inside`, `owned_by`) is computed
once per distinct subtree and reused: the 1000 identical blocks of a
Transformer cost one evaluation, not 1000, which keeps selection close to
the cost of flattening the tree. Built from the treedef alone; the keys of
a node's children come from flattening a one-level copy of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu

from ._paths import render_key

__all__ = ["LEAF", "Node", "build", "per_leaf", "structure_of"]


class Node:
    """One distinct subtree: its node type, its leaf count, its children with leaves."""

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


def build(treedef: Any, key_paths: Callable[[], list[tuple[Any, ...]]]) -> Node | None:
    """The compressed structure, or None for a tree nested too deep to walk recursively.

    The keys of a node's children come from flattening a one-level copy of
    the node rebuilt with placeholder leaves; a custom node that refuses
    placeholders takes them from `key_paths()` (the leaves' key paths) instead.
    """
    memo: dict[Any, Node] = {}

    def node(td: Any, offset: int, depth: int) -> Node:
        got = memo.get(td)
        if got is None:
            got = memo[td] = make(td, offset, depth)
        return got

    def make(td: Any, offset: int, depth: int) -> Node:
        if td.num_nodes == 1 and td.num_leaves == 1:
            return LEAF
        children = td.children()
        try:
            one_level = jtu.PyTreeDef.from_node_data_and_children(
                jtu.default_registry, td.node_data(), [_ONE_LEAF] * len(children)
            )
            flat = jtu.tree_flatten_with_path(one_level.unflatten(range(len(children))))[0]
            keys = [path[0] for path, _ in flat]
        except Exception:
            keys, start = [], offset
            for child in children:
                keys.append(key_paths()[start][depth] if child.num_leaves else None)
                start += child.num_leaves
        kept, start = [], offset
        for key, child in zip(keys, children, strict=True):
            if child.num_leaves:
                kept.append((render_key(key)[0], node(child, start, depth + 1)))
            start += child.num_leaves
        return Node(td.node_data()[0], td.num_leaves, tuple(kept))

    try:
        return node(treedef, 0, 0)
    except RecursionError:
        return None


_CACHE: dict[Any, Node | None] = {}  # treedef -> structure, most recently used last
_CACHE_LOCK = threading.Lock()


def structure_of(treedef: Any, key_paths: Callable[[], list[tuple[Any, ...]]]) -> Node | None:
    """`build`, remembered for the last few treedefs: a training loop asks about the
    same tree again and again (every optax init and update)."""
    with _CACHE_LOCK:
        cached = _CACHE.pop(treedef, None)
    if cached is None:
        cached = build(treedef, key_paths)
    with _CACHE_LOCK:
        _CACHE[treedef] = cached
        while len(_CACHE) > 8:
            del _CACHE[next(iter(_CACHE))]
    return cached


def per_leaf(
    root: Node,
    state: Any,
    step: Callable[[Any, str, Node], Any],
    leaf_value: Callable[[Any], bool],
    whole: Callable[[Any], bool | None],
) -> list[bool]:
    """One bool per leaf, walking `state` down the structure.

    `step(state, segment, child)` gives a child's state, `leaf_value(state)` the value
    of a leaf reached in `state`, and `whole(state)` a value shared by every
    leaf below (or None to keep walking). Each (node, state) pair is visited
    once; identical subtrees reached in the same state reuse the result.
    """
    memo: dict[tuple[int, Any], list[bool]] = {}

    def visit(node: Node, state: Any) -> list[bool]:
        key = (id(node), state)
        got = memo.get(key)
        if got is not None:
            return got
        shared = whole(state)
        if shared is not None:
            out = [shared] * node.n
        elif node is LEAF:
            out = [leaf_value(state)]
        else:
            out = []
            for segment, child in node.children:
                child_state = step(state, segment, child)
                if child is LEAF and whole(child_state) is None:
                    out.append(leaf_value(child_state))
                else:
                    out += visit(child, child_state)
        memo[key] = out
        return out

    return visit(root, state)

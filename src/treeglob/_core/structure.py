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

from .frameworks import KEY_SEPARATOR, is_wrapper, label_segments
from .keys import key_text, quote, split_path

__all__ = [
    "LEAF",
    "ONE_LEVEL",
    "Node",
    "find",
    "find_nodes",
    "inner_paths",
    "kinds",
    "remember",
    "row_paths",
    "row_segments",
    "structure_of",
    "walk",
]


class Node:
    """One distinct subtree: its node type, its row count, its children that hold rows.

    Rows are the leaves, except where stacked layers are declared (a
    stacked subtree holds one row per leaf and layer, see `stacking.py`).
    A node without children is a leaf: `LEAF`, or a *wrapped* leaf, whose
    `kind` is the wrapper type it sits in (an NNX Variable) and which adds
    no segment to its path.
    """

    __slots__ = ("children", "kind", "memo", "n")

    def __init__(self, kind: type | None, n: int, children: tuple[tuple[str, Node], ...]):
        self.kind = kind
        self.n = n
        self.children = children  # (raw segment text, child); children without leaves are left out
        self.memo: dict[Any, Any] | None = None  # see `remember`; only ever filled on a root

    def is_a(self, classes: tuple[type, ...]) -> bool:
        """Whether this node is an instance of one of `classes` (a plain leaf never is)."""
        return self.kind is not None and issubclass(self.kind, classes)


LEAF = Node(None, 1, ())
_ONE_LEAF = jtu.tree_structure(0)
#: Builds a one-level treedef from a node's data: named so from jax 0.8 on, `make_...`
#: before 0.7; jax 0.7 has neither, and the keys then come from the leaves' key paths.
ONE_LEVEL = getattr(jtu.PyTreeDef, "from_node_data_and_children", None) or getattr(
    jtu.PyTreeDef, "make_from_node_data_and_children", None
)


def _label_key(td: Any, key: Any) -> Any:
    """A wrapper's key: its own label as segments where its framework gives one (penzai)."""
    data = td.node_data()
    segments = label_segments(data[0], data)
    return key if segments is None else jtu.DictKey(segments)


_WRAPPED: dict[type, Node] = {}


def _wrapped(kind: type) -> Node:
    node = _WRAPPED.get(kind)
    if node is None:
        node = _WRAPPED[kind] = Node(kind, 1, ())
    return node


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
    """The JAX key of each child, from a one-level copy of the node rebuilt with placeholder
    leaves; a custom node that refuses placeholders gives them through the leaves' key paths."""
    data = td.node_data()
    if data[0] is dict:  # the common case, and the big one (a checkpoint's flat dict): its sorted keys
        return [jtu.DictKey(k) for k in data[1]]
    try:
        assert ONE_LEVEL is not None
        one_level = ONE_LEVEL(jtu.default_registry, td.node_data(), [_ONE_LEAF] * len(children))
        flat = jtu.tree_flatten_with_path(one_level.unflatten(range(len(children))))[0]
        if len(flat) == len(children):
            return [path[0] for path, _ in flat]
    except Exception:
        pass
    keys, start = [], offset
    for child in children:
        keys.append(key_paths()[start][depth] if child.num_leaves else None)
        start += child.num_leaves
    return keys


# ----------------------------------------------------------------------------
# Dict keys that are paths themselves: split into segments


def _key_parts(key: Any, flat: bool) -> tuple[str, ...] | None:
    """The segments a dict key stands for, or None to keep it one segment: a tuple
    key (`flatten_dict`), a `/`-joined name (Haiku modules, `flatten_dict(sep="/")`),
    and in a flat dict of leaves a dotted name (a checkpoint's tensor names)."""
    raw = key.key if isinstance(key, jtu.DictKey) else None
    if isinstance(raw, tuple) and raw:
        parts = tuple(key_text(jtu.DictKey(k)) for k in raw)
    elif isinstance(raw, str) and flat and '"' in raw:
        parts = split_path(raw)  # a printed path with quoted segments, as `treeglob.save` writes
    elif isinstance(raw, str) and (KEY_SEPARATOR in raw or (flat and "." in raw)):
        parts = tuple(
            (raw.replace(KEY_SEPARATOR, ".") if flat else raw).split("." if flat else KEY_SEPARATOR)
        )
    else:
        return None
    return parts if all(parts) else None


def _children(kind: type | None, kept: list[tuple[Any, Node]]) -> tuple[tuple[str, Node], ...]:
    """A node's (segment, child) pairs; dict keys that are paths become nested segments.

    Rows stay in leaf order: a key joins the group of the key before it where
    their first segments agree, and a group that is not contiguous (penzai's
    LoRA labels placed between a block's labels) appears again further on, the
    same segment twice among siblings. A key that is a path may also enter a
    subtree kept under a plain key (Haiku: `vit` holds the module's own
    parameters, `vit/block_0/fc1` a submodule's). Where splitting would make two
    paths collide (`a.b` beside `a`, the same path twice), the keys stay whole
    (and print quoted), so paths stay unique.
    """
    whole = tuple((key_text(key), node) for key, node in kept)
    flat = all(not node.children for _, node in kept)
    parts = [_key_parts(key, flat) for key, _ in kept]
    if not any(parts):
        return whole
    root: list[Any] = []  # entries [segment, list of entries (a group) or Node]
    inner: dict[tuple[str, ...], bool] = {}  # every path placed so far -> whether rows lie below it
    for split, (text, node) in zip(parts, whole, strict=True):
        segments = split or (text,)
        level: list[Any] = root
        path: tuple[str, ...] = ()
        for segment in segments[:-1]:
            path += (segment,)
            if inner.get(path) is False:
                return whole  # under a leaf
            last: Any = level[-1] if level else None
            if last is None or last[0] != segment:
                last = [segment, []]  # a new group, or a second run of one seen before
                level.append(last)
                inner[path] = True
            elif isinstance(last[1], Node):
                if last[1].kind is not kind:
                    return whole  # a module's subtree is not a group of keys: keep its type
                last[1] = list(map(list, last[1].children))  # a subtree under a plain key: open it
            level = last[1]
        path += (segments[-1],)
        if path in inner:
            return whole  # the same path twice, or a leaf where a subtree is
        inner[path] = bool(node.children)
        if node.children:
            _register(node, path, inner)
        level.append([segments[-1], node])
    return _nodes(kind, root)


def _register(node: Node, path: tuple[str, ...], inner: dict[tuple[str, ...], bool]) -> None:
    """Record every path below `node` (placed at `path`), so that keys placed later cannot collide."""
    stack = [(node, path)]
    while stack:
        node, prefix = stack.pop()
        for segment, child in node.children:
            inner[prefix + (segment,)] = bool(child.children)
            stack.append((child, prefix + (segment,)))


def _nodes(
    kind: type | None,
    entries: list[list[Any]],
    shared: dict[tuple[tuple[str, Node], ...], Node] | None = None,
) -> tuple[tuple[str, Node], ...]:
    """The entries' nodes; equal subtrees are one `Node` (`shared`), as equal treedefs are in
    `build`: the 1000 blocks of a checkpoint's flat dict are walked once, not 1000 times."""
    shared = {} if shared is None else shared
    out = []
    for segment, below in entries:
        if isinstance(below, list):
            children = _nodes(kind, below, shared)
            # The children are shared already, so equal subtrees have identical children
            # (a Node hashes and compares by identity).
            node = shared.get(children)
            if node is None:
                node = shared[children] = Node(kind, sum(n.n for _, n in children), children)
            below = node
        out.append((segment, below))
    return tuple(out)


def build(treedef: Any, key_paths: Callable[[], list]) -> Node:
    """The compressed structure of a treedef (iteratively, depth-first)."""
    if _is_leaf(treedef):
        return LEAF
    memo: dict[Any, Node] = {}

    def frame(td: Any, offset: int, depth: int, key: Any) -> list[Any]:
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
                elif child.num_leaves == 1 and is_wrapper(child.node_data()[0]):
                    kept.append((_label_key(child, key), _wrapped(child.node_data()[0])))
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
        kind = td.node_data()[0]
        node = Node(kind, td.num_leaves, _children(kind, kept))
        _put(memo, td, node)
        stack.pop()
        if not stack:
            return node
        stack[-1][5].append((top[7], node))


_CACHE: dict[Any, Node] = {}  # treedef -> structure, most recently used last
_CACHE_LOCK = threading.Lock()
_LATEST: Node | None = None  # the last entry of _CACHE (looking it up would hash its treedef again)


def structure_of(treedef: Any, key_paths: Callable[[], list]) -> Node:
    """`build`, remembered for the last few treedefs: a training loop asks about the
    same tree again and again (every optax init and update)."""
    global _LATEST
    with _CACHE_LOCK:
        cached = _get(_CACHE, treedef)
        # Most recently used: to the end. Moving costs two more comparisons of
        # the whole treedef (9 ms for a 12k-leaf NNX State), so a hit that is
        # already last, the usual one in a training loop, stays where it is.
        if cached is not None and cached is not _LATEST:
            _CACHE[treedef] = _CACHE.pop(treedef)
            _LATEST = cached
    if cached is None:
        cached = build(treedef, key_paths)
        with _CACHE_LOCK:
            _put(_CACHE, treedef, cached)
            _LATEST = cached
            while len(_CACHE) > 8:
                del _CACHE[next(iter(_CACHE))]
    return cached


_MEMO_SIZE = 128


def remember(root: Node, key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, remembered on `root` under `key` (the last 128 keys).

    For what depends on the structure alone: the rows a glob, `inside` or
    `owned_by` selects, the treedef of the outputs. A structure is shared by
    every tree of the same treedef (`structure_of`), so a training loop that
    asks the same question of the same tree at every step computes the answer
    once; the memo goes with the structure when the cache drops it. Keys are
    values that compare by what they say (a selector), never identities.
    """
    memo = root.memo
    if memo is not None:
        got = memo.get(key, _ABSENT)
        if got is not _ABSENT:
            return got
    value = compute()
    with _CACHE_LOCK:
        if root.memo is None:
            root.memo = {}
        root.memo[key] = value
        while len(root.memo) > _MEMO_SIZE:
            del root.memo[next(iter(root.memo))]
    return value


_ABSENT = object()


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
            elif not node.children:  # a leaf (or an empty root)
                got = [leaf_value(state)] * node.n
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
        if not node.children:
            out += [prefix] * node.n
        else:
            stack.extend((child, prefix + (segment,)) for segment, child in reversed(node.children))
    return out


def row_paths(root: Node) -> list[str]:
    """The printed path of every row, in row order: `row_segments` quoted and joined with
    ".", built prefix by prefix; a subtree met more than once (a model's blocks) renders its
    own paths once, and each place it appears prefixes them."""
    return _paths_below(root, _shared(root), {})


def _shared(root: Node) -> set[int]:
    """The inner nodes that are the child of more than one parent, or twice of one."""
    seen, shared, stack = {id(root)}, set(), [root]
    while stack:
        for _, child in stack.pop().children:
            if child.children:
                if id(child) in seen:
                    shared.add(id(child))
                else:
                    seen.add(id(child))
                    stack.append(child)
    return shared


def _paths_below(top: Node, shared: set[int], memo: dict[int, list[str]]) -> list[str]:
    # Recursion only into shared subtrees: nesting k of them takes 2**k rows, so it stays shallow.
    out: list[str] = []
    stack: list[tuple[Node, str]] = [(top, "")]
    while stack:
        node, prefix = stack.pop()
        if not node.children:
            out += [prefix] * node.n
        elif prefix and id(node) in shared:
            below = memo.get(id(node))
            if below is None:
                below = memo[id(node)] = _paths_below(node, shared, memo)
            out += [f"{prefix}.{path}" for path in below]
        else:
            stack.extend(
                (child, f"{prefix}.{quote(segment)}" if prefix else quote(segment))
                for segment, child in reversed(node.children)
            )
    return out


def inner_paths(root: Node) -> list[tuple[str, ...]]:
    """The raw segments of every inner node below the root (for close-match suggestions)."""
    out: list[tuple[str, ...]] = []
    stack: list[tuple[Node, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, prefix = stack.pop()
        if prefix and node.children:
            out.append(prefix)
        stack.extend((child, prefix + (segment,)) for segment, child in node.children)
    return out


def kinds(root: Node) -> tuple[set[type], set[str]]:
    """The types of the inner nodes and wrappers of a structure, and the distinct segment
    texts below it (each distinct subtree walked once)."""
    types, segments, seen, stack = set(), set(), set(), [root]
    while stack:
        node = stack.pop()
        if node.kind is not None:
            types.add(node.kind)
        for segment, child in node.children:
            segments.add(segment)
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return types, segments


def find_nodes(root: Node, glob: Any) -> list[tuple[tuple[str, ...], Node]]:
    """The inner nodes whose whole path the compiled glob `glob` matches, with their raw
    segments, in row order; below a match the walk stops (the outermost match wins). A group
    that appears more than once among its siblings (see `_children`) is listed once."""
    found: list[tuple[tuple[str, ...], Node]] = []
    seen: set[tuple[str, ...]] = set()
    stack: list[tuple[Node, Any, tuple[str, ...]]] = [(root, glob.start(), ())]
    while stack:
        node, state, segments = stack.pop()
        if segments and glob.accepts(state):
            if segments not in seen:
                seen.add(segments)
                found.append((segments, node))
        elif node.children and not glob.dead(state):
            stack.extend(
                (child, glob.step(state, segment), (*segments, segment))
                for segment, child in reversed(node.children)
            )
    return found


def find(root: Node, segments: Sequence[str]) -> tuple[list[tuple[Node, int]], Node, int] | None:
    """The node at `segments` and its first row, with the ancestors passed on the way
    (each with the index of the child taken), or None when there is no such node.

    Raises:
        ValueError: the path names a group that appears more than once among its siblings
            (keys not contiguous in leaf order, see `_children`): no one node holds it.
    """
    node, row, ancestors = root, 0, []
    for depth, segment in enumerate(segments):
        for k, (name, child) in enumerate(node.children):
            if name == segment:
                if any(other == segment for other, _ in node.children[k + 1 :]):
                    where = ".".join(map(quote, segments[: depth + 1]))
                    raise ValueError(
                        f"{where} is not one subtree: its keys are not contiguous in the tree's leaf order "
                        "(another group's keys stand between them), so it appears more than once among its "
                        "siblings. Name a subtree inside it, or a pattern."
                    )
                ancestors.append((node, k))
                node = child
                break
            row += child.n
        else:
            return None
    return ancestors, node, row

"""Selecting inner nodes (modules, subtrees) instead of leaves.

A node is selected the way a leaf at its path would be, with two changes
that make a selector name the node itself rather than what lies below it:

* a glob must match a run of segments that ends at the node, as if it ended
  in `$`: `"attn"` selects the attention modules, not the projections inside
  them (`"^blocks.0"` still anchors at the root);
* a class (or `inside(...)`) selects a node that is an instance or lies
  inside one, `owned_by(...)` one whose parent is an instance.

Regexes match the whole path as for leaves, `where(fn)` calls
`fn(path, node)`, and the conditions on arrays (`ndim`, `shape`, `dtype`,
`size`) are refused: a node is not an array. The candidates are the nodes
that hold at least one leaf, except the wrappers that stand for one leaf
(an NNX Variable); the root counts, with the path `""`.

Under `stacked=`, a stacked subtree shows its layers as a list would: the
subtree (`blocks`, its type `Layers`), then per layer the layer
(`blocks.0`, of the stacked module's type) and the nodes inside it
(`blocks.0.attn`). A layer row stands for one slice of the stacked node.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax.tree_util as jtu
import numpy as np

from .frameworks import KEY_SEPARATOR, is_wrapper
from .keys import key_text, quote, split_path
from .selector import Context, Selector, coerce
from .stacking import Layers, Stack
from .structure import row_segments
from .tree import TreeView

__all__ = [
    "NESTED",
    "ModuleRow",
    "Modules",
    "NodeView",
    "check_nested",
    "one_level",
    "modules",
    "node_view",
    "selected_rows",
]

#: Which of nested matches a selection keeps, by the `nested=` value.
NESTED = {
    "outermost": "a match inside another match is left out (the enclosing one is kept)",
    "innermost": "a match that holds another match is left out (the innermost are kept)",
}


@dataclass(frozen=True)
class _Real:
    """One inner node of the tree as it is: its object, where it lies, and its leaves."""

    obj: Any
    keys: tuple[Any, ...]  # the JAX key path from the root
    positions: tuple[int, ...]  # the index of each of those keys among its node's children
    segments: tuple[str, ...]  # its path's segments (as the leaves below it print them)
    parent: int  # the index of the enclosing real node, -1 for the root
    num_leaves: int


def _segments_of(child: Any, key: Any, parent: tuple[str, ...], leaf: tuple[str, ...]) -> tuple[str, ...]:
    """A child's segments: what its first leaf's path has before the part the child adds
    itself (so split dict keys, `a/b`, read as they do for leaves), else its key's text."""
    within = row_segments(TreeView(child).leaf_structure)[0]
    cut = len(leaf) - len(within)
    if cut > len(parent) and leaf[: len(parent)] == parent and leaf[cut:] == within:
        return leaf[:cut]
    return (*parent, key_text(key))


def one_level(node: Any) -> tuple[list[tuple[tuple[Any], Any]], Any]:
    """A node's children with their keys, and the treedef that puts children back into it."""
    return jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)


def _real_nodes(tree: Any, leaf_segments: list[tuple[str, ...]]) -> list[_Real]:
    """Every inner node that holds a leaf, in pre-order (parents before children)."""
    out: list[_Real] = []
    if jtu.treedef_is_leaf(jtu.tree_structure(tree)) or is_wrapper(type(tree)):
        return out
    stack: list[tuple[Any, tuple[Any, ...], tuple[int, ...], tuple[str, ...], int, int]]
    stack = [(tree, (), (), (), -1, 0)]
    while stack:
        obj, keys, positions, segments, parent, first = stack.pop()
        num_leaves = jtu.tree_structure(obj).num_leaves
        here = len(out)
        out.append(_Real(obj, keys, positions, segments, parent, num_leaves))
        pending = []
        for position, ((key,), child) in enumerate(one_level(obj)[0]):
            n = jtu.tree_structure(child).num_leaves
            inner = n and not jtu.treedef_is_leaf(jtu.tree_structure(child)) and not is_wrapper(type(child))
            if inner:
                child_segments = _segments_of(child, key, segments, leaf_segments[first])
                pending.append((child, (*keys, key), (*positions, position), child_segments, here, first))
            first += n
        stack.extend(reversed(pending))
    return out


class NodeView:
    """The inner nodes of a tree as the rows a selector is evaluated on (see the module doc).

    Per row: `segments`, `paths`, `kinds` (the type), `parents` (the index of
    the enclosing row, -1 at the root), `row_leaves` (the node object: a
    stacked layer's row holds the whole stacked node), `layers` (the layer
    index of a stacked row, else None) and `real` (the row's `_Real`).
    """

    noun = ("module", "modules and subtrees")
    of_nodes = True

    def __init__(self, tree: Any, stacked: Any = None):
        self.leaf_view = TreeView(tree, stacked)
        self.structure = self.leaf_view.structure  # what type hints read
        leaf_segments = row_segments(self.leaf_view.leaf_structure)
        self.reals = _real_nodes(tree, leaf_segments) if self.leaf_view.leaves else []
        self.segments: list[tuple[str, ...]] = []
        self.kinds: list[type] = []
        self.parents: list[int] = []
        self.layers: list[tuple[int, ...] | None] = []
        self.real: list[int] = []
        # A real node in a stacked subtree -> the stack's shape (its leading layer axes), and
        # the length of the stacked subtree's path, which the layer index follows.
        self.stack_shapes: dict[int, tuple[int, ...]] = {}
        self.stack_depths: dict[int, int] = {}
        stacks = {tuple(split_path(s.path)): s for s in self.leaf_view.stacks}
        row_of: dict[int, int] = {}  # a real node outside stacks -> its row
        i = 0
        while i < len(self.reals):
            node = self.reals[i]
            parent = row_of.get(node.parent, -1)
            stack = next((s for at, s in stacks.items() if node.segments[: len(at)] == at), None)
            if stack is None:
                row_of[i] = self._add(node.segments, type(node.obj), parent, None, i)
                i += 1
                continue
            end = i + 1  # the node and every node inside it
            while end < len(self.reals) and self._within(self.reals[end], i):
                end += 1
            prefix = tuple(split_path(stack.path))
            if node.segments == prefix:  # the stacked subtree itself: a list of its layers
                row_of[i] = self._add(node.segments, Layers, parent, None, i)
                self._add_layers(stack, prefix, i, end, row_of[i], i)
            else:  # a node in a stack that is no node itself (a prefix of Haiku module names)
                self._add_layers(stack, prefix, i, end, parent, None)
            i = end

    def _within(self, node: _Real, ancestor: int) -> bool:
        while node.parent > ancestor:
            node = self.reals[node.parent]
        return node.parent == ancestor

    def _add(
        self, segments: tuple[str, ...], kind: type, parent: int, layer: tuple[int, ...] | None, real: int
    ) -> int:
        self.segments.append(segments)
        self.kinds.append(kind)
        self.parents.append(parent)
        self.layers.append(layer)
        self.real.append(real)
        return len(self.segments) - 1

    def _add_layers(
        self, stack: Stack, prefix: tuple[str, ...], first: int, end: int, parent: int, root: int | None
    ) -> None:
        """The rows of the real nodes `first..end` in a stacked subtree at `prefix`, layer by
        layer: the layer itself where the subtree is a node (`root`), then the nodes in it."""
        self.stack_shapes.update(dict.fromkeys(range(first, end), stack.shape))
        self.stack_depths.update(dict.fromkeys(range(first, end), len(prefix)))
        for layer in np.ndindex(*stack.shape):
            at = (*prefix, *map(str, layer))
            row_of = {}
            if root is not None:
                row_of[root] = self._add(at, type(self.reals[root].obj), parent, layer, root)
            for j in range(first if root is None else first + 1, end):
                node = self.reals[j]
                segments = (*at, *node.segments[len(prefix) :])
                row_of[j] = self._add(segments, type(node.obj), row_of.get(node.parent, parent), layer, j)

    def __len__(self) -> int:
        return len(self.segments)

    @functools.cached_property
    def paths(self) -> list[str]:
        return [".".join(map(quote, segments)) for segments in self.segments]

    def star_path(self, row: int) -> str:
        """`blocks.*.attn.q`: a stacked row's path with `*` for its layer index."""
        start, axes = self.stack_depths[self.real[row]], len(self.layers[row] or ())
        segments = [quote(s) for s in self.segments[row]]
        segments[start : start + axes] = ["*"] * axes
        return ".".join(segments)

    @functools.cached_property
    def row_leaves(self) -> list[Any]:
        return [self.reals[r].obj for r in self.real]

    def inside(self, classes: tuple[type, ...]) -> np.ndarray:
        """Per row: the node is an instance of `classes`, or lies inside one."""
        out = np.zeros(len(self), bool)
        for row, (kind, parent) in enumerate(zip(self.kinds, self.parents, strict=True)):
            out[row] = issubclass(kind, classes) or (parent >= 0 and out[parent])
        return out

    def owned_by(self, classes: tuple[type, ...]) -> np.ndarray:
        """Per row: the node's parent is an instance of `classes`."""
        return np.fromiter(
            (parent >= 0 and issubclass(self.kinds[parent], classes) for parent in self.parents),
            bool,
            len(self),
        )

    def close_subtrees(self, path: str) -> str:
        return self.leaf_view.close_subtrees(path)


@dataclass(frozen=True)
class ModuleRow:
    """One selected module or subtree.

    Attributes:
        path: its printed path (`""` for the root).
        type: its type (`Layers` for a stacked subtree seen as its list of layers).
        leaves: how many leaves it holds (a stacked layer: those of the whole stack).
        module: the node itself (a stacked layer: the whole stacked node).
        layer: the layer index of a row inside a stacked subtree, else None.
    """

    path: str
    type: type
    leaves: int
    module: Any
    layer: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Modules:
    """The modules a selector selected, in tree order; prints as a table."""

    rows: tuple[ModuleRow, ...]
    selector: Any
    nested: str

    def __iter__(self) -> Iterator[ModuleRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ModuleRow:
        return self.rows[index]

    @property
    def paths(self) -> list[str]:
        return [row.path for row in self.rows]

    def __str__(self) -> str:
        header = ("path", "type", "leaves")
        body = [(row.path or "(root)", row.type.__qualname__, str(row.leaves)) for row in self.rows]
        widths = [max(len(r[k]) for r in [header, *body]) for k in range(3)]
        count = f"{len(self.rows)} module" + ("" if len(self.rows) == 1 else "s")
        lines = [f"{count} selected by {self.selector!r} ({self.nested} of nested matches)"]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *body]
        ]
        return "\n".join(lines)


def node_view(tree: Any, caller: str, stacked: Any) -> NodeView:
    """The tree's node view, after checking that the caller did not pass a selector as the tree."""
    if isinstance(tree, Selector | str):  # a bare string is no model: a pattern, put first
        raise TypeError(
            f"{caller}() got a selector ({tree!r}) where the tree goes. The tree comes first: "
            f"treeglob.{caller}(tree, selector, ...)."
        )
    return NodeView(tree, stacked)


def check_nested(nested: Any, caller: str) -> str:
    if nested not in NESTED:
        choices = "; ".join(f"{k!r}: {v}" for k, v in NESTED.items())
        raise ValueError(f"{caller}(nested={nested!r}) is not a choice. Choose one of: {choices}.")
    return nested


def selected_rows(view: NodeView, selector: Any, *, nested: str, strict: bool, caller: str) -> list[int]:
    """The rows `selector` selects on `view`, nested matches resolved by `nested`."""
    check_nested(nested, caller)
    ctx, chosen = Context(view, strict=strict), coerce(selector)
    hit = ctx.evaluate(chosen)
    if strict and not chosen.may_be_empty and not hit.any():
        raise ctx.no_match(chosen, f"the selector given to {caller}()", _leaf_hint(view, chosen))
    above = np.zeros(len(view), bool)  # per row: a selected row encloses it
    below = np.zeros(len(view), bool)  # per row: it encloses a selected row
    for row, parent in enumerate(view.parents):
        above[row] = parent >= 0 and (hit[parent] or above[parent])
    for row in reversed(range(len(view))):
        parent = view.parents[row]
        if parent >= 0 and (hit[row] or below[row]):
            below[parent] = True
    keep = hit & ~(above if nested == "outermost" else below)
    return np.flatnonzero(keep).tolist()


def _leaf_hint(view: NodeView, selector: Selector) -> str:
    """Where a selector that selects no node selects leaves: say that it names no node whole."""
    leaves = Context(view.leaf_view, strict=False).evaluate(selector)
    if not leaves.any():
        return ""
    hits = np.flatnonzero(leaves)
    found = ", ".join(view.leaf_view.paths[i] for i in hits[:3]) + (", ..." if len(hits) > 3 else "")
    hint = (
        f"It selects leaves ({found}), but no module or subtree ends where it matches: name a "
        "module whole (a glob must match up to the module's last segment). To select leaves, "
        "use treeglob.mask."
    )
    slashed = any(
        isinstance(getattr(key, "key", None), str) and KEY_SEPARATOR in key.key
        for path in view.leaf_view.key_paths
        for key in path
    )
    if slashed:
        hint += (
            " A Haiku module name that only prefixes other modules' names (`mlp` in `mlp/~/linear_0`) "
            "is no node: select the modules below it ('mlp.**')."
        )
    return hint


def modules(
    tree: Any, selector: Any, *, nested: str = "outermost", strict: bool = True, stacked: Any = None
) -> Modules:
    """The modules and subtrees of `tree` that `selector` selects.

    A node is selected the way a leaf at its path would be, except that a glob
    must match up to the node itself (as if it ended in `$`): `"attn"`
    selects modules named `attn`, not the projections inside them, and a
    class selects its instances and what lies inside them (outermost: the
    instances). `ndim`, `shape`, `dtype` and `size` are
    refused (a node is not an array); `where(fn)` calls `fn(path, node)`.
    Every inner node that holds a leaf is a candidate (the root too, with the
    path `""`), except wrappers of one leaf (an NNX Variable).

    Args:
        tree: an Equinox or Flax NNX model, a penzai model, a dict of
            Linen or Haiku parameters, any PyTree.
        selector: a selector, or a value that coerces to one.
        nested: when a selected node lies inside another, `"outermost"` keeps
            the enclosing one, `"innermost"` the enclosed one.
        strict: raise `NoMatchError` (with close matches) when nothing is selected.
        stacked: `{path: axes}` of stacked subtrees (see `treeglob.mask`):
            their layers are listed one by one, `blocks.0.attn`, ...

    Returns:
        A `Modules`: one `ModuleRow` (path, type, leaves, module, layer) per module, in
        tree order, which prints as a table.

    Examples:
        >>> import treeglob
        >>> params = {"attn": {"q": {"kernel": 1, "bias": 2}, "k": {"kernel": 3}}, "head": {"kernel": 4}}
        >>> treeglob.modules(params, "attn.{q,k}").paths
        ['attn.k', 'attn.q']
        >>> print(treeglob.modules(params, "*", nested="innermost"))
        3 modules selected by glob('*') (innermost of nested matches)
        path    type  leaves
        attn.k  dict  1
        attn.q  dict  2
        head    dict  1
    """
    view = node_view(tree, "modules", stacked)
    rows = selected_rows(view, selector, nested=nested, strict=strict, caller="modules")
    return Modules(tuple(_module_row(view, row) for row in rows), coerce(selector), nested)


def _module_row(view: NodeView, row: int) -> ModuleRow:
    real = view.reals[view.real[row]]
    return ModuleRow(view.paths[row], view.kinds[row], real.num_leaves, real.obj, view.layers[row])

"""The flattened view of a tree that every selection reads: rows, their paths and metadata.

A tree is flattened once. Its *rows* are its leaves, except under subtrees
declared stacked, where each leaf becomes one row per layer (see
`stacking.py`). Paths are rendered only when something asks for them:
globs, `inside` and `owned_by` walk the compressed structure instead. Only
static metadata is read, never array values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
import types
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.tree_util as jtu
import numpy as np

from .frameworks import is_wrapper
from .stacking import Stack, close_subtrees, row_origin, stack_structure
from .structure import Node, remember, row_paths, row_segments, structure_of

__all__ = ["TreeView", "paths", "shape_of"]


def shape_of(leaf: Any) -> tuple[int, ...] | None:
    """The static shape of an array-like leaf (with `shape` and `dtype`), else None."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else None


def _flatten(flatten: Callable[[Any], Any], tree: Any) -> Any:
    try:
        return flatten(tree)
    except (RecursionError, SystemError) as exc:
        # JAX's flatten recurses in C++ on Python's recursion budget and reports running
        # out as a SystemError caused by a RecursionError.
        if not isinstance(exc, RecursionError) and not isinstance(exc.__cause__, RecursionError):
            raise
        raise ValueError(
            "treeglob could not flatten the tree: it is nested deeper than JAX can flatten under "
            f"Python's recursion limit ({sys.getrecursionlimit()}). Raise the limit with "
            "sys.setrecursionlimit(...), or nest the tree less deeply."
        ) from exc
    except (TypeError, ValueError) as exc:
        hint = ""
        if "'<' not supported" in str(exc) or "sort" in str(exc):
            hint = (
                "\nA dict in the tree mixes key types (e.g. int and str keys), which JAX cannot "
                "sort. Use one key type per dict, e.g. str(key) for every key."
            )
        raise TypeError(f"treeglob could not flatten the tree: {exc}{hint}") from exc


class TreeView:
    """A tree flattened once: one row per leaf (per layer under `stacked`), with what selectors read.

    Attributes:
        tree, treedef, leaves: the tree, its treedef and its leaves.
        structure: the compressed structure (`structure.Node`) over the rows.
        leaf_structure: the same before stacked layers were declared (over the leaves).
        stacked: the `stacked=` argument; stacks: the declared stacked subtrees.
        origin: per row, the index of its leaf (None when rows are the leaves).
    """

    #: What a row is, in messages; and that rows are leaves, not inner nodes (`nodes.NodeView`).
    noun = ("leaf", "leaves")
    of_nodes = False

    def __init__(self, tree: Any, stacked: Any = None):
        self.tree, self.stacked = tree, stacked
        self.leaves, self.treedef = _flatten(jtu.tree_flatten, tree)
        root = self.leaf_structure = structure_of(self.treedef, lambda: self.key_paths)
        self.stacks: tuple[Stack, ...] = ()
        self.origin: np.ndarray | None = None
        if stacked is not None:
            root, self.stacks = stack_structure(root, stacked, self.leaf_shapes, lambda i: self.leaf_paths[i])
            if self.stacks:
                self.origin = row_origin(len(self.leaves), self.stacks)
        self.structure: Node = root

    @functools.cached_property
    def key_paths(self) -> list[tuple[Any, ...]]:
        """Per leaf: its JAX key path (only where the structure needs them)."""
        return [key_path for key_path, _ in _flatten(jtu.tree_flatten_with_path, self.tree)[0]]

    def __len__(self) -> int:
        return self.structure.n

    # Per leaf -------------------------------------------------------------

    @functools.cached_property
    def leaf_shapes(self) -> list[tuple[int, ...] | None]:
        if all(map(_array_type, self.leaf_types)):
            # Every leaf's class declares shape and dtype (jax and NumPy arrays,
            # ShapeDtypeStruct): read them without asking each leaf, twice as fast.
            with contextlib.suppress(AttributeError):  # an unset slot: asked leaf by leaf below
                return list(map(tuple, map(_SHAPE, self.leaves)))
        return [shape_of(leaf) for leaf in self.leaves]

    @functools.cached_property
    def leaf_stacks(self) -> list[tuple[int, ...]]:
        """Per leaf: its stack shape (the leading layer axes), `()` outside stacked subtrees."""
        out: list[tuple[int, ...]] = [()] * len(self.leaves)
        for s in self.stacks:
            out[s.first_leaf : s.first_leaf + s.num_leaves] = [s.shape] * s.num_leaves
        return out

    @functools.cached_property
    def leaf_types(self) -> set[type]:
        return set(map(type, self.leaves))

    @functools.cached_property
    def leaf_paths(self) -> list[str]:
        """Per leaf: its printed path (a stacked leaf's has no layer index)."""
        if self.origin is None and "paths" in self.__dict__:
            return self.paths
        return row_paths(self.leaf_structure)

    # Per row --------------------------------------------------------------

    def leaf_of(self, row: int) -> int:
        """The index of the leaf `row` lies in (the row itself outside stacks)."""
        return row if self.origin is None else int(self.origin[row])

    def rows_of(self, per_leaf: np.ndarray) -> np.ndarray:
        """Spread one value per leaf to one value per row."""
        return per_leaf if self.origin is None else per_leaf[self.origin]

    @functools.cached_property
    def row_layers(self) -> np.ndarray:
        """Per row: the flat index of its layer in its leaf's stack (0 outside stacks)."""
        out = np.zeros(len(self), np.intp)
        for s in self.stacks:
            layers = math.prod(s.shape)
            out[s.first_row : s.first_row + s.num_leaves * layers] = np.repeat(
                np.arange(layers), s.num_leaves
            )
        return out

    def _per_row(self, per_leaf: list[Any]) -> list[Any]:
        return per_leaf if self.origin is None else [per_leaf[i] for i in self.origin]

    @functools.cached_property
    def segments(self) -> list[tuple[str, ...]]:
        """Per row: the raw key texts, what patterns see."""
        return row_segments(self.structure)

    @functools.cached_property
    def paths(self) -> list[str]:
        """Per row: the printed path, segments quoted where needed and joined with "."."""
        return row_paths(self.structure)

    @functools.cached_property
    def row_leaves(self) -> list[Any]:
        """Per row: the leaf, or a `ShapeDtypeStruct` of one layer of a stacked array."""
        if self.origin is None:
            return self.leaves
        sliced = [
            leaf if not stack or shape is None else jax.ShapeDtypeStruct(shape[len(stack) :], leaf.dtype)
            for leaf, shape, stack in zip(self.leaves, self.leaf_shapes, self.leaf_stacks, strict=True)
        ]
        return self._per_row(sliced)

    @functools.cached_property
    def shapes(self) -> list[tuple[int, ...] | None]:
        """Per row: the static shape of an array-like row (per layer under `stacked`), else None."""
        if self.origin is None:
            return self.leaf_shapes
        per_leaf = [
            None if shape is None else shape[len(stack) :]
            for shape, stack in zip(self.leaf_shapes, self.leaf_stacks, strict=True)
        ]
        return self._per_row(per_leaf)

    @functools.cached_property
    def dtypes(self) -> list[Any]:
        return [
            leaf.dtype if s is not None else None
            for leaf, s in zip(self.row_leaves, self.shapes, strict=True)
        ]

    @functools.cached_property
    def data_rows(self) -> list[int]:
        """The rows that are arrays of numbers, what a checkpoint holds: not Python values,
        nor PRNG keys (`jax.random.key`, an NNX module's `Rngs`)."""
        return [r for r, d in enumerate(self.dtypes) if d is not None and not _extended(d)]

    @functools.cached_property
    def ndims(self) -> list[int | None]:
        return [None if s is None else len(s) for s in self.shapes]

    @functools.cached_property
    def ndim_array(self) -> np.ndarray:
        """Per row: the number of dimensions, -1 for a row that is not an array."""
        if (
            self.origin is None
            and "leaf_shapes" not in self.__dict__
            and all(map(_array_type, self.leaf_types))
        ):
            # Only the lengths: no tuple of each shape where nothing else asks for shapes.
            with contextlib.suppress(AttributeError):  # an unset slot: asked leaf by leaf below
                return np.fromiter(map(len, map(_SHAPE, self.leaves)), np.intp, len(self.leaves))
        shapes = self.shapes
        if None in shapes:
            return np.fromiter((-1 if s is None else len(s) for s in shapes), np.intp, len(shapes))
        return np.fromiter(map(len, cast("list[tuple[int, ...]]", shapes)), np.intp, len(shapes))

    @functools.cached_property
    def sizes(self) -> list[int | None]:
        return [None if s is None else math.prod(s) for s in self.shapes]

    # Back to leaves -------------------------------------------------------

    def per_leaf(
        self, values: list[Any], merge: Callable[[int, list[Any], tuple[int, ...]], Any]
    ) -> list[Any]:
        """One value per leaf from one value per row.

        `merge(leaf, layer_values, stack_shape)` turns the rows of a stacked
        leaf (one per layer, in layer order) into one value.
        """
        if self.origin is None:
            return values
        out: list[Any] = []
        row = 0
        for s in self.stacks:
            out += values[row : s.first_row]
            k, layers = s.num_leaves, math.prod(s.shape)
            for j in range(k):
                leaf = s.first_leaf + j
                rows = values[s.first_row + j : s.first_row + k * layers : k]
                out.append(merge(leaf, rows, s.shape))
            row = s.first_row + k * layers
        out += values[row:]
        return out

    @property
    def wrapped(self) -> bool:
        """Whether leaves sit in wrappers (NNX Variables) that paths and outputs leave out."""
        return remember(self.leaf_structure, "wrapped", self._find_wrapped)

    def _find_wrapped(self) -> bool:
        seen, stack = set(), [self.leaf_structure]
        while stack:
            node = stack.pop()
            if not node.children and node.kind is not None:
                return True
            for _, child in node.children:
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
        return False

    @property
    def out_treedef(self) -> Any:
        """The structure of outputs (masks, labels): the tree's, with each wrapper (an NNX
        Variable) in place of its leaf, as optax sees the params at `update`; a mask of
        that shape is a prefix of the wrapped params at `init` too. A function of the
        treedef, so computed once per structure: flattening again with an `is_leaf` in
        Python costs more than the whole rest of a mask of an NNX State."""
        if not self.wrapped:
            return self.treedef
        return remember(
            self.leaf_structure,
            "out_treedef",
            lambda: jtu.tree_structure(self.tree, is_leaf=lambda x: is_wrapper(type(x)) and _one_leaf(x)),
        )

    def unflatten(self, per_leaf: list[Any]) -> Any:
        return jtu.tree_unflatten(self.out_treedef, per_leaf)

    def close_subtrees(self, path: str) -> str:
        """` Close matches: a, b.` among the paths of the inner nodes, or ``."""
        return close_subtrees(self.structure, path)


def _one_leaf(x: Any) -> bool:
    return jtu.tree_structure(x).num_leaves == 1


_SHAPE = operator.attrgetter("shape")


@functools.cache
def _array_type(kind: type) -> bool:
    """Whether the class itself declares `shape` and `dtype` (a property or a slot), so
    every instance has them; a leaf class without (a Python scalar, a string, a class
    that makes attributes up in `__getattr__`) is asked leaf by leaf (`shape_of`)."""
    return all(isinstance(getattr(kind, name, None), _DESCRIPTORS) for name in ("shape", "dtype"))


_DESCRIPTORS = (property, functools.cached_property, types.GetSetDescriptorType, types.MemberDescriptorType)


def paths(tree: Any, *, stacked: Any = None) -> list[str]:
    """The dotted path of every leaf of `tree`, in `jax.tree_util` leaf order.

    `None` is an empty subtree, as in JAX. A leaf at the root has the path
    `""`. Integer and digit-string keys render as plain decimals, so a range
    such as `{0..11}` works on lists and on int- or str-keyed dicts alike.
    Keys that could be misread (empty, with a dot, whitespace, a quote, a
    backslash, a glob metacharacter, or a leading `re:`) are quoted with
    backslash escapes.

    Equinox specifics: static fields are not leaves; non-array fields
    (activations, Python scalars) are. `eqx.nn.Shared` keeps a tied weight
    once, under `shared.pytree.N...`; `eqx.nn.State` leaves have index-only
    paths (`0`, `1.0`, ...).

    Args:
        tree: any PyTree.
        stacked: `{path: axes}` for subtrees whose leaves carry leading
            stacked layer axes; each such leaf then shows one path per layer,
            in the order of the same model built with a list of blocks
            (`blocks.0.attn.weight`, `blocks.0.mlp.weight`, ...,
            `blocks.1.attn.weight`, ...).

    Returns:
        A list of `str`, one per leaf (per layer slice under `stacked`).

    Examples:
        >>> import treeglob
        >>> treeglob.paths({"params": {"conv.1": {"kernel": 1}, "head": [2, 3]}, "x": None})
        ['params."conv.1".kernel', 'params.head.0', 'params.head.1']
        >>> treeglob.paths(5)
        ['']
    """
    return TreeView(tree, stacked).paths


@functools.lru_cache(maxsize=256)
def _extended(dtype: Any) -> bool:
    # Asked once per dtype, not once per row (jnp.issubdtype costs microseconds).
    return bool(jax.numpy.issubdtype(dtype, jax.dtypes.extended))

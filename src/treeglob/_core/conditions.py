"""The leaf conditions: path patterns, layer types, array metadata, predicates.

Each condition evaluates on a whole `TreeView` into one NumPy bool per leaf,
reading static metadata only (paths, node types, shapes, dtypes), never
array values.
"""

from __future__ import annotations

import operator
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

from .frameworks import type_hint
from .pattern import MATCHED, CompiledGlob, compile_glob, compile_regex
from .selector import BOOL_MESSAGE, Context, Selector, coerce
from .structure import Node, kinds, remember, walk

__all__ = ["COMPARISONS", "dtype", "glob", "inside", "ndim", "owned_by", "regex", "shape", "size", "where"]


# ----------------------------------------------------------------------------
# Paths


def _structural(root: Node, key: Selector, rows: Callable[[], list[bool]]) -> np.ndarray:
    """The rows a condition on paths and node types selects, computed once per structure.

    Read-only: the same array answers every later call on a tree of this treedef.
    """

    def compute() -> np.ndarray:
        out = np.array(rows(), bool)
        out.flags.writeable = False
        return out

    return remember(root, key, compute)


@dataclass(frozen=True, slots=True, repr=False)
class _Glob(Selector):
    # Equal and hashed by the pattern text and options, never by the compiled object.
    pattern: str
    ignore_case: bool
    compiled: CompiledGlob = field(compare=False, hash=False)

    def _eval(self, ctx: Context) -> np.ndarray:
        glob = self.compiled
        root = ctx.view.structure
        return _structural(
            root,
            self,
            lambda: walk(
                root,
                glob.start(),
                lambda state, segment, child: glob.step(state, segment),
                glob.accepts,
                lambda state: True if state is MATCHED else False if glob.dead(state) else None,
            ),
        )

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        # A node is selected by a run of segments that ends at it, as if the pattern ended in
        # `$`: "attn" selects the attention modules, not every module inside them.
        anchored = (
            self.compiled
            if self.compiled.anchored_end
            else compile_glob(self.pattern + "$", self.ignore_case)
        )
        return np.fromiter(map(anchored.match, ctx.view.segments), bool, len(ctx.view))

    def _literals(self) -> list[str]:
        return [self.compiled.literal()]

    def __repr__(self) -> str:
        flag = ", ignore_case=True" if self.ignore_case else ""
        return f"glob({self.pattern!r}{flag})"


@dataclass(frozen=True, slots=True, repr=False)
class _Regex(Selector):
    pattern: str
    flags: int
    compiled: re.Pattern[str] = field(compare=False, hash=False)

    def _eval(self, ctx: Context) -> np.ndarray:
        match = self.compiled.fullmatch
        return np.fromiter((match(p) is not None for p in ctx.view.paths), bool, len(ctx.view))

    def _literals(self) -> list[str]:
        # The regex's plain characters: enough to point at a near miss.
        return [re.sub(r"\\(.)|[\\^$.*+?()\[\]{}|]", r"\1", self.pattern)]

    def _hint(self, ctx: Context) -> str:
        search = self.compiled.search
        found = next((p for p in ctx.view.paths if search(p)), None)
        if found is None:
            return ""
        return (
            f"A regex selects a path it matches whole (re.fullmatch), and {found!r} only contains a "
            f"match: write 're:.*{self.pattern}' to allow anything before it."
        )

    def __repr__(self) -> str:
        if self.flags & ~(re.IGNORECASE | re.UNICODE):  # a compiled pattern's other flags
            return f"regex({self.compiled!r})"
        return f"regex({self.pattern!r}" + (", ignore_case=True" if self.flags & re.IGNORECASE else "") + ")"


def glob(pattern: str, *, ignore_case: bool = False) -> Selector:
    """Select leaves by a glob over path segments (SPEC §2).

    `*` matches within one segment, `?` one character, `[a-z]` / `[!a-z]`
    a class, `{qkv,proj}` alternatives (which may span segments),
    `{0..11}` a decimal integer range, `**` any number of whole segments,
    `"conv.1"` one key literally. The pattern matches a leaf when it matches
    some run of consecutive whole segments of its path, so matching a node
    selects every leaf under it; `^` anchors at the root, `$` at the leaf.

    Args:
        pattern: the glob.
        ignore_case: match case-insensitively.

    Raises:
        ValueError: the pattern is malformed (the message shows where).

    Examples:
        >>> import treeglob
        >>> tree = {"blocks": [{"w": 1, "b": 2}] * 3, "head": {"w": 3}}
        >>> treeglob.mask(tree, treeglob.glob("blocks.{1..2}.w"))
        {'blocks': [{'b': False, 'w': False}, {'b': False, 'w': True}, {'b': False, 'w': True}], 'head': {'w': False}}
    """
    compiled = compile_glob(pattern, ignore_case)
    return _Glob(pattern, ignore_case, compiled)


def regex(pattern: str | re.Pattern[str], *, ignore_case: bool = False) -> Selector:
    """Select leaves whose whole rendered path matches a regex (`re.fullmatch`).

    A regex gets no subtree semantics: `regex("head")` does not select
    `head.weight`. A `re:` prefix on a string is accepted and removed.

    Examples:
        >>> import treeglob
        >>> tree = {"head": {"weight": 1, "bias": 2}}
        >>> treeglob.mask(tree, treeglob.regex(r"head\\.(weight|kernel)"))
        {'head': {'bias': False, 'weight': True}}
    """
    if isinstance(pattern, str) and pattern.startswith("re:"):
        pattern = pattern[3:]
    if not isinstance(pattern, str | re.Pattern):
        raise TypeError(f"regex() takes a str or re.Pattern, got {type(pattern).__name__}: {pattern!r}.")
    compiled = compile_regex(pattern, ignore_case)
    return _Regex(compiled.pattern, compiled.flags, compiled)


# ----------------------------------------------------------------------------
# Layer types


def _check_classes(classes: tuple[Any, ...], name: str) -> tuple[type, ...]:
    flat: list[type] = []
    for c in classes:
        if isinstance(c, types.UnionType):
            flat.extend(c.__args__)
        elif isinstance(c, type):
            flat.append(c)
        else:
            raise TypeError(f"{name}() takes classes, got {type(c).__name__}: {c!r}.")
    if not flat:
        raise TypeError(f"{name}() needs at least one class, e.g. {name}(eqx.nn.LayerNorm).")
    return tuple(flat)


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(c.__name__ for c in classes)


def _type_hint(self: Selector, ctx: Context) -> str:
    """What the tree's frameworks say about a type selector that selects nothing in it."""
    return type_hint(kinds(ctx.view.structure)[0])


@dataclass(frozen=True, slots=True, repr=False)
class _Inside(Selector):
    classes: tuple[type, ...]

    def _eval(self, ctx: Context) -> np.ndarray:
        # The state is "inside an instance already"; the root counts, and so
        # does a leaf that is itself an instance.
        root = ctx.view.structure
        out = _structural(
            root,
            self,
            lambda: walk(
                root,
                root.is_a(self.classes),
                lambda inside, segment, child: inside or child.is_a(self.classes),
                lambda inside: inside,
                lambda inside: True if inside else None,
            ),
        )
        # Leaf types are not part of the structure: checked on every call.
        leaf_kinds = [t for t in ctx.view.leaf_types if issubclass(t, self.classes)]
        if leaf_kinds:  # rare: leaves that are themselves instances (checked per type, not per leaf)
            leaves = ctx.view.leaves
            out = out | ctx.view.rows_of(
                np.fromiter((type(x) in leaf_kinds for x in leaves), bool, len(leaves))
            )
        return out

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        return ctx.nodes_view.inside(self.classes)

    _hint = _type_hint

    def __repr__(self) -> str:
        return f"inside({_names(self.classes)})"


@dataclass(frozen=True, slots=True, repr=False)
class _OwnedBy(Selector):
    classes: tuple[type, ...]

    def _eval(self, ctx: Context) -> np.ndarray:
        # The state is "the node being walked is an instance": a leaf child inherits it.
        root = ctx.view.structure
        return _structural(
            root,
            self,
            lambda: walk(
                root,
                root.is_a(self.classes),
                # A leaf is owned by its parent, a wrapped leaf (an NNX Variable) by its wrapper too.
                lambda owner, segment, child: (
                    (owner or child.is_a(self.classes)) if not child.children else child.is_a(self.classes)
                ),
                lambda owner: owner,
                lambda owner: None,
            ),
        )

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        return ctx.nodes_view.owned_by(self.classes)

    _hint = _type_hint

    def __repr__(self) -> str:
        return f"owned_by({_names(self.classes)})"


def inside(*classes: type | types.UnionType) -> Selector:
    """Select every leaf that lies inside an instance of one of `classes`.

    Any enclosing node counts, the root included, and any PyTree node class
    works (not only `eqx.Module`). A bare class, a `A | B` union or a tuple
    of classes coerces to this selector.

    Examples:
        >>> import equinox as eqx, jax, treeglob
        >>> mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
        >>> [p for p, m in zip(treeglob.paths(mlp), jax.tree.leaves(treeglob.mask(mlp, eqx.nn.Linear))) if m]
        ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias']
    """
    return _Inside(_check_classes(classes, "inside"))


def owned_by(*classes: type | types.UnionType) -> Selector:
    """Select the leaves whose direct parent node is an instance of `classes`.

    Unlike `inside`, containers are not skipped: the list inside an
    `eqx.nn.Sequential` owns its layers, the layers own their arrays.

    Examples:
        >>> import equinox as eqx, jax, treeglob
        >>> mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
        >>> [p for p, m in zip(treeglob.paths(mlp), jax.tree.leaves(treeglob.mask(mlp, treeglob.owned_by(eqx.nn.MLP)))) if m]
        ['activation', 'final_activation']
    """
    return _OwnedBy(_check_classes(classes, "owned_by"))


# ----------------------------------------------------------------------------
# Array metadata


def _array_condition(condition: Selector) -> TypeError:
    return TypeError(
        f"{condition!r} describes arrays, and a module or subtree is not one: select modules by "
        "path and type (e.g. 'attn.{q,v}' & eqx.nn.Linear), or with treeglob.where(fn), which "
        "gets fn(path, module)."
    )


#: The comparisons `ndim` and `size` support, by their operator text.
COMPARISONS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True, repr=False)
class _Compare(Selector):
    metric: str  # "ndim" or "size"
    op: str
    value: int

    def _eval(self, ctx: Context) -> np.ndarray:
        op, value = COMPARISONS[self.op], self.value
        if self.metric == "ndim":  # one vector comparison; -1 marks the rows that are not arrays
            ndims = ctx.view.ndim_array
            return op(ndims, value) & (ndims >= 0)
        values = ctx.view.sizes
        return np.fromiter((v is not None and op(v, value) for v in values), bool, len(ctx.view))

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        raise _array_condition(self)

    def __repr__(self) -> str:
        return f"({self.metric} {self.op} {self.value})"


class _Metric:
    """`ndim` / `size` of array leaves: compare with an int to get a selector.

    Supports `==, !=, <, <=, >, >=`. Non-array leaves never match. Put
    comparisons in parentheses when combining them with `&`, `|`, `-`.

    Examples:
        >>> import numpy as np, treeglob
        >>> tree = {"w": np.zeros((2, 3)), "b": np.zeros(3), "act": "relu"}
        >>> treeglob.mask(tree, treeglob.ndim >= 2)
        {'act': False, 'b': False, 'w': True}
        >>> treeglob.mask(tree, (treeglob.size < 5) | "act")
        {'act': True, 'b': True, 'w': False}
    """

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def compare(self, op: str, value: Any) -> Selector:
        """The selector `self <op> value`, e.g. `ndim.compare(">=", 2)` is `ndim >= 2`."""
        if op not in COMPARISONS:
            raise ValueError(f"Unknown comparison {op!r}; use one of {', '.join(COMPARISONS)}.")
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(
                f"treeglob.{self._name} {op} ... needs an int on the right, got "
                f"{type(value).__name__}: {value!r}. If this came from `a & {self._name} {op} b`, "
                f"add parentheses: `a & ({self._name} {op} b)`."
            )
        return _Compare(self._name, op, int(value))

    def __eq__(self, value: Any) -> Selector:  # type: ignore[override]
        return self.compare("==", value)

    def __ne__(self, value: Any) -> Selector:  # type: ignore[override]
        return self.compare("!=", value)

    def __lt__(self, value: Any) -> Selector:
        return self.compare("<", value)

    def __le__(self, value: Any) -> Selector:
        return self.compare("<=", value)

    def __gt__(self, value: Any) -> Selector:
        return self.compare(">", value)

    def __ge__(self, value: Any) -> Selector:
        return self.compare(">=", value)

    def __hash__(self) -> int:
        return hash(self._name)

    def __bool__(self) -> bool:
        raise TypeError(BOOL_MESSAGE)

    @property
    def coerce_hint(self) -> str:
        """Added to the message when the metric itself is used as a selector."""
        return f" Compare it first: ({self!r} >= 2)."

    def _misuse(self, other: Any) -> Selector:
        raise TypeError(
            f"treeglob.{self._name} must be compared with an int before it is combined: write "
            f"`({self._name} >= 2) & other`, with the parentheses."
        )

    __and__ = __rand__ = __or__ = __ror__ = __sub__ = __rsub__ = _misuse

    def __repr__(self) -> str:
        return f"treeglob.{self._name}"


ndim = _Metric("ndim")
size = _Metric("size")


@dataclass(frozen=True, slots=True, repr=False)
class _Shape(Selector):
    dims: tuple[int | None | types.EllipsisType, ...]

    def _eval(self, ctx: Context) -> np.ndarray:
        return np.fromiter((s is not None and self._fits(s) for s in ctx.view.shapes), bool, len(ctx.view))

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        raise _array_condition(self)

    def _fits(self, shape: tuple[int, ...]) -> bool:
        if ... in self.dims:
            k = self.dims.index(...)
            head, tail = self.dims[:k], self.dims[k + 1 :]
            if len(shape) < len(head) + len(tail):
                return False
            return _dims_fit(head, shape[: len(head)]) and _dims_fit(tail, shape[len(shape) - len(tail) :])
        return len(shape) == len(self.dims) and _dims_fit(self.dims, shape)

    def __repr__(self) -> str:
        return "shape(" + ", ".join("..." if d is ... else repr(d) for d in self.dims) + ")"


def _dims_fit(pattern: tuple[Any, ...], shape: tuple[int, ...]) -> bool:
    return all(p is None or p == d for p, d in zip(pattern, shape, strict=True))


def shape(*dims: int | None | types.EllipsisType) -> Selector:
    """Select array leaves of a given shape; `None` is any size, `...` any dims.

    Examples:
        >>> import numpy as np, treeglob
        >>> tree = {"qkv": np.zeros((8, 24)), "out": np.zeros((8, 8)), "b": np.zeros(8)}
        >>> treeglob.mask(tree, treeglob.shape(None, 24))
        {'b': False, 'out': False, 'qkv': True}
        >>> treeglob.mask(tree, treeglob.shape(..., 8))
        {'b': True, 'out': True, 'qkv': False}
    """
    if sum(d is ... for d in dims) > 1:
        raise TypeError(f"shape() takes at most one `...`, got {dims!r}.")
    for d in dims:
        if not (d is None or d is ... or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)):
            raise TypeError(f"shape() takes non-negative ints, None or ..., got {d!r} in {dims!r}.")
    return _Shape(tuple(dims))


@dataclass(frozen=True, slots=True, repr=False)
class _DType(Selector):
    kinds: tuple[Any, ...]

    def _eval(self, ctx: Context) -> np.ndarray:
        return np.fromiter(
            (d is not None and any(jnp.issubdtype(d, k) for k in self.kinds) for d in ctx.view.dtypes),
            bool,
            len(ctx.view),
        )

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        raise _array_condition(self)

    def __repr__(self) -> str:
        return "dtype(" + ", ".join(getattr(k, "__name__", str(k)) for k in self.kinds) + ")"


def dtype(*kinds: Any) -> Selector:
    """Select array leaves whose dtype is (a subtype of) one of `kinds`.

    Kinds are dtypes (`jnp.bfloat16`, `"float32"`) or abstract NumPy types
    (`jnp.floating`, `jnp.integer`).

    Examples:
        >>> import numpy as np, jax.numpy as jnp, treeglob
        >>> tree = {"w": np.zeros(2, np.float32), "step": np.zeros((), np.int32)}
        >>> treeglob.mask(tree, treeglob.dtype(jnp.floating))
        {'step': False, 'w': True}
    """
    checked = []
    for k in kinds:
        if isinstance(k, type) and issubclass(k, np.generic):
            checked.append(k)
            continue
        try:
            checked.append(np.dtype(k))
        except TypeError as exc:
            raise TypeError(
                f"dtype() takes dtypes or NumPy scalar types such as jnp.floating, got {k!r}."
            ) from exc
    if not checked:
        raise TypeError("dtype() needs at least one dtype, e.g. dtype(jnp.floating).")
    return _DType(tuple(checked))


# ----------------------------------------------------------------------------
# Predicates


@dataclass(frozen=True, slots=True, repr=False)
class _Where(Selector):
    fn: Callable[[str, Any], bool]

    def _eval(self, ctx: Context) -> np.ndarray:
        out = np.zeros(len(ctx.view), bool)
        for i, (path, leaf) in enumerate(zip(ctx.view.paths, ctx.view.row_leaves, strict=True)):
            try:
                result = self.fn(path, leaf)
            except Exception as exc:
                exc.add_note(
                    f"treeglob: raised by the where() predicate {_name(self.fn)} on the "
                    f"{ctx.view.noun[0]} at path {path!r}."
                )
                raise
            if not isinstance(result, bool | np.bool_):
                raise TypeError(
                    f"The where() predicate {_name(self.fn)} returned {type(result).__name__} {result!r} for the "
                    f"leaf at path {path!r}; it must return a bool. (Masks are static: a traced or "
                    "array value cannot decide them.)"
                )
            out[i] = result
        return out

    def __repr__(self) -> str:
        return f"where({_name(self.fn)})"


def _name(fn: Callable[..., Any]) -> str:
    """A stable name for a predicate in messages (a repr would show a memory address)."""
    return getattr(fn, "__qualname__", None) or repr(fn)


def where(fn: Callable[[str, Any], bool]) -> Selector:
    """Select leaves for which `fn(path, leaf)` returns True.

    `fn` is called on every leaf, array or not. An exception inside it is
    re-raised with a note naming the path being tested; a non-bool result
    is a `TypeError`.

    Examples:
        >>> import numpy as np, treeglob
        >>> tree = {"a": np.zeros(3), "b": np.zeros(300)}
        >>> treeglob.mask(tree, treeglob.where(lambda path, leaf: leaf.size > 100))
        {'a': False, 'b': True}
    """
    if not callable(fn):
        raise TypeError(f"where() takes a function fn(path, leaf) -> bool, got {type(fn).__name__}: {fn!r}.")
    return _Where(fn)


# ----------------------------------------------------------------------------
# Plain values that coerce to the conditions above


@coerce.register
def _(value: str) -> Selector:
    return regex(value) if value.startswith("re:") else glob(value)


@coerce.register
def _(value: re.Pattern) -> Selector:
    return regex(value)


@coerce.register
def _(value: type) -> Selector:
    return inside(value)


@coerce.register
def _(value: types.UnionType) -> Selector:
    return inside(value)

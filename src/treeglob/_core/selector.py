"""Selector values, their Boolean combinations, and their evaluation on a tree.

Selectors are immutable, hashable values that compare by what they say.
They are deliberately neither callable nor PyTrees: `eqx.filter` would call
a callable spec per leaf, `optax.inject_hyperparams` would call it as a
schedule, and `optax.masked` would read a PyTree of strings as a mask.
`bool(selector)` raises, which catches `1 <= ndim <= 3` and
`"*.bias" & ndim >= 2` (write `"*.bias" & (ndim >= 2)`).

A selector is evaluated on a whole `TreeView` at once into a NumPy bool
vector (one entry per row), so `&`, `|`, `~` are vector operations. The
conditions (patterns, types, metadata) live in `conditions.py`, which also
registers how plain values (strings, classes, regexes) coerce to them.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .errors import NoMatchError, suggest_path
from .tree import TreeView

if TYPE_CHECKING:
    from .nodes import NodeView

__all__ = [
    "BOOL_MESSAGE",
    "Context",
    "Selector",
    "all_of",
    "any_of",
    "coerce",
    "expanded",
    "named",
    "optional",
]

BOOL_MESSAGE = (
    "A treeglob selector has no truth value. This usually means a comparison "
    "was combined without parentheses: write `'*.bias' & (treeglob.ndim >= 2)` rather "
    "than `'*.bias' & treeglob.ndim >= 2`, and `(treeglob.ndim >= 1) & (treeglob.ndim <= 3)` "
    "rather than `1 <= treeglob.ndim <= 3`. To test a tree, use treeglob.mask(tree, selector)."
)

_STRICT_FIX = (
    "If matching nothing is intended (e.g. a shared rule list naming parts this model "
    "lacks), wrap it in treeglob.optional(...), or pass strict=False to switch the check off."
)


class Selector:
    """Base class of all selectors. Combine with `&`, `|`, `~` and `-`."""

    __slots__ = ()

    @property
    def may_be_empty(self) -> bool:
        """Whether the strictness check lets this selector match nothing."""
        return False

    def _eval(self, ctx: Context) -> np.ndarray:
        raise NotImplementedError

    def _eval_nodes(self, ctx: Context) -> np.ndarray:
        """One bool per inner node of a `NodeView` (see `nodes.py`). Combinators, regexes,
        predicates and constants read only what the two views share (paths, per-row
        objects, the row count), so the leaf evaluation serves; path globs and types override."""
        return self._eval(ctx)

    def _literals(self) -> list[str]:
        """The literal text of the patterns inside this selector, to suggest close matches."""
        return []

    def _hint(self, ctx: Context) -> str:
        """Why this selector might have matched nothing, when it can tell (else "")."""
        return ""

    def __and__(self, other: Any) -> Selector:
        return all_of(self, other)

    def __rand__(self, other: Any) -> Selector:
        return all_of(other, self)

    def __or__(self, other: Any) -> Selector:
        return any_of(self, other)

    def __ror__(self, other: Any) -> Selector:
        return any_of(other, self)

    def __invert__(self) -> Selector:
        return _Not(self)

    def __sub__(self, other: Any) -> Selector:
        return _Difference(self, coerce(other))

    def __rsub__(self, other: Any) -> Selector:
        return _Difference(coerce(other), self)

    def __bool__(self) -> bool:
        raise TypeError(BOOL_MESSAGE)


class Context:
    """Evaluates selectors on one `TreeView`, each distinct selector once.

    Or on a `NodeView` (the inner nodes as rows), which offers what the
    selectors that serve both read of a TreeView: `paths`, `segments`,
    `row_leaves`, the row count (`_eval_nodes` reads it as `nodes_view`).

    `scope` names what is being evaluated (e.g. "rule 2 (label 'no_decay')")
    so that a strictness error raised deep inside a combination says where.
    """

    def __init__(self, view: TreeView | NodeView, *, strict: bool):
        self.view = cast(TreeView, view)
        self.strict = strict
        self.scope = ""
        self._cache: dict[Selector, np.ndarray] = {}

    @property
    def nodes_view(self) -> NodeView:
        """The view, when it is a `NodeView` (in `_eval_nodes`)."""
        return cast("NodeView", self.view)

    def evaluate(self, selector: Selector) -> np.ndarray:
        hit = self._cache.get(selector)
        if hit is None:
            evaluate = selector._eval_nodes if self.view.of_nodes else selector._eval
            hit = self._cache[selector] = evaluate(self)
        return hit

    def require(self, selector: Selector, role: str) -> np.ndarray:
        """Evaluate `selector`; under strictness it must match at least one leaf."""
        hit = self.evaluate(selector)
        if self.strict and not selector.may_be_empty and not hit.any():
            raise self.no_match(selector, role)
        return hit

    def no_match(self, selector: Selector, role: str, extra: str = "") -> NoMatchError:
        where = f"In {self.scope}, {role}" if self.scope else role[0].upper() + role[1:]
        one, many = self.view.noun
        lines = [f"{where} {selector!r} matches no {one} of the tree ({len(self.view)} {many})."]
        close = self.suggestions(selector)
        if close:
            lines.append("Close matches in the tree: " + ", ".join(close) + ".")
        slashed = next((text for text in selector._literals() if "/" in text), None)
        if slashed is not None:
            lines.append(
                f"A '/' in a name (Haiku's modules, a dict flattened with '/') is a segment boundary "
                f"in treeglob's paths: write {slashed.replace('/', '.')!r}."
            )
        for hint in (selector._hint(self), extra):
            if hint:
                lines.append(hint)
        lines.append(_STRICT_FIX)
        return NoMatchError("\n".join(lines))

    def suggestions(self, selector: Selector) -> list[str]:
        """Close matches for the literal texts of the selector's patterns (`suggest_path`)."""
        out: list[str] = []
        for literal in selector._literals():
            literal = literal.replace("/", ".")
            close = suggest_path(literal, self.view.paths, self.view.segments, ending=self.view.of_nodes)
            out += [c for c in close if c not in out]
        return out


# ----------------------------------------------------------------------------
# Combinators


def _literals_of(*parts: Selector) -> list[str]:
    return [text for part in parts for text in part._literals()]


@dataclass(frozen=True, slots=True, repr=False)
class _Constant(Selector):
    value: bool

    def _eval(self, ctx: Context) -> np.ndarray:
        return np.full(len(ctx.view), self.value)

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, slots=True, repr=False)
class _AnyOf(Selector):
    parts: tuple[Selector, ...]
    require_each: bool = False

    def _eval(self, ctx: Context) -> np.ndarray:
        out = np.zeros(len(ctx.view), bool)
        for part in self.parts:
            out |= (
                ctx.require(part, "a part of any_of(..., require_each=True)")
                if self.require_each
                else ctx.evaluate(part)
            )
        return out

    def _literals(self) -> list[str]:
        return _literals_of(*self.parts)

    def __repr__(self) -> str:
        flag = ", require_each=True" if self.require_each else ""
        return "any_of(" + ", ".join(map(repr, self.parts)) + flag + ")"


@dataclass(frozen=True, slots=True, repr=False)
class _AllOf(Selector):
    parts: tuple[Selector, ...]

    def _eval(self, ctx: Context) -> np.ndarray:
        out = np.ones(len(ctx.view), bool)
        for part in self.parts:
            out &= ctx.evaluate(part)
        return out

    def _literals(self) -> list[str]:
        return _literals_of(*self.parts)

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, slots=True, repr=False)
class _Not(Selector):
    operand: Selector

    def _eval(self, ctx: Context) -> np.ndarray:
        return ~ctx.require(self.operand, "the negated selector")

    def _literals(self) -> list[str]:
        return self.operand._literals()

    def __repr__(self) -> str:
        return f"~{self.operand!r}"


@dataclass(frozen=True, slots=True, repr=False)
class _Difference(Selector):
    left: Selector
    right: Selector

    @property
    def may_be_empty(self) -> bool:
        # `optional(a) - b` stays optional: removing leaves cannot make a rule required.
        return self.left.may_be_empty

    def _eval(self, ctx: Context) -> np.ndarray:
        return ctx.evaluate(self.left) & ~ctx.require(self.right, "the right side of '-'")

    def _literals(self) -> list[str]:
        return _literals_of(self.left, self.right)

    def __repr__(self) -> str:
        return f"({self.left!r} - {self.right!r})"


@dataclass(frozen=True, slots=True, repr=False)
class _Optional(Selector):
    """A selector allowed to match nothing (see `optional`)."""

    selector: Selector

    @property
    def may_be_empty(self) -> bool:
        return True

    def _eval(self, ctx: Context) -> np.ndarray:
        return ctx.evaluate(self.selector)

    def _literals(self) -> list[str]:
        return self.selector._literals()

    def __repr__(self) -> str:
        return f"optional({self.selector!r})"


# Set while `expanded` renders a selector: named parts show what they stand for.
_EXPANDING = contextvars.ContextVar("_EXPANDING", default=False)


@dataclass(frozen=True, slots=True, repr=False)
class _Named(Selector):
    """A selector shown by a name (a preset's long rule), selecting what it stands for."""

    name: str
    selector: Selector

    @property
    def may_be_empty(self) -> bool:
        return self.selector.may_be_empty

    def _eval(self, ctx: Context) -> np.ndarray:
        return ctx.evaluate(self.selector)

    def _literals(self) -> list[str]:
        return self.selector._literals()

    def _hint(self, ctx: Context) -> str:
        return self.selector._hint(ctx)

    def __repr__(self) -> str:
        return repr(self.selector) if _EXPANDING.get() else self.name


def named(name: str, selector: Any) -> Selector:
    """`selector`, shown as `name` in reprs and reports (`expanded` shows what it stands for).

    Examples:
        >>> import treeglob
        >>> from treeglob._core.selector import expanded, named
        >>> norms = named("NORMS", treeglob.any_of("*norm*", "ln_*"))
        >>> norms, expanded(norms | "*.bias")
        (NORMS, "any_of(any_of(glob('*norm*'), glob('ln_*')), glob('*.bias'))")
    """
    return _Named(name, coerce(selector))


def expanded(selector: Selector) -> str:
    """`repr(selector)` with its named parts written out."""
    token = _EXPANDING.set(True)
    try:
        return repr(selector)
    finally:
        _EXPANDING.reset(token)


def optional(selector: Any) -> Selector:
    """Mark a selector as allowed to match nothing.

    The strictness check (a rule, a `mask` selector or a negated operand
    that matches no leaf raises `NoMatchError`) skips an optional selector,
    so a shared rule list can name components a given model lacks.

    Examples:
        >>> import treeglob
        >>> tree = {"w": 1, "b": 2}
        >>> treeglob.labels(tree, [(treeglob.optional("embed*"), "frozen"), ("b", "no_decay")], default="decay")
        {'b': 'no_decay', 'w': 'decay'}
    """
    return _Optional(coerce(selector))


def any_of(*selectors: Any, require_each: bool = False) -> Selector:
    """Select leaves matched by any of `selectors` (the `|` operator).

    The parts are not each required to match something (a shared exclusion
    list may name things a model lacks) unless `require_each=True`.

    Examples:
        >>> import treeglob
        >>> treeglob.mask({"w": 1, "b": 2, "g": 3}, treeglob.any_of("b", "g"))
        {'b': True, 'g': True, 'w': False}
    """
    parts: list[Selector] = []
    for s in map(coerce, selectors):
        # Flatten nested any_of with the same strictness: a | b | c is one any_of.
        if isinstance(s, _AnyOf) and s.require_each == require_each:
            parts.extend(s.parts)
        else:
            parts.append(s)
    return parts[0] if len(parts) == 1 and not require_each else _AnyOf(tuple(parts), require_each)


def all_of(*selectors: Any) -> Selector:
    """Select leaves matched by all of `selectors` (the `&` operator).

    Examples:
        >>> import numpy as np, treeglob
        >>> tree = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
        >>> treeglob.mask(tree, treeglob.all_of("*", treeglob.ndim == 1))
        {'b': True, 'w': False}
    """
    parts: list[Selector] = []
    for s in map(coerce, selectors):
        parts.extend(s.parts if isinstance(s, _AllOf) else (s,))
    return parts[0] if len(parts) == 1 else _AllOf(tuple(parts))


_COERCE_MESSAGE = (
    "Cannot use {kind} {value!r} as a selector. A selector is a pattern string "
    "('*.bias', 're:...'), a re.Pattern, a class (eqx.nn.LayerNorm), a list or tuple of "
    "these (any of), a bool, or a treeglob condition such as (treeglob.ndim >= 2).{hint}"
)


@functools.singledispatch
def coerce(value: Any) -> Selector:
    """Turn a plain Python value into a selector where that is unambiguous.

    Selectors, bools, lists and tuples are handled here; `conditions.py`
    registers strings (globs, `re:` regexes), `re.Pattern` objects and classes.
    """
    hint = getattr(value, "coerce_hint", "")
    if not hint and isinstance(value, int):
        hint = (
            " An int here usually means a comparison lost its parentheses: write "
            "`sel & (treeglob.ndim >= 2)`."
        )
    elif not hint and callable(value):
        hint = " To select with a function, wrap it: treeglob.where(fn), with fn(path, leaf) -> bool."
    raise TypeError(_COERCE_MESSAGE.format(kind=type(value).__name__, value=value, hint=hint))


@coerce.register
def _(value: Selector) -> Selector:
    return value


@coerce.register
def _(value: bool) -> Selector:
    return _Constant(value)


@coerce.register(list)
@coerce.register(tuple)
def _(value: list | tuple) -> Selector:
    return _AnyOf(tuple(map(coerce, value)))


# Strings, regexes and classes coerce by the registrations in `conditions`, which needs
# this module: imported last, so that any use of a selector has them.
from . import conditions as _conditions  # noqa: E402, F401

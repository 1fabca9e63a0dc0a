"""Selector values: patterns, conditions and their Boolean combinations.

Selectors are immutable, hashable values. They are deliberately neither
callable nor PyTrees: `eqx.filter` would call a callable spec per leaf,
`optax.inject_hyperparams` would call it as a schedule, and `optax.masked`
would read a PyTree of strings as a mask. `bool(selector)` raises, which
catches `1 <= ndim <= 3` and `"*.bias" & ndim >= 2` (write
`"*.bias" & (ndim >= 2)`).

A selector is evaluated on a whole `TreeView` at once into a NumPy bool
vector (one entry per leaf), so `&`, `|`, `~` are vector operations.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._context import Context

__all__ = ["Selector", "all_of", "any_of", "coerce", "optional"]

_BOOL_MESSAGE = (
    "A treeglob selector has no truth value. This usually means a comparison "
    "was combined without parentheses: write `'*.bias' & (treeglob.ndim >= 2)` rather "
    "than `'*.bias' & treeglob.ndim >= 2`, and `(treeglob.ndim >= 1) & (treeglob.ndim <= 3)` "
    "rather than `1 <= treeglob.ndim <= 3`. To test a tree, use treeglob.mask(tree, selector)."
)


class Selector:
    """Base class of all selectors. Combine with `&`, `|`, `~` and `-`."""

    __slots__ = ()
    #: Whether the strictness check lets this selector match nothing.
    may_be_empty = False

    def _eval(self, ctx: Context) -> np.ndarray:
        raise NotImplementedError

    def _patterns(self) -> list[str]:
        """The pattern strings inside this selector, to suggest close matches."""
        parts = [getattr(self, name, None) for name in ("operand", "left", "right", "selector")]
        parts += list(getattr(self, "parts", ()))
        return [p for part in parts if isinstance(part, Selector) for p in part._patterns()]

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
        raise TypeError(_BOOL_MESSAGE)


# ----------------------------------------------------------------------------
# Combinators


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

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, slots=True, repr=False)
class _Not(Selector):
    operand: Selector

    def _eval(self, ctx: Context) -> np.ndarray:
        return ~ctx.require(self.operand, "the negated selector")

    def __repr__(self) -> str:
        return f"~{self.operand!r}"


@dataclass(frozen=True, slots=True, repr=False)
class _Difference(Selector):
    left: Selector
    right: Selector

    def _eval(self, ctx: Context) -> np.ndarray:
        return ctx.evaluate(self.left) & ~ctx.require(self.right, "the right side of '-'")

    def __repr__(self) -> str:
        return f"({self.left!r} - {self.right!r})"


@dataclass(frozen=True, slots=True, repr=False)
class _Optional(Selector):
    """A selector allowed to match nothing (see `optional`)."""

    selector: Selector
    may_be_empty = True

    def _eval(self, ctx: Context) -> np.ndarray:
        return ctx.evaluate(self.selector)

    def __repr__(self) -> str:
        return f"optional({self.selector!r})"


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


def coerce(value: Any) -> Selector:
    """Turn a plain Python value into a selector where that is unambiguous."""
    # Imported here: the conditions module builds on the Selector base class above.
    from ._conditions import _Metric, glob, inside, regex

    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        return regex(value) if value.startswith("re:") else glob(value)
    if isinstance(value, re.Pattern):
        return regex(value)
    if isinstance(value, bool):
        return _Constant(value)
    if isinstance(value, type | types.UnionType):
        return inside(value)
    if isinstance(value, list | tuple):
        return _AnyOf(tuple(map(coerce, value)))
    hint = ""
    if isinstance(value, int):
        hint = (
            " An int here usually means a comparison lost its parentheses: write "
            "`sel & (treeglob.ndim >= 2)`."
        )
    elif isinstance(value, _Metric):
        hint = f" Compare it first: ({value!r} >= 2)."
    elif callable(value):
        hint = " To select with a function, wrap it: treeglob.where(fn), with fn(path, leaf) -> bool."
    raise TypeError(_COERCE_MESSAGE.format(kind=type(value).__name__, value=value, hint=hint))

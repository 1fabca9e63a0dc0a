"""Terminal operations: `mask`, `labels` and `explain`, and the rule semantics."""

from __future__ import annotations

import functools
import gc
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.tree_util as jtu
import numpy as np

from ._context import Context
from ._errors import ShadowedRuleWarning
from ._paths import TreeView
from ._report import Explanation, RuleRow
from ._selector import Selector, coerce
from ._stacked import merge_labels, merge_mask

__all__ = ["MISSING", "Rule", "explain", "labels", "mask", "normalize_rules"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Sentinel for "no default label given".
MISSING: Any = _Missing()

_MAX_LISTED = 20


@dataclass(frozen=True)
class Rule:
    """One `(selector, label)` rule, numbered from 0 in the order given."""

    index: int
    selector: Selector
    label: Any

    def describe(self) -> str:
        return f"rule {self.index} (label {self.label!r})"


def _check_label(label: Any, where: str) -> None:
    if label is None or not jtu.treedef_is_leaf(jtu.tree_structure(label)):
        kind = "None" if label is None else f"a {type(label).__name__} container ({label!r})"
        raise TypeError(
            f"The label of {where} is {kind}. A label must be a PyTree leaf "
            "(a string, number, PartitionSpec, ...): None or a container would change the "
            "structure of the label tree."
        )


def normalize_rules(rules: Any, default: Any = MISSING) -> list[Rule]:
    """Accept a dict `{label: selector}` or a sequence of `(selector, label)` pairs.

    Also checks that every label, and `default` when given, is a PyTree leaf.
    """
    if default is not MISSING:
        _check_label(default, "default")
    if isinstance(rules, Selector | str):
        raise TypeError(
            f"rules must be a dict {{label: selector}} or a list of (selector, label) pairs, "
            f"got the single selector {rules!r}. Write [({rules!r}, 'label')], or use "
            "treeglob.mask(tree, selector) for a plain selection."
        )
    if isinstance(rules, Mapping):
        pairs = [(selector, label) for label, selector in rules.items()]
    elif isinstance(rules, Sequence):
        pairs = []
        for i, pair in enumerate(rules):
            if isinstance(pair, Rule):  # already normalized, e.g. by a recipe
                pair = (pair.selector, pair.label)
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(
                    f"rules[{i}] is {pair!r}; each rule is a (selector, label) pair, e.g. "
                    "('*.bias', 'no_decay'). Or pass a dict {label: selector}."
                )
            pairs.append(tuple(pair))
    else:
        raise TypeError(
            f"rules must be a dict {{label: selector}} or a list of (selector, label) pairs, "
            f"got {type(rules).__name__}: {rules!r}."
        )
    out = []
    for i, (selector, label) in enumerate(pairs):
        _check_label(label, f"rule {i}")
        out.append(Rule(i, coerce(selector), label))
    return out


def _pausing_gc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with Python's cyclic garbage collector paused.

    Each collection of the oldest generation walks every live object, the
    whole model included, and building labels for a 100k-leaf tree allocates
    enough to trigger several: measured, that made the time grow 14x for 10x
    the leaves. Nothing allocated here forms a cycle, so pausing costs no
    memory; the previous state is restored (also when called from threads).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


def _view(tree: Any, name: str, stacked: Any) -> TreeView:
    if isinstance(tree, Selector):
        raise TypeError(
            f"{name}() got a selector ({tree!r}) where the tree goes. The tree comes first: "
            f"treeglob.{name}(tree, ...)."
        )
    return TreeView.of(tree, stacked)


@_pausing_gc
def mask(tree: Any, selector: Any, *, strict: bool = True, stacked: Any = None) -> Any:
    """A tree of Python `bool` with exactly the structure of `tree`.

    True marks the leaves `selector` selects. The result works as an
    `eqx.filter` / `eqx.partition` spec and as an `optax.masked` or
    `optax.adamw(mask=...)` mask. Only static metadata is read, so the mask
    is a constant under `jit`.

    Args:
        tree: any PyTree, e.g. an Equinox model or `eqx.filter(model, eqx.is_array)`.
        selector: a selector, or a value that coerces to one (pattern string,
            `re.Pattern`, class, list/tuple, bool).
        strict: raise `NoMatchError` when the selector, or a negated operand
            inside it, matches no leaf. Pass False to allow empty selections.
        stacked: `{path: axes}` for subtrees whose leaves carry leading
            stacked layer axes (e.g. `{"blocks": 1}` for blocks built with
            `eqx.filter_vmap`): patterns see `blocks.0...`, `blocks.1...` and
            `ndim`/`shape` see the per-layer shape. A selection that splits a
            stacked leaf is an error here (use `labels` for per-layer values).

    Raises:
        NoMatchError: (a `ValueError`) the selection is empty; the message
            suggests close matches from the tree's paths.
        TypeError: `selector` is not a selector.

    Examples:
        >>> import treeglob
        >>> params = {"wte": 0, "h": [{"w": 1, "b": 2}], "ln_f": {"scale": 3}}
        >>> treeglob.mask(params, treeglob.glob("*.w") | "wte")
        {'h': [{'b': False, 'w': True}], 'ln_f': {'scale': False}, 'wte': True}
        >>> treeglob.mask(params, "*.bais")
        Traceback (most recent call last):
        ...
        treeglob.NoMatchError: The selector given to mask() glob('*.bais') matches no leaf of the tree (4 leaves).
        If matching nothing is intended (e.g. a shared rule list naming parts this model lacks), wrap it in treeglob.optional(...), or pass strict=False to switch the check off.
    """
    view = _view(tree, "mask", stacked)
    selector = coerce(selector)
    hit = Context(view, strict=strict).require(selector, "the selector given to mask()")
    return view.unflatten(view.per_leaf(hit.tolist(), merge_mask(view)))


def _decide(
    view: TreeView, rules: list[Rule], default: Any, strict: bool
) -> tuple[np.ndarray, list[np.ndarray], list[Rule]]:
    """First match wins: the deciding rule index per leaf (-1: default)."""
    ctx = Context(view, strict=strict)
    decided = np.full(len(view), -1)
    matches, shadowed = [], []
    for rule in rules:
        ctx.scope = rule.describe()
        hit = ctx.evaluate(rule.selector)
        matches.append(hit)
        if not hit.any():
            if strict and not rule.selector.may_be_empty:
                ctx.scope = ""
                raise ctx.no_match(rule.selector, f"the selector of {rule.describe()}", _swap_hint(ctx, rule))
            continue
        new = hit & (decided < 0)
        if not new.any():
            shadowed.append(rule)
        decided[new] = rule.index
    uncovered = np.flatnonzero(decided < 0)
    if len(uncovered) and default is MISSING:
        listed = "\n".join(f"    {view.paths[i] or '<root>'}" for i in uncovered[:_MAX_LISTED])
        more = f"\n    ... and {len(uncovered) - _MAX_LISTED} more" if len(uncovered) > _MAX_LISTED else ""
        raise ValueError(
            f"{len(uncovered)} of {len(view)} leaves match no rule and no default label was given:\n"
            f"{listed}{more}\n"
            "Add a rule for them, pass default=<label>, or, if they are not parameters "
            "(activations, static values), filter them out first: eqx.filter(model, eqx.is_array)."
        )
    return decided, matches, shadowed


def _swap_hint(ctx: Context, rule: Rule) -> str:
    if isinstance(rule.label, str):
        try:
            label_hits = ctx.evaluate(coerce(rule.label)).any()
        except (TypeError, ValueError):
            return ""
        if label_hits:
            return (
                f"Its label {rule.label!r} does match paths: rules are (selector, label) pairs, "
                "selector first; a dict maps label -> selector."
            )
    return ""


@_pausing_gc
def labels(tree: Any, rules: Any, *, default: Any = MISSING, strict: bool = True, stacked: Any = None) -> Any:
    """A tree of labels, one per leaf: **the first rule that matches decides**.

    Args:
        tree: any PyTree.
        rules: a sequence of `(selector, label)` pairs, or a dict
            `{label: selector}` (insertion order). Labels are any PyTree leaf:
            strings for `optax.partition`, numbers for multipliers,
            `PartitionSpec`s for sharding.
        default: the label of leaves no rule matches. Without it, such a
            leaf is an error that lists the uncovered paths.
        strict: raise `NoMatchError` when a rule (or a negated operand in
            it) matches no leaf. Mark single rules with `treeglob.optional`.
        stacked: `{path: axes}` for subtrees with leading stacked layer axes
            (see `mask`). Layers of one stacked leaf that get different
            numeric labels yield an array of shape `stack + (1,) * ndim`
            that broadcasts over the leaf; other differing labels are an error.

    Raises:
        NoMatchError: a rule matches nothing (with close matches).
        ValueError: leaves are uncovered and no default was given.
        TypeError: malformed rules, or a label that is None or a container.

    Warns:
        ShadowedRuleWarning: a rule matches leaves but earlier rules take them all.

    Examples:
        >>> import numpy as np, treeglob
        >>> params = {"emb": np.zeros((10, 4)), "fc": {"w": np.zeros((4, 4)), "b": np.zeros(4)}}
        >>> treeglob.labels(params, [("emb", "frozen"), (treeglob.ndim >= 2, "decay")], default="no_decay")
        {'emb': 'frozen', 'fc': {'b': 'no_decay', 'w': 'decay'}}
        >>> treeglob.labels(params, {1.0: "*.w", 0.1: "**"})
        {'emb': 0.1, 'fc': {'b': 0.1, 'w': 1.0}}
    """
    view = _view(tree, "labels", stacked)
    return view.unflatten(leaf_labels(view, rules, default, strict))


def leaf_labels(view: TreeView, rules: Any, default: Any, strict: bool) -> list[Any]:
    """`labels` on a view, as a list with one label per leaf."""
    rules = normalize_rules(rules, default)
    decided, _, shadowed = _decide(view, rules, default, strict)
    for rule in shadowed:
        warnings.warn(
            f"{rule.describe()} never decides a label: every leaf it matches is taken by an "
            "earlier rule (the first matching rule wins). Move it up or remove it.",
            ShadowedRuleWarning,
            stacklevel=3,
        )
    rows = [rules[d].label if d >= 0 else default for d in decided]
    return view.per_leaf(rows, merge_labels(view))


@_pausing_gc
def explain(
    tree: Any, rules: Any, *, default: Any = MISSING, strict: bool = True, stacked: Any = None
) -> Explanation:
    """Report which leaf gets which label, and which rule decided it.

    Applies exactly the semantics (and raises exactly the errors) of
    `labels`. `str()` of the result is an aligned table in which every full
    path appears verbatim, followed by a summary per label; `.rows`,
    `.rules`, `.summary` and `.to_dict()` give the same as plain data.
    Shadowed rules are marked instead of warned about. With `stacked`, the
    report has one row per layer slice.

    Examples:
        >>> import numpy as np, treeglob
        >>> params = {"emb": np.zeros((10, 4)), "fc": {"w": np.zeros((4, 4)), "b": np.zeros(4)}}
        >>> print(treeglob.explain(params, [("*.b", "no_decay"), ("fc", "decay")], default="frozen"))
        path  shape    dtype    size  label     rule
        emb   (10, 4)  float64    40  frozen    default
        fc.b  (4,)     float64     4  no_decay  0
        fc.w  (4, 4)   float64    16  decay     1
        <BLANKLINE>
        rule  label     matched  decided  selector
           0  no_decay        1        1  glob('*.b')
           1  decay           2        1  glob('fc')
        <BLANKLINE>
        label     leaves  elements  share
        no_decay       1         4   6.7%
        decay          1        16  26.7%
        frozen         1        40  66.7%
    """
    view = _view(tree, "explain", stacked)
    rules = normalize_rules(rules, default)
    decided, matches, shadowed = _decide(view, rules, default, strict)
    rule_rows = [
        RuleRow(
            index=r.index,
            label=r.label,
            selector=repr(r.selector),
            matched=int(m.sum()),
            decided=int((decided == r.index).sum()),
            shadowed=r in shadowed,
        )
        for r, m in zip(rules, matches, strict=True)
    ]
    return Explanation.build(view, [rules[d] if d >= 0 else None for d in decided], default, rule_rows)

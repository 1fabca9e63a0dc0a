"""The one resolution pipeline, and the terminal operations `mask` and `labels` on it.

Every output of treeglob (masks, labels, the `explain` report, the optax
wrappers, the recipes, shardings, the command line) is a few lines over
`resolve`: guard the arguments, view the tree, evaluate the rules (first
match wins), check strictness, warn about shadowed rules, and merge the rows
of each stacked leaf into one value per leaf, in that order, always. So what
`explain` shows is what training does, and the same mistake raises the same
error whichever entry point it reaches.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import ShadowedRuleWarning, warn_user
from .frameworks import stack_mark
from .rules import MISSING, Rule, Rules, normalize_rules, same_label
from .selector import Context, Selector, coerce
from .stacking import describe_layers
from .structure import inner_paths, kinds, remember
from .tree import TreeView

__all__ = [
    "MERGES",
    "Options",
    "Recall",
    "Resolution",
    "labels",
    "mask",
    "paused_gc",
    "resolve",
    "select",
    "view_of",
]

_MAX_LISTED = 20


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused, the previous state restored.

    Each collection of the oldest generation walks every live object, the
    whole model included, and building labels for a 100k-leaf tree allocates
    enough to trigger several: measured, that made the time grow 14x for 10x
    the leaves. Nothing allocated here forms a cycle, so pausing costs no memory.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def view_of(tree: Any, caller: str, stacked: Any = None) -> TreeView:
    """The tree's view, after checking that the caller did not pass a selector as the tree."""
    if isinstance(tree, TreeView):
        return tree
    if isinstance(tree, Selector):
        raise TypeError(
            f"{caller}() got a selector ({tree!r}) where the tree goes. The tree comes first: "
            f"treeglob.{caller}(tree, ...)."
        )
    return TreeView(tree, stacked)


# ----------------------------------------------------------------------------
# Merging the rows (layers) of a stacked leaf into one value per leaf


def _all_equal(values: list[Any]) -> bool:
    return all(same_label(v, values[0]) for v in values[1:])


def _merge_mask(view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...]) -> Any:
    """A Python-bool mask holds one value per leaf: refuse to split a stacked leaf."""
    if _all_equal(values):
        return values[0]
    raise ValueError(
        f"{caller}() cannot split the stacked leaf {view.leaf_paths[leaf]}: the selector picks layers "
        f"{describe_layers(stack, values)} of it, and a Python-bool mask holds one value per leaf. "
        "For per-layer values use treeglob.labels(..., stacked=...) with numeric labels (they become "
        "per-layer arrays), or treeglob.freeze(..., stacked=...) to freeze single layers."
    )


def _differing(
    view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...], fix: str
) -> ValueError:
    groups = {}
    for value in dict.fromkeys(values):
        groups[value] = describe_layers(stack, [same_label(v, value) for v in values])
    shown = ", ".join(repr(v) for v in groups)
    layers = "; ".join(f"layers {where}: {value!r}" for value, where in groups.items())
    return ValueError(
        f"{caller}(): the rules give different labels ({shown}) to the layers of the stacked leaf "
        f"{view.leaf_paths[leaf]} ({layers}). {fix}"
    )


def _merge_label(view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...]) -> Any:
    """One label per leaf, whatever it is: one leaf goes to one transformation."""
    if _all_equal(values):
        return values[0]
    raise _differing(
        view,
        caller,
        leaf,
        values,
        stack,
        "Each leaf goes to one transformation, whole: give all layers of a stacked leaf the same "
        "label, or freeze single layers with treeglob.freeze(..., stacked=...).",
    )


def _merge_numbers(view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...]) -> Any:
    """Equal labels merge to one; differing numeric labels become a per-layer array.

    The array has shape `stack + (1,) * (per-layer ndim)`, so it broadcasts
    against the leaf: multiplying the leaf's update by it scales each layer.
    """
    if _all_equal(values):
        return values[0]
    shape = view.leaf_shapes[leaf]
    numeric = all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values)
    if shape is None or not numeric:
        raise _differing(
            view,
            caller,
            leaf,
            values,
            stack,
            "A label tree holds one label per leaf; only numeric labels on array leaves can differ per "
            "layer (they become per-layer arrays). Give all layers of a stacked leaf the same label, or "
            "use numbers (e.g. 0.0 / 1.0 factors, see treeglob.freeze).",
        )
    return np.asarray(values).reshape(stack + (1,) * (len(shape) - len(stack)))


def _merge_rows(view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...]) -> Any:
    """For consumers that read per-layer labels themselves: one label, or the list of them."""
    return values[0] if _all_equal(values) else list(values)


#: How the layers of a stacked leaf merge: "mask" (one bool per leaf), "label"
#: (one label per leaf), "numbers" (differing numbers become per-layer arrays),
#: "rows" (differing labels stay a list, one per layer, for `summarize`).
MERGES: dict[str, Callable[..., Any]] = {
    "mask": _merge_mask,
    "label": _merge_label,
    "numbers": _merge_numbers,
    "rows": _merge_rows,
}


# ----------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True, eq=False)
class Resolution:
    """The rules resolved on one tree: per row the deciding rule, per leaf the value."""

    view: TreeView
    rules: Rules
    default: Any
    decided: np.ndarray  # per row: the index of the deciding rule, -1 for the default
    matches: tuple[np.ndarray, ...]  # per rule: the rows it matches
    shadowed: tuple[int, ...]  # the rules that match rows but decide none
    values: list[Any]  # per leaf: its value, stacked layers merged

    def label_of(self, decided: int) -> Any:
        return self.default if decided < 0 else self.rules[decided].label

    def tree(self, fn: Callable[[Any], Any] | None = None) -> Any:
        """The tree of per-leaf values, each passed through `fn` if given."""
        with paused_gc():
            return self.view.unflatten(self.values if fn is None else [fn(v) for v in self.values])


@dataclass(frozen=True, eq=False)
class Options:
    """The options of the public functions that resolve rules, in one value.

    Each public function takes those that apply to it as keyword arguments and
    passes them on whole, so that no entry point can drop one on the way (one
    wrapper once forgot `types_from`). `summarize`, `norm_ratios` and
    `shardings` take `default`, `strict` and `stacked`; the selection
    functions, the optax wrappers, the recipes and `explain` all four.

    Attributes:
        default: the label of leaves no rule matches. Without it, such a leaf
            is an error that lists the uncovered paths.
        strict: raise `NoMatchError` (with close matches) when a rule, or a
            negated operand in it, matches no leaf. `treeglob.optional` marks
            single rules that may.
        stacked: `{path: axes}` for subtrees whose leaves carry leading
            stacked layer axes (blocks built with `eqx.filter_vmap`, a penzai
            `LayerStack`: see `treeglob.stacked_layers`): each layer is a row
            with its own path (`blocks.0...`), and `ndim`/`shape` see the
            per-layer shape.
        types_from: a tree with the same paths (and maybe more) whose node
            types the conditions read: for a Flax NNX parameter State, the
            model (`types_from=model`), where module types such as
            `nnx.LayerNorm` live. The rules are resolved on it, and its
            decisions taken by path.
    """

    default: Any = MISSING
    strict: bool = True
    stacked: Any = None
    types_from: Any = None


DEFAULTS = Options()


def resolve(
    tree: Any,
    rules: Any,
    options: Options = DEFAULTS,
    *,
    caller: str,
    merge: str | Callable[..., Any] = "numbers",
    subject: str | None = None,
    warn: bool = True,
    relabel: Callable[[TreeView, list[Any]], list[Any]] | None = None,
    recall: Recall | None = None,
    whole_tensors: bool = False,
) -> Resolution:
    """Resolve `rules` on `tree`: the one pipeline behind every output.

    Args:
        tree: a PyTree (or a `TreeView` already built by the caller).
        rules: anything `normalize_rules` accepts, or a `Rules` value.
        options: `default`, `strict`, `stacked`, `types_from` (see `Options`).
        caller: the public function the user called, named in messages.
        merge: how the layers of a stacked leaf merge: a key of `MERGES`, or a
            function of the same signature (a recipe's own, e.g. per-layer schedules).
        subject: for a single selector (`mask`, `masked`, `freeze`), how
            messages name it, e.g. "the selector given to mask()".
        warn: warn about shadowed rules (`explain` marks them instead).
        relabel: turns the label of each row into its value before the rows
            of stacked leaves merge (layer ids placed relative to a row's path).
        whole_tensors: the rows stand for whole tensors to move (`load`, `save`), never
            for layers told apart by shape or layer id; else a model that marks stacked
            layers its leaves cannot show (a penzai LayerStack) is refused without `stacked=`.
        recall: a wrapper's memory of the last tree with wrapped leaves (NNX
            Variables): a later tree of the same paths without them (the
            update optax gets) takes its decisions by path.
    """
    default, strict, stacked, types_from = (
        options.default,
        options.strict,
        options.stacked,
        options.types_from,
    )
    if types_from is not None or recall is not None:
        kw: dict[str, Any] = dict(caller=caller, merge=merge, subject=subject, warn=warn, relabel=relabel)
        kw |= dict(whole_tensors=whole_tensors)
        view = view_of(tree, caller, stacked)
        if types_from is not None:
            source = view_of(types_from, caller, stacked)
            _check_covered(source, view, caller)
            return _project(
                resolve(source, rules, replace(options, types_from=None), **kw), view, caller, strict, subject
            )
        assert recall is not None
        if view.wrapped or recall.last is None or recall.last.view.leaf_paths != view.leaf_paths:
            result = resolve(view, rules, options, **kw)
            if view.wrapped:
                recall.last = result
            return result
        return _project(recall.last, view, caller, strict, subject)
    with paused_gc():
        view = view_of(tree, caller, stacked)
        if not whole_tensors and not view.stacks:
            _check_stack_mark(view, caller)
        rules = normalize_rules(rules, default)
        ctx = Context(view, strict=strict)
        decided = np.full(len(view), -1)
        matches, shadowed = [], []
        for rule in rules:
            ctx.scope = "" if subject else rule.describe()
            hit = ctx.evaluate(rule.selector)
            matches.append(hit)
            if not hit.any():
                if strict and not rule.selector.may_be_empty:
                    ctx.scope = ""
                    role = subject or f"the selector of {rule.describe()}"
                    raise ctx.no_match(rule.selector, role, _swap_hint(ctx, rule))
                continue
            new = hit & (decided < 0)
            # A catch-all ("**" last, a preset's "everything else") that finds nothing
            # left is doing its job, not shadowed.
            if not new.any() and not hit.all():
                shadowed.append(rule.index)
            decided[new] = rule.index
        uncovered = np.flatnonzero(decided < 0)
        if len(uncovered) and default is MISSING:
            raise _uncovered(view, uncovered)
        labels = np.empty(len(rules) + 1, object)  # filled one by one: a tuple label stays one object
        for i, label in enumerate([r.label for r in rules] + [default]):
            labels[i] = label
        rows = labels[decided].tolist()  # -1 picks the default, last
        if relabel is not None:
            rows = relabel(view, rows)
        merge_fn = MERGES[merge] if isinstance(merge, str) else merge
        values = view.per_leaf(rows, lambda leaf, layers, stack: merge_fn(view, caller, leaf, layers, stack))
    if warn:
        for index in shadowed:
            _warn_shadowed(rules, index)
    return Resolution(view, rules, default, decided, tuple(matches), tuple(shadowed), values)


def _check_stack_mark(view: TreeView, caller: str) -> None:
    """Refuse a tree that marks stacked layers its leaves cannot show (a penzai LayerStack)
    when none are declared: its stacked norm scales would pass for matrices."""
    root = view.leaf_structure
    mark = remember(root, "stack_mark", lambda: stack_mark(*kinds(root), lambda: inner_paths(root)))
    if mark:
        raise ValueError(f"{caller}(): {mark}")


class Recall:
    """A wrapper's memory of the last resolution on a tree with wrapped leaves.

    Under `nnx.Optimizer` optax gets the params with their NNX Variables at
    `init` and bare arrays at `update`: the same paths, but the Variable types
    (`nnx.LoRAParam`, ...) are gone. The decisions made at `init` serve then.
    """

    def __init__(self) -> None:
        self.last: Resolution | None = None


def _check_covered(source: TreeView, view: TreeView, caller: str) -> None:
    known = set(source.paths)
    missing = [path for path in view.paths if path not in known]
    if missing:
        listed = "\n".join(f"    {p or '<root>'}" for p in missing[:_MAX_LISTED])
        raise ValueError(
            f"{caller}(): {len(missing)} leaves of the tree have no leaf of the same path in the tree "
            f"the types come from (types_from):\n{listed}\nPass the model these parameters belong to, "
            "e.g. treeglob.mask(nnx.state(model, nnx.Param), selector, types_from=model)."
        )


def _project(
    source: Resolution, view: TreeView, caller: str, strict: bool, subject: str | None
) -> Resolution:
    """`source`'s decisions for the leaves of `view`, taken by path (all present in `source`)."""
    rows = {path: i for i, path in enumerate(source.view.paths)}
    index = np.fromiter((rows[path] for path in view.paths), np.intp, len(view))
    matches = tuple(m[index] for m in source.matches)
    for rule, hit in zip(source.rules, matches, strict=True):
        if strict and not rule.selector.may_be_empty and not hit.any():
            raise Context(view, strict=True).no_match(
                rule.selector, subject or f"the selector of {rule.describe()}"
            )
    leaf_of = {path: i for i, path in enumerate(source.view.leaf_paths)}
    values = [source.values[leaf_of[path]] for path in view.leaf_paths]
    return Resolution(
        view, source.rules, source.default, source.decided[index], matches, source.shadowed, values
    )


# The shadowed rules already warned about, by the identity of their normalized rule
# set: a recipe normalizes its rules once and resolves them at every step.
_WARNED: weakref.WeakValueDictionary[tuple[int, int], Rules] = weakref.WeakValueDictionary()


def _warn_shadowed(rules: Rules, index: int) -> None:
    """Warn once per rule set and rule (a training loop must not warn at every step)."""
    if _WARNED.get((id(rules), index)) is rules:
        return
    _WARNED[(id(rules), index)] = rules
    warn_user(
        f"{rules[index].describe()} never decides a label: every leaf it matches is taken by an "
        "earlier rule (the first matching rule wins). Move it up or remove it.",
        ShadowedRuleWarning,
    )


def _uncovered(view: TreeView, uncovered: np.ndarray) -> ValueError:
    listed = "\n".join(f"    {view.paths[i] or '<root>'}" for i in uncovered[:_MAX_LISTED])
    more = f"\n    ... and {len(uncovered) - _MAX_LISTED} more" if len(uncovered) > _MAX_LISTED else ""
    return ValueError(
        f"{len(uncovered)} of {len(view)} leaves match no rule and no default label was given:\n"
        f"{listed}{more}\n"
        "Add a rule for them, pass default=<label>, or, if they are not parameters "
        "(activations, static values), filter them out first: eqx.filter(model, eqx.is_array)."
    )


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


def select(
    tree: Any, selector: Any, options: Options = DEFAULTS, *, caller: str, merge: str = "mask", **kw: Any
) -> Resolution:
    """`resolve` for one selector: True where it selects, False elsewhere."""
    view = view_of(tree, caller, options.stacked)  # a selector passed as the tree is named first
    subject = f"the selector given to {caller}()"
    options = replace(options, default=False)
    return resolve(
        view, [(coerce(selector), True)], options, caller=caller, merge=merge, subject=subject, **kw
    )


def mask(
    tree: Any, selector: Any, *, strict: bool = True, stacked: Any = None, types_from: Any = None
) -> Any:
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
        types_from: a tree holding the same paths (and maybe more) whose
            node types the conditions read: for a Flax NNX parameter State,
            the module (`types_from=model`), so that module types such as
            `nnx.LayerNorm` select; the mask keeps the structure of `tree`.

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
    return select(
        tree, selector, Options(strict=strict, stacked=stacked, types_from=types_from), caller="mask"
    ).tree()


def labels(
    tree: Any,
    rules: Any,
    *,
    default: Any = MISSING,
    strict: bool = True,
    stacked: Any = None,
    types_from: Any = None,
) -> Any:
    """A tree of labels, one per leaf: **the first rule that matches decides**.

    Args:
        tree: any PyTree.
        rules: a sequence of `(selector, label)` pairs, or a dict
            `{label: selector}` (insertion order). Labels are any PyTree leaf:
            strings for `optax.partition`, numbers for multipliers,
            `PartitionSpec` values for sharding.
        default: the label of leaves no rule matches. Without it, such a
            leaf is an error that lists the uncovered paths.
        strict: raise `NoMatchError` when a rule (or a negated operand in
            it) matches no leaf. Mark single rules with `treeglob.optional`.
        stacked: `{path: axes}` for subtrees with leading stacked layer axes
            (see `mask`). Layers of one stacked leaf that get different
            numeric labels yield an array of shape `stack + (1,) * ndim`
            that broadcasts over the leaf; other differing labels are an error.
        types_from: as in `mask`.

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
    return resolve(tree, rules, Options(default, strict, stacked, types_from), caller="labels").tree()

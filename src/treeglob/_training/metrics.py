"""Training metrics per group: norms and other reductions of a tree, one value per label.

The labels come from the same resolution as everything else, at trace time:
inside `jax.jit` the compiled step holds only the reductions themselves, the
ones a hand-written per-group norm would have.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core.resolve import Options, resolve
from .._core.rules import MISSING
from .._core.tree import TreeView

__all__ = ["STATS", "norm_ratios", "summarize"]

#: The statistics `summarize` computes, by name.
STATS = ("norm", "rms", "max_abs", "count", "zero_fraction", "mean", "min", "max")


class _Group:
    """The partial reductions of one group, one entry per leaf: sums, extrema, element counts."""

    def __init__(self) -> None:
        self.squares: list[Any] = []
        self.abs_maxima: list[Any] = []
        self.zeros: list[Any] = []
        self.sums: list[Any] = []
        self.minima: list[Any] = []
        self.maxima: list[Any] = []
        self.count = 0

    def add(self, x: Any, axes: tuple[int, ...], count: int, stats: Sequence[str], pick: Any = None) -> None:
        """Reduce `x` over `axes`; `pick` (static indices) selects layers of a per-layer result."""

        def reduce(value: Any, fn: Callable[..., Any]) -> Any:
            out = fn(value, axis=axes or None)
            if pick is not None:
                out = out.reshape(-1)[pick]
                out = fn(out) if out.ndim else out
            return out

        if "norm" in stats or "rms" in stats:
            self.squares.append(reduce(jnp.square(x), jnp.sum))
        if "max_abs" in stats:
            self.abs_maxima.append(reduce(jnp.abs(x), jnp.max))
        if "zero_fraction" in stats:
            # Exact integer count per leaf; the group's total in float, which cannot overflow.
            self.zeros.append(reduce(x == 0, jnp.sum).astype(jnp.float32))
        if "mean" in stats:
            self.sums.append(reduce(x, jnp.sum))
        if "min" in stats:
            self.minima.append(reduce(x, jnp.min))
        if "max" in stats:
            self.maxima.append(reduce(x, jnp.max))
        self.count += count

    def values(self, stats: Sequence[str]) -> dict[str, Any]:
        out = {}
        if "norm" in stats or "rms" in stats:
            squares = functools.reduce(jnp.add, self.squares)
            if "norm" in stats:
                out["norm"] = jnp.sqrt(squares)
            if "rms" in stats:
                out["rms"] = jnp.sqrt(squares / self.count)
        if "max_abs" in stats:
            out["max_abs"] = functools.reduce(jnp.maximum, self.abs_maxima)
        if "count" in stats:
            out["count"] = jnp.asarray(self.count)
        if "zero_fraction" in stats:
            out["zero_fraction"] = functools.reduce(jnp.add, self.zeros) / self.count
        if "mean" in stats:
            out["mean"] = functools.reduce(jnp.add, self.sums) / self.count
        if "min" in stats:
            out["min"] = functools.reduce(jnp.minimum, self.minima)
        if "max" in stats:
            out["max"] = functools.reduce(jnp.maximum, self.maxima)
        return out


def _check_stats(stats: Any) -> tuple[str, ...]:
    if isinstance(stats, str):
        stats = (stats,)
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"summarize(): unknown statistics {unknown!r}; choose from {', '.join(STATS)}.")
    return tuple(stats)


def _groups(view: TreeView, values: list[Any], stats: tuple[str, ...], per_layer: bool) -> dict[str, _Group]:
    """The leaves' reductions, by label, and by layer of each stacked subtree with `per_layer`."""
    groups: dict[str, _Group] = {}
    for leaf, shape, stack, value in zip(
        view.leaves, view.leaf_shapes, view.leaf_stacks, values, strict=True
    ):
        if shape is None:  # not an array: nothing to reduce
            continue
        size = math.prod(shape)
        if not isinstance(value, list):  # one label for the whole leaf
            groups.setdefault(str(value), _Group()).add(leaf, (), size, stats)
        else:  # a stacked leaf whose layers have different labels
            per_layer_size = size // math.prod(stack)
            inner = tuple(range(len(stack), len(shape)))
            for label in dict.fromkeys(map(str, value)):
                pick = np.flatnonzero([str(v) == label for v in value])
                groups.setdefault(label, _Group()).add(leaf, inner, per_layer_size * len(pick), stats, pick)
    if per_layer:
        for s in view.stacks:
            inner_of = {}
            for leaf in range(s.first_leaf, s.first_leaf + s.num_leaves):
                if view.leaf_shapes[leaf] is not None:
                    inner_of[leaf] = tuple(range(len(s.shape), len(view.leaf_shapes[leaf] or ())))
            for layer, index in enumerate(np.ndindex(*s.shape)):
                group = groups.setdefault(".".join([s.path, *map(str, index)]), _Group())
                for leaf, inner in inner_of.items():
                    size = math.prod(view.leaf_shapes[leaf] or ()) // math.prod(s.shape)
                    group.add(view.leaves[leaf], inner, size, stats, np.asarray(layer))
    return groups


def summarize(
    tree: Any,
    rules: Any,
    *,
    stats: Sequence[str] | str = ("norm",),
    prefix: str = "",
    default: Any = MISSING,
    strict: bool = True,
    stacked: Any = None,
    per_layer: bool = False,
) -> dict[str, jax.Array]:
    """Reduce a tree (gradients, parameters, updates) per label, for logging.

    The rules label the leaves exactly as `treeglob.labels` does (first
    match wins); each label's array leaves are reduced together. Inside
    `jax.jit` the labels are resolved while tracing, so the compiled step
    holds just the reductions.

    Args:
        tree: the tree to reduce; only its array leaves are reduced.
        rules: as in `treeglob.labels`; labels become part of the keys.
        stats: any of `"norm"` (L2 norm over the group), `"rms"` (root mean
            square), `"max_abs"`, `"count"` (number of elements),
            `"zero_fraction"` (fraction of elements exactly 0), `"mean"`,
            `"min"`, `"max"`, each over all elements of the group.
        prefix: put in front of every key, e.g. `"grad"`.
        default, strict, stacked: as in `treeglob.labels`. Layers of a
            stacked leaf may have different labels: each layer counts in its own.
        per_layer: with `stacked`, also one value per layer of each stacked
            subtree, keyed by the layer's path (`blocks.3`).

    Returns:
        A flat dict from `"<prefix>/<stat>/<label>"` to a scalar array (without
        the prefix part when `prefix` is empty).

    Examples:
        >>> import jax.numpy as jnp, treeglob
        >>> grads = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((4,), 1.0)}
        >>> metrics = treeglob.summarize(grads, [("b", "no_decay")], default="decay", prefix="grad")
        >>> {k: float(v) for k, v in metrics.items()}
        {'grad/norm/no_decay': 2.0, 'grad/norm/decay': 4.0}
        >>> params = {"w": jnp.array([[0.0, 2.0], [-1.0, 3.0]]), "b": jnp.zeros(4)}
        >>> stats = ("mean", "zero_fraction", "min", "max")
        >>> metrics = treeglob.summarize(params, [("b", "bias")], default="weight", stats=stats)
        >>> {k: float(v) for k, v in metrics.items()}
        {'zero_fraction/bias': 1.0, 'mean/bias': 0.0, 'min/bias': 0.0, 'max/bias': 0.0,
         'zero_fraction/weight': 0.25, 'mean/weight': 1.0, 'min/weight': -1.0, 'max/weight': 3.0}
    """
    stats = _check_stats(stats)
    if per_layer and not stacked:
        raise ValueError(
            "summarize(per_layer=True) reports the layers of stacked subtrees: declare them with "
            "stacked={'<path>': 1}. For a list of blocks, give each block a label instead (e.g. with a "
            "rule per block index)."
        )
    resolution = resolve(tree, rules, Options(default, strict, stacked), caller="summarize", merge="rows")
    head = f"{prefix}/" if prefix else ""
    out: dict[str, jax.Array] = {}
    groups = _groups(resolution.view, resolution.values, stats, per_layer)
    # Labels in the order the rules give them, the default last, then the layers.
    order = [str(label) for label in resolution.rules.labels(resolution.default)]
    for group_name in [g for g in order if g in groups] + [g for g in groups if g not in order]:
        for stat, value in groups[group_name].values(stats).items():
            out[f"{head}{stat}/{group_name}"] = value
    return out


def norm_ratios(
    numerator: Any,
    denominator: Any,
    rules: Any,
    *,
    name: str = "ratio",
    default: Any = MISSING,
    strict: bool = True,
    stacked: Any = None,
    per_layer: bool = False,
) -> dict[str, jax.Array]:
    """Per label, the norm of `numerator` over the norm of `denominator`: the update/param ratio.

    Both trees are labelled by the same rules (they must have the same
    structure); keys are `"<name>/<label>"`.

    Examples:
        >>> import jax.numpy as jnp, treeglob
        >>> params = {"w": jnp.full((2,), 3.0), "b": jnp.full((2,), 1.0)}
        >>> updates = {"w": jnp.full((2,), 0.03), "b": jnp.full((2,), 0.1)}
        >>> ratios = treeglob.norm_ratios(updates, params, [("b", "bias")], default="weight", name="update/param")
        >>> {k: round(float(v), 4) for k, v in ratios.items()}
        {'update/param/bias': 0.1, 'update/param/weight': 0.01}
    """
    kw: Mapping[str, Any] = dict(default=default, strict=strict, stacked=stacked, per_layer=per_layer)
    top = summarize(numerator, rules, **kw)
    bottom = summarize(denominator, rules, **kw)
    if top.keys() != bottom.keys():
        raise ValueError(
            "norm_ratios(): the two trees give different groups "
            f"({sorted(top)} and {sorted(bottom)}); pass trees of the same structure (e.g. updates and params)."
        )
    return {f"{name}/{key.removeprefix('norm/')}": top[key] / bottom[key] for key in top}
